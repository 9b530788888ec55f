"""KL-divergence selection of calibration data (docs/method.md section 5).

Each candidate calibration set is scored and allocated into a plan; the plan is evaluated by
masking (no copy of the model, weights untouched); the candidate whose pruned model has the
lowest mean per-token KL(P_dense || Q_pruned) on a probe set disjoint from every candidate wins.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..families import get_family, unwrap_model
from .api import make_plan
from .gradients import fingerprint
from .plan import PruningPlan
from .probe import (  # noqa: F401 - selection's names since 0.2
    Span,
    available_memory_bytes,
    check_disjoint,
    check_logprob_memory,
    compute_dense_logprobs,
    mean_token_kl,
)
from .settings import PruningTarget, Scoring, from_flat
from .surgery import masked_units


@dataclass
class SelectionResult:
    """Outcome of :func:`select_calibration`; lists are in candidate order."""

    kls: list[float]
    best_index: int
    plan: PruningPlan
    perplexities: list[float] | None = None
    fingerprints: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    plans: list[PruningPlan] = field(default_factory=list)  # every candidate's plan, for analysis

    def table(self) -> str:
        rows = ["| candidate | calibration fingerprint | KL(dense ‖ pruned) / token | probe perplexity | seconds |",
                "|---|---|---|---|---|"]
        for i, kl in enumerate(self.kls):
            ppl = f"{self.perplexities[i]:.3f}" if self.perplexities else "-"
            mark = " (selected)" if i == self.best_index else ""
            rows.append(f"| {i}{mark} | {self.fingerprints[i]} | {kl:.5f} | {ppl} | {self.seconds[i]:.1f} |")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"method": "kl", "kls": self.kls, "best_index": self.best_index, "perplexities": self.perplexities,
                "fingerprints": self.fingerprints, "seconds": self.seconds,
                "winner_fingerprint": self.fingerprints[self.best_index]}


def select_calibration(
    model: nn.Module,
    candidates: Sequence[torch.Tensor],
    probe: torch.Tensor,
    target: PruningTarget | None = None,
    scoring: Scoring | None = None,
    *,
    candidate_spans: Sequence[Sequence[Span]] | None = None,
    probe_spans: Sequence[Span] | None = None,
    probe_batch_size: int = 16,
    progress: bool = True,
    counts: tuple[int, int] | None = None,
    **flat,
) -> SelectionResult:
    """Pick the calibration candidate whose pruned model stays closest to the dense model.

    Args:
        model: the dense model (left bit-identical: candidates are evaluated by masking).
        candidates: LongTensors ``(N, T)`` of token ids, one per candidate.
        probe: LongTensor ``(P, T_probe)``, disjoint from every candidate (checked).
        target / scoring / counts / flat (0.1's keywords): as :func:`make_plan`.
        candidate_spans / probe_spans: window origins, for an exact disjointness check.
        probe_batch_size: probe windows per forward pass.

    Returns:
        :class:`SelectionResult`; ``plan`` is the winner's (not applied) with the selection in
        its provenance.
    """
    target, scoring = from_flat(target, scoring, flat, "select_calibration")
    if len(candidates) < 1:
        raise ConfigError("selection.num_candidates", len(candidates), "at least 1 candidate")
    check_disjoint(candidates, probe, candidate_spans, probe_spans)
    model = unwrap_model(model)
    check_logprob_memory(probe.shape[0], probe.shape[1], get_family(model).n_vocab)
    was_training = model.training
    model.eval()
    dense = compute_dense_logprobs(model, probe, probe_batch_size)
    kls, ppls, plans, fps, secs = [], [], [], [], []
    for i, cand in enumerate(tqdm(candidates, desc="KL calibration selection", disable=not progress)):
        start = time.perf_counter()
        # gamma 'auto': each candidate's own gamma, searched on the same probe
        plan = make_plan(model, cand, target, scoring, probe=probe if target.gamma == "auto" else None,
                         counts=counts)
        model.eval()
        with masked_units(model, plan):
            kl, ppl = mean_token_kl(model, probe, dense, probe_batch_size)
        kls.append(kl)
        ppls.append(ppl)
        plans.append(plan)
        fps.append(fingerprint([cand]))
        secs.append(time.perf_counter() - start)
        rank_zero_info(f"candidate {i}: KL {kl:.5f}, probe perplexity {ppl:.3f}")
    model.train(was_training)
    best = min(range(len(kls)), key=lambda i: (kls[i], i))
    result = SelectionResult(kls, best, plans[best], ppls, fps, secs, plans)
    result.plan.provenance["selection"] = result.to_dict()
    return result
