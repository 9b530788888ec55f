"""The pruning plan: sorted keep indices per layer plus provenance; the only thing that cuts."""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

PLAN_FORMAT = "nirvana-lightning/plan/v2"
PLAN_FORMAT_V1 = "nirvana-lightning/plan/v1"


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
    """Which units of each kind every layer keeps (format v2).

    Attributes:
        keep: per unit kind (``self_attn``: KV groups; ``mlp``: neurons; ``q_head``: query heads at
            ``query_head`` granularity; ``cross_attn``: T5 decoder cross-attention heads, width 0 and ``[]`` in
            encoder layers), per layer, the sorted indices kept (into the layer as it was before this plan).
        width_before: per unit kind, per layer, the units the plan was made for.
        unit_cost: per unit kind, per layer, the block weights one unit owns (the family's declaration), so
            parameter counts need no model.
        n_head_before: per layer, query heads before the plan.
        n_query_per_kv: g of the model's config. head_dim: d. hidden_dim: model width.
        provenance: criterion, functional, sparsity, gamma, round_to, calibration fingerprint,
            seed, model source, library versions, realised counts, ...

    A v1 ``plan.json`` (``attention_keep`` / ``mlp_keep``, written by 0.1) is read by :meth:`from_dict`.
    """

    keep: dict[str, list[list[int]]]
    width_before: dict[str, list[int]]
    unit_cost: dict[str, list[int]]
    n_head_before: list[int]
    n_query_per_kv: int
    head_dim: int
    hidden_dim: int
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = PLAN_FORMAT

    # --------------------------------------------------------------- shapes
    @property
    def granularity(self) -> str:
        return "query_head" if "q_head" in self.keep else "group"

    @property
    def n_layer(self) -> int:
        return len(self.keep["self_attn"])

    @property
    def attention_keep(self) -> list[list[int]]:
        """Kept KV groups per layer."""
        return self.keep["self_attn"]

    @property
    def mlp_keep(self) -> list[list[int]]:
        return self.keep["mlp"]

    @property
    def n_kv_group_before(self) -> list[int]:
        return self.width_before["self_attn"]

    @property
    def mlp_dim_before(self) -> list[int]:
        return self.width_before["mlp"]

    @property
    def n_kv_group_after(self) -> list[int]:
        return [len(k) for k in self.attention_keep]

    @property
    def mlp_dim_after(self) -> list[int]:
        return [len(k) for k in self.mlp_keep]

    @property
    def n_head_after(self) -> list[int]:
        """Query heads per layer after the plan."""
        if "q_head" in self.keep:
            return [len(k) for k in self.keep["q_head"]]
        return [len(k) * h // n for k, h, n in zip(self.attention_keep, self.n_head_before, self.n_kv_group_before)]

    def head_keep(self) -> list[list[int]]:
        """Kept query heads per layer (at ``group`` granularity: every head of every kept group)."""
        if "q_head" in self.keep:
            return self.keep["q_head"]
        return [[j * (h // n) + r for j in k for r in range(h // n)]
                for k, h, n in zip(self.attention_keep, self.n_head_before, self.n_kv_group_before)]

    def attention_width_before(self, kind: str = "self_attn") -> list[int]:
        """Attention units per layer before the plan: query heads (``q_head``), or every attention block's heads
        or groups (``self_attn``, plus T5's ``cross_attn``)."""
        if kind == "q_head":
            return list(self.width_before["q_head"])
        return [sum(w) for w in zip(*(self.width_before[k] for k in ("self_attn", "cross_attn") if k in self.keep))]

    def widths_after(self) -> list[tuple[int, int, int]]:
        """Per layer ``(KV groups, query heads, MLP neurons)`` after the plan."""
        return list(zip(self.n_kv_group_after, self.n_head_after, self.mlp_dim_after))

    def _block_params(self, counts: dict[str, list[int]]) -> int:
        return sum(n * c for kind, per_layer in counts.items() for n, c in zip(per_layer, self.unit_cost[kind]))

    @property
    def block_params_before(self) -> int:
        """Block linear weights (q, k, v, o, gate, up, down) before the plan (biases excluded)."""
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
            raise ValueError(f"plan format {self.format!r}; this version reads {PLAN_FORMAT!r} and {PLAN_FORMAT_V1!r}")
        # the schema: types first, so no check below meets a None, a string or a bare number
        if not isinstance(self.provenance, dict):
            raise ValueError(f"plan provenance is {self.provenance!r}, not a mapping")
        identity = self.provenance.get("model_identity")
        if identity is not None and not isinstance(identity, dict):
            raise ValueError(f"plan provenance.model_identity is {identity!r}, not a mapping")
        for name, table, nested in (("keep", self.keep, True), ("width_before", self.width_before, False),
                                    ("unit_cost", self.unit_cost, False)):
            if not isinstance(table, dict):
                continue  # named with the expected kinds below
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
        for name, table in (("keep", self.keep), ("width_before", self.width_before), ("unit_cost", self.unit_cost)):
            if not isinstance(table, dict) or set(table) not in [set(k) for k in UNIT_KINDS.values()]:
                raise ValueError(f"plan {name} has unit kinds {sorted(table) if isinstance(table, dict) else table!r}; "
                                 f"expected one of {[list(k) for k in UNIT_KINDS.values()]}")
        if not set(self.keep) == set(self.width_before) == set(self.unit_cost):
            raise ValueError("plan keep, width_before and unit_cost name different unit kinds")
        for kind, rows in self.keep.items():
            for i, row in enumerate(rows):
                bad = [x for x in row if not _is_int(x)]
                if bad:
                    raise ValueError(f"plan layer {i}: keep[{kind!r}] holds {bad[0]!r}, not an integer index")
        for name, table in (("width_before", self.width_before), ("unit_cost", self.unit_cost),
                            ("n_head_before", {"": self.n_head_before})):
            for kind, seq in table.items():
                # a kind some layers lack (T5's cross-attention in encoder blocks) has width and cost 0 there
                bad = [x for x in seq if not _is_int(x) or x < (0 if kind in OPTIONAL_KINDS else 1)]
                if bad:
                    raise ValueError(f"plan {name}{f'[{kind!r}]' if kind else ''} holds {bad[0]!r}, not a "
                                     "positive integer")
        n = self.n_layer
        for kind in self.keep:
            for name, seq in ((f"keep[{kind!r}]", self.keep[kind]), (f"width_before[{kind!r}]", self.width_before[kind]),
                              (f"unit_cost[{kind!r}]", self.unit_cost[kind])):
                if len(seq) != n:
                    raise ValueError(f"plan has {n} layers of keep['self_attn'] but {len(seq)} of {name}")
        if len(self.n_head_before) != n:
            raise ValueError(f"plan has {n} layers of keep['self_attn'] but {len(self.n_head_before)} of n_head_before")
        for i in range(n):
            for kind in self.keep:
                keep, width = self.keep[kind][i], self.width_before[kind][i]
                if kind in OPTIONAL_KINDS and width == 0:
                    if keep or self.unit_cost[kind][i]:
                        raise ValueError(f"plan layer {i}: {kind} has no unit before the plan but keeps {keep} at "
                                         f"unit cost {self.unit_cost[kind][i]}")
                    continue
                if not keep:
                    raise ValueError(f"plan layer {i}: {kind} keeps no unit")
                if list(keep) != sorted(set(keep)):
                    raise ValueError(f"plan layer {i}: {kind} keep indices are not sorted and unique")
                if keep[0] < 0 or keep[-1] >= width:
                    raise ValueError(f"plan layer {i}: {kind} keep index out of range [0, {width})")
            n_kv, n_head = self.n_kv_group_before[i], self.n_head_before[i]
            if n_head % n_kv:
                raise ValueError(f"plan layer {i}: {n_head} query heads do not split into {n_kv} KV groups")
            if "q_head" in self.keep:
                g = n_head // n_kv
                if self.width_before["q_head"][i] != n_head:
                    raise ValueError(f"plan layer {i}: width_before['q_head'] is {self.width_before['q_head'][i]}, "
                                     f"n_head_before {n_head}")
                per_group: dict[int, int] = {}
                for j in self.keep["q_head"][i]:
                    per_group[j // g] = per_group.get(j // g, 0) + 1
                if sorted(per_group) != list(self.attention_keep[i]) or len(set(per_group.values())) != 1:
                    raise ValueError(f"plan layer {i}: kept query heads {self.keep['q_head'][i]} must fill the kept KV "
                                     f"groups {self.attention_keep[i]} with the same number of heads each (g={g})")

    # ------------------------------------------------------------- summary
    def table(self) -> str:
        """A per-layer markdown table."""
        cross = "cross_attn" in self.keep  # T5: layers 0..L-1 are encoder blocks, then decoder blocks
        rows = ["| layer | KV groups kept | query heads kept | attention kept | " + ("cross heads kept | " if cross else "")
                + "MLP neurons kept | MLP kept |", "|---|---|---|---|---|---|" + ("---|" if cross else "")]
        for r in allocation_rows(self):
            extra = (f"{r['cross_heads_kept']}/{r['cross_heads']} | " if r["cross_heads"] else "- | ") if cross else ""
            rows.append(f"| {r['layer']} | {r['kv_groups_kept']}/{r['kv_groups']} | "
                        f"{r['query_heads_kept']}/{r['query_heads']} | {r['attention_kept']:.0%} | {extra}"
                        f"{r['mlp_neurons_kept']}/{r['mlp_neurons']} | {r['mlp_kept']:.0%} |")
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
        """A plan from its dict; v1 dicts (0.1's ``attention_keep`` / ``mlp_keep``) are converted."""
        if not isinstance(data, dict):
            raise ValueError(f"not a pruning plan: a {type(data).__name__}, not a mapping")
        if data.get("format") == PLAN_FORMAT_V1:
            data = _from_v1(data)
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
        for kind in ("q_head", "cross_attn"):
            if kind in self.keep:
                core.append(self.keep[kind])
        return hashlib.sha256(json.dumps(core).encode()).hexdigest()[:16]


#: unit kinds a plan holds: per attention granularity, and for encoder-decoders (T5: cross-attention heads too)
UNIT_KINDS = {"group": ("self_attn", "mlp"), "query_head": ("self_attn", "q_head", "mlp"),
              "encoder_decoder": ("self_attn", "cross_attn", "mlp")}
#: kinds that some layers do not have (width 0 there: T5's encoder blocks have no cross-attention)
OPTIONAL_KINDS = ("cross_attn",)


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A v1 plan dict (0.1) in v2 form: the same units, the unit costs 0.1's formula used."""
    try:
        g, d, hidden = data["n_query_per_kv"], data["head_dim"], data["hidden_dim"]
        n_kv, mlp = data["n_kv_group_before"], data["mlp_dim_before"]
        return {
            "keep": {"self_attn": data["attention_keep"], "mlp": data["mlp_keep"]},
            "width_before": {"self_attn": n_kv, "mlp": mlp},
            "unit_cost": {"self_attn": [2 * (g + 1) * d * hidden] * len(n_kv), "mlp": [3 * hidden] * len(mlp)},
            "n_head_before": [n * g for n in n_kv],
            "n_query_per_kv": g, "head_dim": d, "hidden_dim": hidden,
            "provenance": data.get("provenance", {}), "format": PLAN_FORMAT,
        }
    except (KeyError, TypeError) as err:
        raise ValueError(f"not a v1 pruning plan: {err!r}") from err


def as_query_heads(plan: PruningPlan) -> PruningPlan:
    """The same cut written at ``query_head`` granularity (the heads of every kept group kept; a KV group's unit
    cost is its k and v rows, each head's its q rows and o columns)."""
    if "q_head" in plan.keep:
        return plan
    d, hidden = plan.head_dim, plan.hidden_dim
    return dataclasses.replace(
        plan,
        keep={"self_attn": plan.attention_keep, "q_head": plan.head_keep(), "mlp": plan.mlp_keep},
        width_before={"self_attn": plan.n_kv_group_before, "q_head": list(plan.n_head_before), "mlp": plan.mlp_dim_before},
        unit_cost={"self_attn": [2 * d * hidden] * plan.n_layer, "q_head": [2 * d * hidden] * plan.n_layer,
                   "mlp": plan.unit_cost["mlp"]},
    )


def allocation_rows(plan: PruningPlan) -> list[dict]:
    """Per layer: kept / original KV groups, query heads and MLP neurons, and the kept fractions (attention:
    of the query heads, which carry the q/o weights and the attention compute); with cross-attention (T5's
    decoder) its kept / original heads too."""
    rows = [
        {"layer": i, "kv_groups_kept": a, "kv_groups": ab, "query_heads_kept": h, "query_heads": hb,
         "mlp_neurons_kept": m, "mlp_neurons": mb, "attention_kept": h / hb, "mlp_kept": m / mb}
        for i, (a, ab, h, hb, m, mb) in enumerate(zip(plan.n_kv_group_after, plan.n_kv_group_before,
                                                      plan.n_head_after, plan.n_head_before,
                                                      plan.mlp_dim_after, plan.mlp_dim_before))
    ]
    if "cross_attn" in plan.keep:
        for row, kept, width in zip(rows, plan.keep["cross_attn"], plan.width_before["cross_attn"]):
            row.update({"cross_heads_kept": len(kept), "cross_heads": width})
    return rows


def compose_plans(first: PruningPlan, second: PruningPlan) -> PruningPlan:
    """The single plan equivalent to applying ``first`` and then ``second``.

    ``second`` indexes into the model as ``first`` left it; the result indexes into the model
    ``first`` was made for: ``keep[kind][i] = first.keep[kind][i][second.keep[kind][i]]``. When either
    step is at ``query_head`` granularity both are written at it first. Provenance: the second's, plus
    ``steps`` (the provenance of every step, oldest first).

    Raises:
        ValueError: when ``second`` was not made for the widths ``first`` produces.
    """
    first.validate()
    second.validate()
    if "q_head" in first.keep or "q_head" in second.keep:
        first, second = as_query_heads(first), as_query_heads(second)
    if (set(first.keep) != set(second.keep)
            or any(second.width_before[kind] != [len(k) for k in first.keep[kind]] for kind in first.keep)
            or second.n_kv_group_before != first.n_kv_group_after or second.mlp_dim_before != first.mlp_dim_after
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
        provenance={**{k: v for k, v in second.provenance.items() if k not in ("steps", "model_identity")},
                    "steps": steps,
                    # the composed plan applies to the model the first step was made for
                    **({"model_identity": first.provenance["model_identity"]}
                       if "model_identity" in first.provenance else {})},
    )
