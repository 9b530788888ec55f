"""Recovery objectives without (B, T, V) logits: next-token loss and distillation from hidden states.

A causal LM's logits for a batch of 4 x 1024 tokens over a 152k vocabulary are 1.2 GiB in bf16 and
2.3 GiB more in their float32 upcast, and autograd keeps both for backward. Here the model runs
with its LM head replaced by the identity (so the family's forward, peft wrappers and FSDP's
unsharding all run as usual and return hidden states), and the head is applied ``chunk`` positions
at a time inside :func:`torch.utils.checkpoint.checkpoint`: backward recomputes a chunk's logits
instead of keeping them, so the peak is one chunk of logits whatever the sequence length.

The results equal the model's own loss (HF's shift-by-one cross-entropy, float32 logits, mean
over labelled tokens) up to summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.sft import IGNORE_INDEX
from ..divergence import summed_kl
from ..families import get_family

#: positions per chunk of logits (x vocabulary x 4 bytes is the extra memory)
DEFAULT_CHUNK = 1024


@contextmanager
def _head_as_identity(head: nn.Module) -> Iterator[None]:
    previous = head.__dict__.get("forward")
    head.forward = lambda hidden, *args, **kwargs: hidden
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, nn.Module]:
    """Final hidden states through the model's own forward on ``inputs`` (the keyword arguments
    :meth:`~nirvana_lightning.families.base.ModelFamily.model_inputs` builds), and its LM head module: ``(B, T, H)``
    for a causal LM; for an encoder-decoder (T5) the decoder's, one per predicted token of the family's pairs."""
    family = get_family(model)
    head = family.lm_head()
    with _head_as_identity(head), family.raw_logits():
        out = model(**inputs, use_cache=False)
    hidden = out.logits if hasattr(out, "logits") else out[0]
    if hidden.shape[-1] != head.in_features:
        raise RuntimeError(f"{type(model).__name__} applies something after its LM head; the chunked loss "
                           "cannot reproduce it (use the family's own loss)")
    return hidden, head


#: what the family's forward applies after its LM head (:meth:`~nirvana_lightning.families.base.ModelFamily.finalize_logits`)
Finalize = Callable[[torch.Tensor], torch.Tensor]


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            finalize: Finalize | None) -> torch.Tensor:
    """The family's logits from hidden states, float32 (``finalize``: e.g. Gemma's soft-capping, as its forward does)."""
    logits = nn.functional.linear(hidden, weight, bias).float()
    return logits if finalize is None else finalize(logits)


def _ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
            finalize: Finalize | None = None) -> torch.Tensor:
    logits = _logits(hidden, weight, bias, finalize)
    return nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                    chunk: int = DEFAULT_CHUNK, finalize: Finalize | None = None) -> tuple[torch.Tensor, int]:
    """``(sum of NLL, number of labelled tokens)`` from hidden states, ``chunk`` positions at a time; ``labels``
    are aligned with the positions (``hidden[:, t]`` predicts ``labels[:, t]``: ``ModelFamily.model_inputs``);
    ``finalize`` is the family's :meth:`~nirvana_lightning.families.base.ModelFamily.finalize_logits`."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        args = (h[s:s + chunk], head.weight, head.bias, y[s:s + chunk], finalize)
        total = total + (checkpoint(_ce_sum, *args, use_reentrant=False) if torch.is_grad_enabled() else _ce_sum(*args))
    return total, int(h.shape[0])


def lm_loss(model: nn.Module, batch: dict, chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over labelled tokens and their number (NaN when none is labelled, as in HF)."""
    family = get_family(model)
    inputs, labels = family.model_inputs(batch["input_ids"], batch.get("attention_mask"), batch["labels"])
    hidden, head = hidden_states(model, inputs)
    total, n = chunked_lm_loss(hidden, head, labels, chunk, family.finalize_logits)
    return total / n if n else total * float("nan"), n


def _kd_terms(h: torch.Tensor, weight, bias, t: torch.Tensor, t_weight, t_bias, y: torch.Tensor,
              temperature: float, with_lm: bool, finalize: Finalize | None = None,
              t_finalize: Finalize | None = None) -> torch.Tensor:
    logits = _logits(h, weight, bias, finalize)
    with torch.no_grad():
        t_logits = _logits(t, t_weight, t_bias, t_finalize)
    kl = summed_kl(t_logits, logits, temperature)
    ce = nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum") if with_lm \
        else kl.new_zeros(())
    return torch.stack([kl, ce])


def distillation_loss(model: nn.Module, teacher: nn.Module, batch: dict, *, temperature: float = 1.0,
                      alpha: float = 1.0, chunk: int = DEFAULT_CHUNK) -> dict[str, torch.Tensor | int]:
    """``alpha * tau^2 * KL(teacher_tau || student_tau) + (1 - alpha) * LM``, per labelled token.

    Teacher and student logits exist one chunk at a time (backward recomputes the chunk, the
    teacher's head included); the LM term is not computed when ``alpha`` is 1. The teacher may
    live on another device: its final hidden states and its head weight move, never its logits.

    Returns:
        ``{"loss", "kd", "lm" (None when alpha is 1), "n_token"}``.
    """
    # one view of the batch for both (the teacher is the student's family): positions and the labels they predict
    inputs, labels = get_family(model).model_inputs(batch["input_ids"], batch.get("attention_mask"), batch["labels"])
    hidden, head = hidden_states(model, inputs)
    teacher_device = next(teacher.parameters()).device
    with torch.no_grad():
        t_hidden, t_head = hidden_states(teacher, {k: v.to(teacher_device) for k, v in inputs.items()})
    y = labels.reshape(-1).to(hidden.device)
    keep = y != IGNORE_INDEX
    h = hidden.reshape(-1, hidden.shape[-1])[keep]
    t = t_hidden.reshape(-1, t_hidden.shape[-1])[keep.to(teacher_device)]
    y = y[keep]
    with_lm = alpha < 1
    t_weight, t_bias = t_head.weight, t_head.bias
    if t.device != h.device:  # the teacher's head runs on the student's device (hidden states move, not logits)
        t, t_weight = t.to(h.device), t_weight.to(h.device)
        t_bias = None if t_bias is None else t_bias.to(h.device)
    total = h.new_zeros(2, dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        args = (h[s:s + chunk], head.weight, head.bias, t[s:s + chunk], t_weight, t_bias, y[s:s + chunk],
                temperature, with_lm, get_family(model).finalize_logits, get_family(teacher).finalize_logits)
        total = total + (checkpoint(_kd_terms, *args, use_reentrant=False) if torch.is_grad_enabled() else _kd_terms(*args))
    n = int(h.shape[0])
    kd = total[0] / max(1, n) * temperature ** 2
    lm = total[1] / max(1, n) if with_lm else None
    loss = alpha * kd + (1 - alpha) * lm if with_lm else kd
    return {"loss": loss, "kd": kd, "lm": lm, "n_token": n}


def warmup_cosine(step: int, *, warmup: int, total: int, min_lr_ratio: float) -> float:
    """The recovery learning-rate multiplier at optimizer step ``step``: linear warmup over ``warmup`` steps,
    then cosine decay to ``min_lr_ratio`` at ``total`` (a ``LambdaLR`` lambda, so rebuilds can fast-forward it)."""
    import math

    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
