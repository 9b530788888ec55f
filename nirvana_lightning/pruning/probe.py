"""The probe set: held-out windows that judge a pruned model against the dense one (KL selection, gamma auto).

Its checks (no text shared with the calibration, the reference log-probabilities fit in memory), the dense
model's reference log-probabilities, and the mean per-token KL(P_dense || Q_model). Below the selection and
the gamma search, which both use it (and below ``api``, which checks a probe before scoring).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..data.sft import IGNORE_INDEX
from ..divergence import token_kl
from ..errors import ConfigError
from ..families import get_family

#: a window's origin: (stream name, start offset, length)
Span = tuple[str, int, int]


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
        kl, n = token_kl(dense, logits, token_chunk=token_chunk, reference_is_logprobs=True)
        kl_sum += float(kl)
        n_kl += n
        scored = aligned != IGNORE_INDEX  # the positions that predict a token (all but the last of a causal window)
        targets = aligned[scored]
        nll = nn.functional.cross_entropy(logits[scored].float(), targets, reduction="sum")
        nll_sum += float(nll)
        n_nll += targets.numel()
        del logits
    return kl_sum / n_kl, math.exp(nll_sum / n_nll)
