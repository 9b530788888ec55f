"""Mean per-token KL divergence from a reference (dense) model to a model (pruned / recovered)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.sft import IGNORE_INDEX
from ..families import get_family


def token_kl(
    reference_logits: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    token_chunk: int = 1024,
) -> tuple[torch.Tensor, int]:
    """Summed per-token ``KL(P_ref || Q)`` with both distributions softened by ``temperature``.

    Pure: tensors in, tensors out. Computed in fp32, ``token_chunk`` positions at a time, so
    memory stays at ``token_chunk x V`` floats beyond the inputs. Differentiable in ``logits``
    (the reference is detached), so it serves as the distillation loss too.

    Args:
        reference_logits / logits: ``(..., V)`` of the same shape.
        mask: ``(...)`` bool, positions that count (default all).
        temperature: softmax temperature ``tau`` applied to both.

    Returns:
        ``(sum of KL over counted positions, number of counted positions)``.
    """
    if reference_logits.shape != logits.shape:
        raise ValueError(f"reference logits {tuple(reference_logits.shape)} vs logits {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    ref = reference_logits.detach().reshape(-1, vocab)
    out = logits.reshape(-1, vocab)
    if mask is not None:
        keep = mask.reshape(-1).to(out.device).bool()
        ref, out = ref[keep.to(ref.device)], out[keep]
    total = out.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and out.requires_grad
    for s in range(0, out.shape[0], token_chunk):
        args = (ref[s:s + token_chunk].to(out.device), out[s:s + token_chunk], temperature)
        # with autograd, a chunk's float32 log-probs would be kept for backward (4x the logits in all):
        # recompute them in backward instead
        total = total + (checkpoint(_chunk_kl, *args, use_reentrant=False) if grad else _chunk_kl(*args))
    return total, int(out.shape[0])


def _chunk_kl(ref: torch.Tensor, out: torch.Tensor, temperature: float) -> torch.Tensor:
    p = torch.log_softmax(ref.float() / temperature, dim=-1)
    q = torch.log_softmax(out.float() / temperature, dim=-1)
    return (p.exp() * (p - q)).sum()


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
