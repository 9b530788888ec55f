"""Per-token KL divergence ``KL(P_ref || Q)`` over a vocabulary: the one formula every KL in the package uses.

Pure: tensors in, tensors out, float32. The probe set's mean token KL (KL selection, ``gamma: auto``), the
evaluation's KL to the dense model and the distillation loss all call :func:`summed_kl` (directly or through
:func:`token_kl`), so they measure the same quantity.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def summed_kl(reference: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0, *,
              reference_is_logprobs: bool = False) -> torch.Tensor:
    """``sum over positions of KL(P_ref || Q)``, both softened by ``temperature``, in float32.

    Args:
        reference: ``(..., V)`` reference logits, or log-probabilities with ``reference_is_logprobs``
            (then used as they are: ``temperature`` applies to ``logits`` only).
        logits: ``(..., V)`` logits of the model judged; gradients flow through them.
        temperature: softmax temperature ``tau``.

    Returns:
        a float32 scalar.
    """
    p = reference.float() if reference_is_logprobs else torch.log_softmax(reference.float() / temperature, dim=-1)
    q = torch.log_softmax(logits.float() / temperature, dim=-1)
    return (p.exp() * (p - q)).sum()


def token_kl(
    reference_logits: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    token_chunk: int = 1024,
    reference_is_logprobs: bool = False,
) -> tuple[torch.Tensor, int]:
    """Summed per-token ``KL(P_ref || Q)`` with both distributions softened by ``temperature``.

    Computed in fp32, ``token_chunk`` positions at a time, so memory stays at ``token_chunk x V``
    floats beyond the inputs. Differentiable in ``logits`` (the reference is detached), so it serves
    as the distillation loss too. The reference may live on another device (e.g. the CPU): it moves
    to the logits' device one chunk at a time.

    Args:
        reference_logits / logits: ``(..., V)`` of the same shape.
        mask: ``(...)`` bool, positions that count (default all).
        temperature: softmax temperature ``tau`` applied to both.
        reference_is_logprobs: the reference holds log-probabilities (see :func:`summed_kl`).

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
        kwargs = {"reference_is_logprobs": reference_is_logprobs}
        # with autograd, a chunk's float32 log-probs would be kept for backward (4x the logits in all):
        # recompute them in backward instead
        total = total + (checkpoint(summed_kl, *args, use_reentrant=False, **kwargs) if grad
                         else summed_kl(*args, **kwargs))
    return total, int(out.shape[0])
