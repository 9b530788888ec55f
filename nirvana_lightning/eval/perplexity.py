"""Perplexity: exp of the mean next-token NLL over every labelled token."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..data.sft import IGNORE_INDEX
from ..data.text import leading_bos
from ..recovery.objectives import lm_loss


@torch.no_grad()
def compute_perplexity(model: nn.Module, batches: Iterable[dict], device: torch.device | str | None = None) -> float:
    """Perplexity of ``model`` over batches (token-weighted, not batch-averaged).

    Returns:
        ``exp(sum of token NLL / number of tokens)``.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, n = lm_loss(model, batch)
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no labelled tokens to compute perplexity on")
    return math.exp(total / count)


def build_text_windows(token_ids: list[int] | torch.Tensor, seq_len: int, stride: int | None = None,
                       bos: int | None = None) -> list[dict]:
    """Windows over one token stream for sliding-window perplexity.

    Each window holds ``seq_len`` tokens starting at a multiple of ``stride`` (default
    ``seq_len``: disjoint windows). A window's labels are -100 on the positions an earlier
    window already scored, so no token is scored twice, and with ``stride < seq_len`` each
    scored token sees at least ``seq_len - stride`` tokens of left context. A window's first
    token is context only (as in HF's sliding-window recipe), so disjoint windows score
    ``seq_len - 1`` tokens each; ``stride = seq_len - 1`` scores every token after the first.
    With ``bos`` (:func:`~nirvana_lightning.data.text.leading_bos`), that context-only first token is
    replaced by BOS.

    Returns:
        list of ``{"input_ids": (1, t), "labels": (1, t)}`` with ``t <= seq_len``.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    stride = stride or seq_len
    if seq_len < 2 or not 0 < stride <= seq_len:
        raise ValueError(f"need seq_len >= 2 and 0 < stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    windows, scored_until = [], 1  # targets are positions 1..n-1; position p is scored in the window holding p
    for begin in range(0, max(1, ids.numel() - 1), stride):
        end = min(begin + seq_len, ids.numel())
        if end <= scored_until:
            continue
        x = ids[begin:end].clone()
        labels = x.clone()
        if bos is not None:
            x[0] = bos
        # HF shifts labels: label at position j is the target predicted from position j-1
        n_old = max(0, scored_until - begin)
        labels[: max(1, n_old)] = IGNORE_INDEX
        windows.append({"input_ids": x[None], "labels": labels[None]})
        scored_until = end
        if end == ids.numel():
            break
    return windows


def compute_text_perplexity(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    *,
    seq_len: int = 256,
    stride: int | None = None,
    max_tokens: int | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Perplexity of ``model`` over plain texts.

    The texts are joined with the tokenizer's EOS token, tokenised once, optionally truncated
    to ``max_tokens`` and cut into windows by :func:`build_text_windows`.

    Returns:
        ``exp(mean next-token NLL)`` over every token after the first.
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for piece in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(piece)
        if eos is not None:
            ids.append(eos)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("need at least two tokens of text to compute perplexity")
    return compute_perplexity(model, build_text_windows(ids, seq_len, stride, leading_bos(tokenizer)), device=device)
