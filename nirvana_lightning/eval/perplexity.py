"""Perplexity: exp of the mean next-token NLL over every labelled token."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..data.sft import IGNORE_INDEX


def lm_loss_and_count(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Mean next-token loss of a batch and the number of tokens it averages over.

    ``batch`` holds ``input_ids``, ``labels`` (-100 where ignored) and optionally
    ``attention_mask``, all ``(B, T)``. The model shifts labels internally (HF convention).
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
    n_token = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return out.loss, n_token


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
            loss, n = lm_loss_and_count(model, batch)
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no labelled tokens to compute perplexity on")
    return math.exp(total / count)
