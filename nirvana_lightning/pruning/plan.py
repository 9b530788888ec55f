"""The pruning plan: sorted keep indices per layer plus provenance; the only thing that cuts."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

PLAN_FORMAT = "nirvana-lightning/plan/v1"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a plan depends on."""
    out = {"python": platform.python_version()}
    for name in ("nirvana-lightning", "torch", "transformers", "lightning", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class PruningPlan:
    """Which KV groups and MLP neurons each layer keeps.

    Attributes:
        attention_keep: per layer, sorted KV-group indices kept (indices into the layer as it was
            before this plan).
        mlp_keep: per layer, sorted neuron indices kept.
        n_kv_group_before / mlp_dim_before: per-layer widths the plan was made for.
        n_query_per_kv: g. head_dim: d. hidden_dim: model width.
        provenance: criterion, functional, sparsity, gamma, round_to, calibration fingerprint,
            seed, model source, library versions, realised counts, ...
    """

    attention_keep: list[list[int]]
    mlp_keep: list[list[int]]
    n_kv_group_before: list[int]
    mlp_dim_before: list[int]
    n_query_per_kv: int
    head_dim: int
    hidden_dim: int
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = PLAN_FORMAT

    # --------------------------------------------------------------- shapes
    @property
    def n_layer(self) -> int:
        return len(self.attention_keep)

    @property
    def n_kv_group_after(self) -> list[int]:
        return [len(k) for k in self.attention_keep]

    @property
    def mlp_dim_after(self) -> list[int]:
        return [len(k) for k in self.mlp_keep]

    def _block_params(self, n_kv_group: list[int], mlp_dim: list[int]) -> int:
        attn = 2 * (self.n_query_per_kv + 1) * self.head_dim * self.hidden_dim
        return sum(attn * a + 3 * self.hidden_dim * m for a, m in zip(n_kv_group, mlp_dim))

    @property
    def block_params_before(self) -> int:
        """Block linear weights (q, k, v, o, gate, up, down) before the plan (biases excluded)."""
        return self._block_params(self.n_kv_group_before, self.mlp_dim_before)

    @property
    def block_params_after(self) -> int:
        return self._block_params(self.n_kv_group_after, self.mlp_dim_after)

    @property
    def realised_sparsity(self) -> float:
        return 1 - self.block_params_after / self.block_params_before

    def validate(self) -> None:
        """Check internal consistency; errors name the layer."""
        if self.format != PLAN_FORMAT:
            raise ValueError(f"plan format {self.format!r}; this version reads {PLAN_FORMAT!r}")
        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        for name, value in (("n_query_per_kv", self.n_query_per_kv), ("head_dim", self.head_dim),
                            ("hidden_dim", self.hidden_dim)):
            if not is_int(value) or value < 1:
                raise ValueError(f"plan {name} is {value!r}, not a positive integer")
        for name, rows in (("attention_keep", self.attention_keep), ("mlp_keep", self.mlp_keep)):
            for i, row in enumerate(rows):
                bad = [x for x in row if not is_int(x)]
                if bad:
                    raise ValueError(f"plan layer {i}: {name} holds {bad[0]!r}, not an integer index")
        for name, seq in (("n_kv_group_before", self.n_kv_group_before), ("mlp_dim_before", self.mlp_dim_before)):
            bad = [x for x in seq if not is_int(x)]
            if bad:
                raise ValueError(f"plan {name} holds {bad[0]!r}, not an integer width")
        n = self.n_layer
        for name, seq in (("mlp_keep", self.mlp_keep), ("n_kv_group_before", self.n_kv_group_before),
                          ("mlp_dim_before", self.mlp_dim_before)):
            if len(seq) != n:
                raise ValueError(f"plan has {n} layers of attention_keep but {len(seq)} of {name}")
        for i in range(n):
            for kind, keep, width in (("attention", self.attention_keep[i], self.n_kv_group_before[i]),
                                      ("mlp", self.mlp_keep[i], self.mlp_dim_before[i])):
                if not keep:
                    raise ValueError(f"plan layer {i}: {kind} keeps no unit")
                if list(keep) != sorted(set(keep)):
                    raise ValueError(f"plan layer {i}: {kind} keep indices are not sorted and unique")
                if keep[0] < 0 or keep[-1] >= width:
                    raise ValueError(f"plan layer {i}: {kind} keep index out of range [0, {width})")

    # ------------------------------------------------------------- summary
    def table(self) -> str:
        """A per-layer markdown table."""
        rows = ["| layer | KV groups kept | attention kept | MLP neurons kept | MLP kept |", "|---|---|---|---|---|"]
        for r in allocation_rows(self):
            rows.append(f"| {r['layer']} | {r['kv_groups_kept']}/{r['kv_groups']} | {r['attention_kept']:.0%} | "
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
        """A short hash of the keep indices (not the provenance): equal plans, equal fingerprints."""
        import hashlib

        core = json.dumps([self.attention_keep, self.mlp_keep, self.n_kv_group_before, self.mlp_dim_before])
        return hashlib.sha256(core.encode()).hexdigest()[:16]


def allocation_rows(plan: PruningPlan) -> list[dict]:
    """Per layer: kept / original KV groups and MLP neurons, and the kept fractions."""
    return [
        {"layer": i, "kv_groups_kept": a, "kv_groups": ab, "mlp_neurons_kept": m, "mlp_neurons": mb,
         "attention_kept": a / ab, "mlp_kept": m / mb}
        for i, (a, ab, m, mb) in enumerate(zip(plan.n_kv_group_after, plan.n_kv_group_before,
                                               plan.mlp_dim_after, plan.mlp_dim_before))
    ]


def compose_plans(first: PruningPlan, second: PruningPlan) -> PruningPlan:
    """The single plan equivalent to applying ``first`` and then ``second``.

    ``second`` indexes into the model as ``first`` left it; the result indexes into the model
    ``first`` was made for: ``keep[i] = first.keep[i][second.keep[i]]``. Provenance: the
    second's, plus ``steps`` (the provenance of every step, oldest first).

    Raises:
        ValueError: when ``second`` was not made for the widths ``first`` produces.
    """
    first.validate()
    second.validate()
    if (second.n_kv_group_before != first.n_kv_group_after or second.mlp_dim_before != first.mlp_dim_after
            or (second.n_query_per_kv, second.head_dim, second.hidden_dim)
            != (first.n_query_per_kv, first.head_dim, first.hidden_dim)):
        raise ValueError("the second plan was not made for the widths the first one leaves")
    steps = list(first.provenance.get("steps") or [first.provenance])
    steps.append({k: v for k, v in second.provenance.items() if k != "steps"})
    return PruningPlan(
        attention_keep=[[a[j] for j in b] for a, b in zip(first.attention_keep, second.attention_keep)],
        mlp_keep=[[a[j] for j in b] for a, b in zip(first.mlp_keep, second.mlp_keep)],
        n_kv_group_before=list(first.n_kv_group_before),
        mlp_dim_before=list(first.mlp_dim_before),
        n_query_per_kv=first.n_query_per_kv,
        head_dim=first.head_dim,
        hidden_dim=first.hidden_dim,
        provenance={**{k: v for k, v in second.provenance.items() if k not in ("steps", "model_identity")},
                    "steps": steps,
                    # the composed plan applies to the model the first step was made for
                    **({"model_identity": first.provenance["model_identity"]}
                       if "model_identity" in first.provenance else {})},
    )
