"""KL-divergence selection of calibration data (docs/method.md section 5).

Each candidate calibration set is scored and allocated into a plan; the plan is evaluated by
masking (no copy of the model, weights untouched); the candidate whose pruned model has the
lowest mean per-token KL(P_dense || Q_pruned) on a probe set disjoint from every candidate wins.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from tqdm.auto import tqdm

from ..data.sft import IGNORE_INDEX
from ..errors import ConfigError
from ..families import get_family, unwrap_model
from .api import make_plan
from .gradients import fingerprint
from .plan import PruningPlan
from .settings import PruningTarget, Scoring, from_flat
from .surgery import masked_units

#: a window's origin: (stream name, start offset, length)
Span = tuple[str, int, int]


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


def check_disjoint(candidates: Sequence[torch.Tensor], probe: torch.Tensor,
                   candidate_spans: Sequence[Sequence[Span]] | None = None,
                   probe_spans: Sequence[Span] | None = None, ngram: int = 32) -> None:
    """Raise if the probe overlaps any candidate.

    With spans (window origins), any shared token position of the same stream is an overlap.
    Without them, and in addition, any ``ngram``-token sequence shared by a probe window and a
    candidate window is treated as an overlap (windows cut from overlapping text share one).
    """
    if candidate_spans is not None and probe_spans is not None:
        for c, spans in enumerate(candidate_spans):
            for stream, start, length in spans:
                for p_stream, p_start, p_length in probe_spans:
                    if stream == p_stream and start < p_start + p_length and p_start < start + length:
                        raise ConfigError("probe", f"window at {p_stream}[{p_start}:{p_start + p_length}]",
                                          f"a probe disjoint from candidate {c} (it uses {stream}[{start}:{start + length}])")
    n = min(ngram, probe.shape[1], *(c.shape[1] for c in candidates))
    seen: dict[tuple[int, ...], int] = {}
    for c, cand in enumerate(candidates):
        for row in cand.tolist():
            for i in range(len(row) - n + 1):
                seen.setdefault(tuple(row[i:i + n]), c)
    for j, row in enumerate(probe.tolist()):
        for i in range(len(row) - n + 1):
            c = seen.get(tuple(row[i:i + n]))
            if c is not None:
                raise ConfigError("probe", f"window {j}", f"a probe disjoint from every candidate: it shares "
                                  f"{n} consecutive tokens with candidate {c}")


@torch.no_grad()
def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (then no check is made)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_logprob_memory(n_window: int, seq_len: int, vocab: int, available: int | None = None) -> None:
    """Refuse a probe whose dense log-probabilities (``N x T x V`` float32, kept on the CPU) exceed half the RAM."""
    need = n_window * seq_len * vocab * 4
    available = available_memory_bytes() if available is None else available
    if available is not None and need > available // 2:
        fits = max(0, available // 2 // (seq_len * vocab * 4))
        raise ConfigError("selection.probe_samples", n_window,
                          f"at most {fits}: the dense log-probabilities of {n_window} x {seq_len} tokens over "
                          f"{vocab:,} words take {need / 2**30:.1f} GiB, and half of the available memory is "
                          f"{available / 2**31:.1f} GiB (lower selection.probe_samples or selection.probe_seq_len)")


def compute_dense_logprobs(model: nn.Module, probe: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """Log-probabilities of the model on the probe, per batch, float32 on the CPU.

    Returns:
        list of ``(b, T, V)`` tensors; computed once and reused for every candidate.
    """
    device = next(model.parameters()).device
    family = get_family(model)
    out = []
    for batch in probe.split(batch_size):
        kwargs, _ = family.model_inputs(batch.to(device))  # T5: the decoder's logits on the family's pairs
        logits = model(**kwargs, use_cache=False).logits
        out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        del logits
    return out


@torch.no_grad()
def mean_token_kl(model: nn.Module, probe: torch.Tensor, dense_logprobs: list[torch.Tensor],
                  batch_size: int = 16, token_chunk: int = 1024) -> tuple[float, float]:
    """Mean per-token KL(P_dense || Q_model) and the model's probe perplexity.

    Works one batch and ``token_chunk`` positions at a time, so memory stays bounded for
    large vocabularies: at most ``token_chunk x V`` floats beyond one batch of logits.
    """
    device = next(model.parameters()).device
    kl_sum, nll_sum, n_kl, n_nll = 0.0, 0.0, 0, 0
    family = get_family(model)
    for batch, dense in zip(probe.split(batch_size), dense_logprobs):
        kwargs, aligned = family.model_inputs(batch.to(device), labels=batch.to(device))
        logits = model(**kwargs, use_cache=False).logits  # (b, T, V)
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_dense = dense.reshape(-1, dense.shape[-1])
        for s in range(0, flat_logits.shape[0], token_chunk):
            q = torch.log_softmax(flat_logits[s:s + token_chunk].float(), dim=-1)
            p = flat_dense[s:s + token_chunk].to(q.device)
            kl_sum += float((p.exp() * (p - q)).sum())
            n_kl += q.shape[0]
        scored = aligned != IGNORE_INDEX  # the positions that predict a token (all but the last of a causal window)
        targets = aligned[scored]
        nll = nn.functional.cross_entropy(logits[scored].float(), targets, reduction="sum")
        nll_sum += float(nll)
        n_nll += targets.numel()
        del logits
    return kl_sum / n_kl, math.exp(nll_sum / n_nll)


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
    check_logprob_memory(probe.shape[0], probe.shape[1], int(model.config.vocab_size))
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
