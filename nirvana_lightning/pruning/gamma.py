"""``gamma: auto``: the MLP-to-attention balance chosen by the KL of the pruned model to the dense one.

The paper sets gamma by hand per model (3.36 for Llama-3.1-8B). Here the unit scores are computed
once; for every gamma of a grid the allocation is redone (cheap) and the masked model's mean
per-token KL(P_dense || Q_pruned) is measured on a probe of held-out windows with the machinery of
KL calibration selection (masking, no copy of the model); the lowest KL wins (ties: the earlier
grid value). Gammas whose allocation is infeasible at the target (a fraction above 1) are skipped
and recorded. Cost: one dense pass over the probe plus one masked pass per grid value, next to
one scoring pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from .settings import GAMMA_GRID  # noqa: F401 - gamma's name since 0.2 (declared with the settings)


@dataclass
class GammaSearch:
    """The KL curve over the grid; ``kls[i]`` is None where gamma ``i`` was infeasible."""

    gammas: list[float]
    kls: list[float | None]
    perplexities: list[float | None]
    best_index: int
    seconds: float = 0.0
    infeasible: dict[str, str] = field(default_factory=dict)

    @property
    def gamma(self) -> float:
        return self.gammas[self.best_index]

    def table(self) -> str:
        rows = ["| gamma | KL(dense ‖ pruned) / token | probe perplexity |", "|---|---|---|"]
        for i, g in enumerate(self.gammas):
            mark = " (selected)" if i == self.best_index else ""
            kl = "infeasible" if self.kls[i] is None else f"{self.kls[i]:.5f}"
            ppl = "-" if self.perplexities[i] is None else f"{self.perplexities[i]:.3f}"
            rows.append(f"| {g:g}{mark} | {kl} | {ppl} |")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"method": "kl", "gammas": self.gammas, "kls": self.kls, "perplexities": self.perplexities,
                "best_index": self.best_index, "gamma": self.gamma, "seconds": round(self.seconds, 3),
                "infeasible": self.infeasible}


def search_gamma(model: nn.Module, make, probe: torch.Tensor, grid: Sequence[float],
                 batch_size: int = 16):
    """Return ``(plan, GammaSearch)``: ``make(gamma)`` allocates a plan from fixed scores (ConfigError when
    infeasible); each is evaluated by masking on ``probe`` against the dense model's log-probabilities."""
    from ..families import get_family
    from .probe import check_logprob_memory, compute_dense_logprobs, mean_token_kl
    from .surgery import masked_units

    start = time.perf_counter()
    check_logprob_memory(probe.shape[0], probe.shape[1], get_family(model).n_vocab)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            dense = compute_dense_logprobs(model, probe, batch_size)
        kls, ppls, plans, infeasible = [], [], [], {}
        for g in grid:
            try:
                plan = make(g)
            except ConfigError as err:
                kls.append(None), ppls.append(None), plans.append(None)
                infeasible[f"{g:g}"] = str(err)
                continue
            with masked_units(model, plan):
                kl, ppl = mean_token_kl(model, probe, dense, batch_size)
            kls.append(kl), ppls.append(ppl), plans.append(plan)
    finally:
        model.train(was_training)
    feasible = [i for i, kl in enumerate(kls) if kl is not None and math.isfinite(kl)]
    if not feasible:
        raise ConfigError("target.gamma", "auto", f"a target some gamma of {list(grid)} can reach ({infeasible})")
    best = min(feasible, key=lambda i: (kls[i], i))
    search = GammaSearch([float(g) for g in grid], kls, ppls, best, time.perf_counter() - start, infeasible)
    plan = plans[best]
    from .gradients import fingerprint

    plan.provenance.update({"gamma_mode": "auto", "gamma_search": {**search.to_dict(), "probe_shape": list(probe.shape),
                                                                   "probe_fingerprint": fingerprint([probe])}})
    return plan, search
