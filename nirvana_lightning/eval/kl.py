"""Mean per-token KL divergence from a reference (dense) model to a model (pruned / recovered)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..data.sft import IGNORE_INDEX
from ..divergence import token_kl  # noqa: F401 - eval's name since 0.2
from ..families import get_family


def target_mask(batch: dict) -> torch.Tensor:
    """Positions whose next-token prediction counts: those predicting a labelled token."""
    labels = batch.get("labels")
    if labels is None:
        mask = torch.ones_like(batch["input_ids"], dtype=torch.bool)
        mask[:, -1] = False
        return mask
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


@torch.no_grad()
def compute_kl(
    model: nn.Module,
    reference: nn.Module,
    batches: Iterable[dict],
    *,
    device: torch.device | str | None = None,
    reference_device: torch.device | str | None = None,
    token_chunk: int = 1024,
) -> float:
    """Mean per-token ``KL(P_reference || Q_model)`` over the batches' scored positions.

    A position counts when the token it predicts is labelled (``labels != -100``; every
    position but the last without labels), the same tokens perplexity averages over. The
    reference may live on another device (e.g. a dense copy kept on the CPU); its logits are
    moved to the model's device one chunk at a time.

    Returns:
        the mean KL in nats per token (0 when the models agree).
    """
    device = device or next(model.parameters()).device
    reference_device = reference_device or next(reference.parameters()).device
    modes = model.training, reference.training
    model.eval()
    reference.eval()
    total, count = 0.0, 0
    try:
        family = get_family(model)
        for batch in batches:
            # the family's view: a causal LM's next-token positions, or T5's decoder positions of its pairs
            kwargs, labels = family.model_inputs(batch["input_ids"], batch.get("attention_mask"),
                                                 batch.get("labels", batch["input_ids"]))
            ref_logits = reference(**{k: v.to(reference_device) for k, v in kwargs.items()}, use_cache=False).logits
            logits = model(**{k: v.to(device) for k, v in kwargs.items()}, use_cache=False).logits
            kl, n = token_kl(ref_logits, logits, labels != IGNORE_INDEX, token_chunk=token_chunk)
            total += float(kl)
            count += n
            del ref_logits, logits
    finally:
        model.train(modes[0])
        reference.train(modes[1])
    if count == 0:
        raise ValueError("no scored positions to compute KL on")
    return total / count
