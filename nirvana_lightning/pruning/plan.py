"""The pruning plan: sorted keep indices per layer plus provenance; the only thing that cuts."""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

PLAN_FORMAT = "nirvana-lightning/plan/v3"
PLAN_FORMAT_V2 = "nirvana-lightning/plan/v2"
PLAN_FORMAT_V1 = "nirvana-lightning/plan/v1"
#: what each unit kind of a v1/v2 plan (0.1, 0.2) is in v3: the old names were Hugging Face attribute names
LEGACY_KINDS = {
    "self_attn": ("kv_group", {"allocation": "attention", "label": "KV groups", "parent": None}),
    "q_head": ("q_head", {"allocation": "attention", "label": "query heads", "parent": "kv_group"}),
    "cross_attn": ("cross_head", {"allocation": "attention", "label": "cross-attention heads", "parent": None}),
    "mlp": ("neuron", {"allocation": "mlp", "label": "MLP neurons", "parent": None}),
}


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a plan depends on."""
    out = {"python": platform.python_version()}
    for name in ("nirvana-lightning", "torch", "transformers", "lightning", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class PruningPlan:
    """Which units of each kind every layer keeps (format v3).

    Attributes:
        keep: per unit kind (the family's names: ``kv_group``, ``q_head``, ``neuron``, T5's ``cross_head`` ...),
            per layer, the sorted indices kept (into the layer as it was before this plan); a kind a layer lacks
            (T5's cross-attention in encoder blocks) has width 0 and keeps ``[]`` there.
        width_before: per unit kind, per layer, the units the plan was made for.
        unit_cost: per unit kind, per layer, the block weights one unit owns (the family's declaration), so
            parameter counts need no model.
        n_head_before: per layer, query heads before the plan.
        n_query_per_kv: g of the model's config. head_dim: d. hidden_dim: model width.
        kinds: per unit kind, what the family declares of it: ``allocation`` (``attention`` / ``mlp``), ``label``
            and ``parent`` (the kind whose units contain this kind's, e.g. ``q_head`` in ``kv_group``).
        provenance: criterion, functional, sparsity, gamma, round_to, calibration fingerprint,
            seed, model source, library versions, realised counts, ...

    v1 (0.1: ``attention_keep`` / ``mlp_keep``) and v2 (0.2: kinds ``self_attn`` / ``q_head`` / ``cross_attn`` /
    ``mlp``) plans are read by :meth:`from_dict` and cut the same units.
    """

    keep: dict[str, list[list[int]]]
    width_before: dict[str, list[int]]
    unit_cost: dict[str, list[int]]
    n_head_before: list[int]
    n_query_per_kv: int
    head_dim: int
    hidden_dim: int
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = PLAN_FORMAT

    # --------------------------------------------------------------- kinds
    def kinds_of(self, allocation: str, nested: bool | None = None) -> list[str]:
        """The unit kinds allocated as ``allocation``, in plan order; ``nested``: only kinds with (True) or
        without (False) a parent."""
        return [k for k in self.keep if self.kinds[k]["allocation"] == allocation
                and (nested is None or (self.kinds[k]["parent"] is not None) == nested)]

    @property
    def _group_kind(self) -> str:
        """The layer's own attention blocks (KV groups; T5: self-attention heads)."""
        return self.kinds_of("attention", nested=False)[0]

    @property
    def _head_kind(self) -> str | None:
        nested = self.kinds_of("attention", nested=True)
        return nested[0] if nested else None

    @property
    def _mlp_kind(self) -> str:
        return self.kinds_of("mlp")[0]

    # --------------------------------------------------------------- shapes
    @property
    def granularity(self) -> str:
        return "query_head" if self._head_kind else "group"

    @property
    def n_layer(self) -> int:
        return len(next(iter(self.keep.values())))

    @property
    def attention_keep(self) -> list[list[int]]:
        """Kept KV groups per layer."""
        return self.keep[self._group_kind]

    @property
    def mlp_keep(self) -> list[list[int]]:
        return self.keep[self._mlp_kind]

    @property
    def n_kv_group_before(self) -> list[int]:
        return self.width_before[self._group_kind]

    @property
    def mlp_dim_before(self) -> list[int]:
        return self.width_before[self._mlp_kind]

    @property
    def n_kv_group_after(self) -> list[int]:
        return [len(k) for k in self.attention_keep]

    @property
    def mlp_dim_after(self) -> list[int]:
        return [len(k) for k in self.mlp_keep]

    @property
    def n_head_after(self) -> list[int]:
        """Query heads per layer after the plan."""
        if self._head_kind:
            return [len(k) for k in self.keep[self._head_kind]]
        return [len(k) * h // n if n else 0
                for k, h, n in zip(self.attention_keep, self.n_head_before, self.n_kv_group_before)]

    def head_keep(self) -> list[list[int]]:
        """Kept query heads per layer (at ``group`` granularity: every head of every kept group)."""
        if self._head_kind:
            return self.keep[self._head_kind]
        return [[j * (h // n) + r for j in k for r in range(h // n)]
                for k, h, n in zip(self.attention_keep, self.n_head_before, self.n_kv_group_before)]

    def attention_width_before(self) -> list[int]:
        """Attention units allocation ranks per layer before the plan: the nested kind's (query heads at
        ``query_head`` granularity), else every attention block's (KV groups, plus T5's cross-attention heads)."""
        ranked = [self._head_kind] if self._head_kind else self.kinds_of("attention", nested=False)
        return [sum(w) for w in zip(*(self.width_before[k] for k in ranked))]

    def _block_params(self, counts: dict[str, list[int]]) -> int:
        return sum(n * c for kind, per_layer in counts.items() for n, c in zip(per_layer, self.unit_cost[kind]))

    @property
    def block_params_before(self) -> int:
        """Block weights the plan's unit kinds own before the plan (biases and norms excluded)."""
        return self._block_params(self.width_before)

    @property
    def block_params_after(self) -> int:
        return self._block_params({kind: [len(k) for k in rows] for kind, rows in self.keep.items()})

    @property
    def realised_sparsity(self) -> float:
        return 1 - self.block_params_after / self.block_params_before

    def validate(self) -> None:
        """Check internal consistency; errors name the layer."""
        if self.format != PLAN_FORMAT:
            raise ValueError(f"plan format {self.format!r}; this version reads {PLAN_FORMAT!r}, {PLAN_FORMAT_V2!r} "
                             f"and {PLAN_FORMAT_V1!r}")
        # the schema: types first, so no check below meets a None, a string or a bare number
        if not isinstance(self.provenance, dict):
            raise ValueError(f"plan provenance is {self.provenance!r}, not a mapping")
        identity = self.provenance.get("model_identity")
        if identity is not None and not isinstance(identity, dict):
            raise ValueError(f"plan provenance.model_identity is {identity!r}, not a mapping")
        for name, table, nested in (("keep", self.keep, True), ("width_before", self.width_before, False),
                                    ("unit_cost", self.unit_cost, False)):
            if not isinstance(table, dict) or not table:
                raise ValueError(f"plan {name} is {table!r}, not a mapping of unit kinds")
            for kind, rows in table.items():
                if not isinstance(rows, list) or (nested and not all(isinstance(r, list) for r in rows)):
                    what = "a list of index lists, one per layer" if nested else "a list of integers, one per layer"
                    text = repr(rows)
                    raise ValueError(f"plan {name}[{kind!r}] is {text[:60] + ' ...' if len(text) > 60 else text}, "
                                     f"not {what}")
        if not isinstance(self.n_head_before, list):
            raise ValueError(f"plan n_head_before is {self.n_head_before!r}, not a list of integers")
        for name, value in (("n_query_per_kv", self.n_query_per_kv), ("head_dim", self.head_dim),
                            ("hidden_dim", self.hidden_dim)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"plan {name} is {value!r}, not a positive integer")
        if not set(self.keep) == set(self.width_before) == set(self.unit_cost):
            raise ValueError("plan keep, width_before and unit_cost name different unit kinds")
        self._validate_kinds()
        for kind, rows in self.keep.items():
            for i, row in enumerate(rows):
                bad = [x for x in row if not _is_int(x)]
                if bad:
                    raise ValueError(f"plan layer {i}: keep[{kind!r}] holds {bad[0]!r}, not an integer index")
        for name, table in (("width_before", self.width_before), ("unit_cost", self.unit_cost),
                            ("n_head_before", {"": self.n_head_before})):
            for kind, seq in table.items():
                # a kind some layers lack (T5's cross-attention in encoder blocks) has width and cost 0 there
                bad = [x for x in seq if not _is_int(x) or x < 0]
                if bad:
                    raise ValueError(f"plan {name}{f'[{kind!r}]' if kind else ''} holds {bad[0]!r}, not a "
                                     "non-negative integer")
        n = self.n_layer
        first = next(iter(self.keep))
        for kind in self.keep:
            for name, seq in ((f"keep[{kind!r}]", self.keep[kind]), (f"width_before[{kind!r}]", self.width_before[kind]),
                              (f"unit_cost[{kind!r}]", self.unit_cost[kind])):
                if len(seq) != n:
                    raise ValueError(f"plan has {n} layers of keep[{first!r}] but {len(seq)} of {name}")
        if len(self.n_head_before) != n:
            raise ValueError(f"plan has {n} layers of keep[{first!r}] but {len(self.n_head_before)} of n_head_before")
        for i in range(n):
            for kind in self.keep:
                keep, width = self.keep[kind][i], self.width_before[kind][i]
                if width == 0:
                    if keep or self.unit_cost[kind][i]:
                        raise ValueError(f"plan layer {i}: {kind} has no unit before the plan but keeps {keep} at "
                                         f"unit cost {self.unit_cost[kind][i]}")
                    continue
                if not self.unit_cost[kind][i]:
                    raise ValueError(f"plan unit_cost[{kind!r}] holds 0 in layer {i}, where the kind has {width} units")
                if not keep:
                    raise ValueError(f"plan layer {i}: {kind} keeps no unit")
                if list(keep) != sorted(set(keep)):
                    raise ValueError(f"plan layer {i}: {kind} keep indices are not sorted and unique")
                if keep[0] < 0 or keep[-1] >= width:
                    raise ValueError(f"plan layer {i}: {kind} keep index out of range [0, {width})")
            n_kv, n_head = self.n_kv_group_before[i], self.n_head_before[i]
            if n_kv and n_head % n_kv:
                raise ValueError(f"plan layer {i}: {n_head} query heads do not split into {n_kv} KV groups")
            for child in self.kinds_of("attention", nested=True) + self.kinds_of("mlp", nested=True):
                self._validate_nesting(i, child)

    def _validate_kinds(self) -> None:
        if not isinstance(self.kinds, dict) or set(self.kinds) != set(self.keep):
            raise ValueError(f"plan kinds declares {sorted(self.kinds) if isinstance(self.kinds, dict) else self.kinds!r}"
                             f"; keep holds unit kinds {sorted(self.keep)}")
        for kind, spec in self.kinds.items():
            if not isinstance(spec, dict) or set(spec) != {"allocation", "label", "parent"}:
                raise ValueError(f"plan kinds[{kind!r}] is {spec!r}, not a mapping of allocation, label and parent")
            if spec["allocation"] not in ("attention", "mlp"):
                raise ValueError(f"plan kinds[{kind!r}] allocation is {spec['allocation']!r}; expected 'attention' "
                                 "or 'mlp'")
            parent = spec["parent"]
            if parent is not None and (parent not in self.keep or self.kinds[parent]["parent"] is not None
                                       or self.kinds[parent]["allocation"] != spec["allocation"]):
                raise ValueError(f"plan kinds[{kind!r}] parent {parent!r} is not a top-level {spec['allocation']} "
                                 f"kind of the plan ({sorted(self.keep)})")
        if not self.kinds_of("attention", nested=False) or not self.kinds_of("mlp"):
            raise ValueError(f"plan unit kinds {sorted(self.keep)} hold no attention or no MLP kind")

    def _validate_nesting(self, i: int, child: str) -> None:
        parent = self.kinds[child]["parent"]
        n_parent, n_child = self.width_before[parent][i], self.width_before[child][i]
        if n_parent == 0 or n_child % n_parent:
            raise ValueError(f"plan layer {i}: width_before[{child!r}] is {n_child}, not a multiple of the "
                             f"{n_parent} {parent} units")
        if self.kinds[child]["allocation"] == "attention" and n_child != self.n_head_before[i]:
            raise ValueError(f"plan layer {i}: width_before[{child!r}] is {n_child}, n_head_before "
                             f"{self.n_head_before[i]}")
        g = n_child // n_parent
        per_parent: dict[int, int] = {}
        for j in self.keep[child][i]:
            per_parent[j // g] = per_parent.get(j // g, 0) + 1
        if sorted(per_parent) != list(self.keep[parent][i]) or len(set(per_parent.values())) != 1:
            raise ValueError(f"plan layer {i}: kept {self.kinds[child]['label']} {self.keep[child][i]} must fill the "
                             f"kept {self.kinds[parent]['label']} {self.keep[parent][i]} with the same number each "
                             f"(g={g})")

    # ------------------------------------------------------------- summary
    def table(self) -> str:
        """A per-layer markdown table: kept / original units of every kind, and the kept fractions."""
        names = list(self.keep)
        head = " | ".join(f"{self.kinds[k]['label']} kept" for k in names)
        rows = [f"| layer | {head} | attention kept | MLP kept |", "|---|" + "---|" * (len(names) + 2)]
        for r in allocation_rows(self):
            cells = " | ".join(f"{len(self.keep[k][r['layer']])}/{self.width_before[k][r['layer']]}"
                               if self.width_before[k][r["layer"]] else "-" for k in names)
            rows.append(f"| {r['layer']} | {cells} | {r['attention_kept']:.0%} | {r['mlp_kept']:.0%} |")
        rows.append(f"\nblock weights {self.block_params_before:,} -> {self.block_params_after:,} "
                    f"(sparsity {self.realised_sparsity:.4f})")
        return "\n".join(rows)

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        """A plan from its dict; v1 (0.1's ``attention_keep`` / ``mlp_keep``) and v2 dicts are converted."""
        if not isinstance(data, dict):
            raise ValueError(f"not a pruning plan: a {type(data).__name__}, not a mapping")
        if data.get("format") == PLAN_FORMAT_V1:
            data = _from_v1(data)
        if data.get("format") == PLAN_FORMAT_V2:
            data = _from_v2(data)
        try:
            plan = cls(**data)
        except TypeError as err:
            raise ValueError(f"not a pruning plan: {err}") from err
        plan.validate()
        return plan

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        return cls.from_dict(json.loads(text))

    def fingerprint(self) -> str:
        """A short hash of the keep indices (not the provenance): equal plans, equal fingerprints.

        At ``group`` granularity it hashes what v1 hashed, so a plan keeps its fingerprint across formats."""
        import hashlib

        core = [self.attention_keep, self.mlp_keep, self.n_kv_group_before, self.mlp_dim_before]
        for kind in self.keep:
            if kind not in (self._group_kind, self._mlp_kind):
                core.append(self.keep[kind])
        return hashlib.sha256(json.dumps(core).encode()).hexdigest()[:16]


def _from_v2(data: dict[str, Any]) -> dict[str, Any]:
    """A v2 plan dict (0.2) in v3 form: its kinds renamed (:data:`LEGACY_KINDS`), the same units kept."""
    tables = ("keep", "width_before", "unit_cost")
    if not all(isinstance(data.get(t), dict) for t in tables):
        return data  # the schema check names what is missing
    unknown = sorted(set(data["keep"]) - set(LEGACY_KINDS))
    if unknown:
        raise ValueError(f"plan (v2) has unit kinds {unknown}; v2 plans hold {sorted(LEGACY_KINDS)}")
    out = {**data, "format": PLAN_FORMAT}
    for t in tables:
        out[t] = {LEGACY_KINDS.get(k, (k,))[0]: v for k, v in data[t].items()}
    out["kinds"] = {LEGACY_KINDS[k][0]: dict(LEGACY_KINDS[k][1]) for k in data["keep"]}
    return out


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A v1 plan dict (0.1) in v2 form: the same units, the unit costs 0.1's formula used (0.1 knew only Llama-like
    decoders: a KV group's q/k/v rows and o columns, a neuron's gate/up rows and down column)."""
    try:
        g, d, hidden = data["n_query_per_kv"], data["head_dim"], data["hidden_dim"]
        n_kv, mlp = data["n_kv_group_before"], data["mlp_dim_before"]
        return {
            "keep": {"self_attn": data["attention_keep"], "mlp": data["mlp_keep"]},
            "width_before": {"self_attn": n_kv, "mlp": mlp},
            "unit_cost": {"self_attn": [2 * (g + 1) * d * hidden] * len(n_kv), "mlp": [3 * hidden] * len(mlp)},
            "n_head_before": [n * g for n in n_kv],
            "n_query_per_kv": g, "head_dim": d, "hidden_dim": hidden,
            "provenance": data.get("provenance", {}), "format": PLAN_FORMAT_V2,
        }
    except (KeyError, TypeError) as err:
        raise ValueError(f"not a v1 pruning plan: {err!r}") from err


def as_query_heads(plan: PruningPlan, kinds: list[dict]) -> PruningPlan:
    """The same cut written at ``query_head`` granularity (the heads of every kept group kept), with the unit
    costs the family declares there: ``kinds`` per layer are its query-head granularity unit kinds (per-unit
    costs do not change with widths, so any state of the model declares them)."""
    if plan.granularity == "query_head":
        return plan
    names = list(kinds[0])
    head = next(n for n in names if kinds[0][n].parent is not None)
    group = kinds[0][head].parent
    mlp = plan._mlp_kind
    keep = {group: plan.attention_keep, head: plan.head_keep(), mlp: plan.mlp_keep}
    width = {group: plan.n_kv_group_before, head: list(plan.n_head_before), mlp: plan.mlp_dim_before}
    return dataclasses.replace(
        plan, keep={n: keep[n] for n in names}, width_before={n: width[n] for n in names},
        unit_cost={n: [k[n].cost for k in kinds] for n in names}, kinds={n: kinds[0][n].spec() for n in names})


def allocation_rows(plan: PruningPlan) -> list[dict]:
    """Per layer: kept / original KV groups, query heads and MLP neurons, and the kept fractions (attention:
    of the query heads, which carry the q/o weights and the attention compute); every other top-level attention
    kind (T5's ``cross_head``) adds its kept / original units as ``<kind>s_kept`` / ``<kind>s``."""
    rows = [
        {"layer": i, "kv_groups_kept": a, "kv_groups": ab, "query_heads_kept": h, "query_heads": hb,
         "mlp_neurons_kept": m, "mlp_neurons": mb, "attention_kept": h / hb if hb else 1.0,
         "mlp_kept": m / mb if mb else 1.0}
        for i, (a, ab, h, hb, m, mb) in enumerate(zip(plan.n_kv_group_after, plan.n_kv_group_before,
                                                      plan.n_head_after, plan.n_head_before,
                                                      plan.mlp_dim_after, plan.mlp_dim_before))
    ]
    for kind in plan.kinds_of("attention", nested=False)[1:]:
        for row, kept, width in zip(rows, plan.keep[kind], plan.width_before[kind]):
            row.update({f"{kind}s_kept": len(kept), f"{kind}s": width})
    return rows


def compose_plans(first: PruningPlan, second: PruningPlan, kinds: list[dict] | None = None) -> PruningPlan:
    """The single plan equivalent to applying ``first`` and then ``second``.

    ``second`` indexes into the model as ``first`` left it; the result indexes into the model
    ``first`` was made for: ``keep[kind][i] = first.keep[kind][i][second.keep[kind][i]]``. When one step is at
    ``query_head`` granularity and the other is not, both are written at it first (:func:`as_query_heads`, with
    ``kinds``: the family's query-head unit kinds per layer, required then). Provenance: the second's, plus
    ``steps`` (the provenance of every step, oldest first).

    Raises:
        ValueError: when ``second`` was not made for the widths ``first`` produces.
    """
    first.validate()
    second.validate()
    if first.granularity != second.granularity:
        if kinds is None:
            raise ValueError("steps at different attention granularities compose only with the family's query-head "
                             "unit kinds (compose_plans(first, second, kinds))")
        first, second = as_query_heads(first, kinds), as_query_heads(second, kinds)
    roles = [{k: (spec["allocation"], spec["parent"]) for k, spec in plan.kinds.items()} for plan in (first, second)]
    if (set(first.keep) != set(second.keep) or roles[0] != roles[1]
            or any(second.width_before[kind] != [len(k) for k in first.keep[kind]] for kind in first.keep)
            or second.n_head_before != first.n_head_after
            or (second.head_dim, second.hidden_dim) != (first.head_dim, first.hidden_dim)):
        raise ValueError("the second plan was not made for the widths the first one leaves")
    steps = list(first.provenance.get("steps") or [first.provenance])
    steps.append({k: v for k, v in second.provenance.items() if k != "steps"})
    return PruningPlan(
        keep={kind: [[a[j] for j in b] for a, b in zip(first.keep[kind], second.keep[kind])] for kind in first.keep},
        width_before={kind: list(w) for kind, w in first.width_before.items()},
        unit_cost={kind: list(c) for kind, c in first.unit_cost.items()},
        n_head_before=list(first.n_head_before),
        n_query_per_kv=first.n_query_per_kv,
        head_dim=first.head_dim,
        hidden_dim=first.hidden_dim,
        kinds={kind: dict(spec) for kind, spec in first.kinds.items()},
        provenance={**{k: v for k, v in second.provenance.items() if k not in ("steps", "model_identity")},
                    "steps": steps,
                    # the composed plan applies to the model the first step was made for
                    **({"model_identity": first.provenance["model_identity"]}
                       if "model_identity" in first.provenance else {})},
    )
