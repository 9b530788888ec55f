"""Pure saliency maths (docs/method.md sections 1-2): tensors in, tensors out.

A weight's saliency is ``S(w) = |w * df/dw|`` in float32, where ``f`` is a scalar of the model
output (NIRVANA) or the LM loss (``taylor``). A unit's score is the entrywise (L1) sum of S over the
slices its family declares it owns (:class:`~nirvana_lightning.families.base.Owned`), for example:

* KV group h (``group`` granularity): q rows ``[h*g*d, (h+1)*g*d)``, k and v rows ``[h*d, (h+1)*d)``,
  o columns ``[h*g*d, (h+1)*g*d)``;
* query head j (``query_head``): q rows and o columns ``[j*d, (j+1)*d)``; its KV group keeps k and v rows;
* MLP neuron j: gate row j + up row j + down column j.
"""

from __future__ import annotations

import torch

#: Output functionals f(Z) for logits Z of shape (B, T, V).
FUNCTIONALS = ("max_over_seq", "max_over_vocab", "sum_logits")
#: Criteria: NIRVANA (output functional), magnitude |w|, taylor (LM-loss gradient), random, and the
#: activation-based structured baselines of FLAP's paper: wanda_sp (|w| x input norm) and flap (input
#: fluctuation), both on the output projections' input channels.
CRITERIA = ("nirvana", "magnitude", "taylor", "random", "wanda_sp", "flap")
#: criteria that read calibration data
DATA_CRITERIA = ("nirvana", "taylor", "wanda_sp", "flap")


def compute_output_functional(logits: torch.Tensor, functional: str = "max_over_seq") -> torch.Tensor:
    """Scalar functional of the logits; reductions only, no copy of the (B, T, V) tensor.

    Args:
        logits: ``(B, T, V)`` in any float dtype.
        functional: ``max_over_seq`` = mean over (b, v) of the max over t (the released code's
            default); ``max_over_vocab`` = mean over (b, t) of the max over v; ``sum_logits``.

    Returns:
        0-dim float32 tensor.
    """
    if functional == "max_over_seq":
        return logits.amax(dim=1).float().mean()
    if functional == "max_over_vocab":
        return logits.amax(dim=2).float().mean()
    if functional == "sum_logits":
        return logits.float().sum()
    raise ValueError(f"functional={functional!r}; expected one of {FUNCTIONALS}")


def compute_weight_saliency(weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """``|w * grad|`` in float32, or ``|w|`` when ``grad`` is None (magnitude criterion)."""
    w = weight.detach().float()
    return w.abs() if grad is None else (w * grad.detach().float()).abs()


def wanda_saliency(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda's ``|W_ij| * ||X_j||_2`` (``X_j``: input channel j over every calibration token), in float32.

    Summed over the output projection's columns a unit owns (o_proj columns of a KV group, the down_proj
    column of a neuron) this is Wanda-sp, the structured baseline of FLAP (An et al. 2024) as its
    reference code computes it.
    """
    return weight.detach().float().abs() * input_sq_sum.float().sqrt()[None, :]


def flap_saliency(weight: torch.Tensor, input_mean: torch.Tensor, input_sq_mean: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation ``Var(X_j) * W_ij^2``: summed over the rows of an output projection it is the
    metric ``Var(X_j) * ||W_:,j||^2`` of input channel j (An et al. 2024, eq. 3), in float32."""
    var = (input_sq_mean.double() - input_mean.double() ** 2).clamp_min(0).float()
    return weight.detach().float() ** 2 * var[None, :]


def reduce_owned(saliency: torch.Tensor, axis: int, block: int, offset: int = 0,
                 n_units: int | None = None) -> torch.Tensor:
    """Sum one projection's weight saliencies ``(out, in)`` (or a 1-D weight's ``(out,)``) over the slices its
    units own: ``block`` consecutive rows (``axis`` 0) or columns (``axis`` 1) per unit, from ``offset`` (a kind
    inside a fused weight; ``n_units`` then says where it ends, default: to the end). Returns ``(n_unit,)``
    float32."""
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 (rows) or 1 (columns), got {axis!r}")
    stop = saliency.shape[axis] if n_units is None else offset + n_units * block
    part = saliency.narrow(axis, offset, stop - offset)
    if axis == 0:
        return part.reshape(part.shape[0] // block, -1).sum(1).float()
    return part.reshape(part.shape[0], part.shape[1] // block, block).sum((0, 2)).float()


def reduce_attention_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, n_kv_group: int
) -> torch.Tensor:
    """Per-KV-group sums of weight saliencies (``group`` granularity).

    Args:
        q: ``(n_kv_group*g*head_dim, hidden)``; k, v: ``(n_kv_group*head_dim, hidden)``;
            o: ``(hidden, n_kv_group*g*head_dim)``.

    Returns:
        ``(n_kv_group,)`` float32.
    """
    return (reduce_owned(q, 0, q.shape[0] // n_kv_group) + reduce_owned(k, 0, k.shape[0] // n_kv_group)
            + reduce_owned(v, 0, v.shape[0] // n_kv_group) + reduce_owned(o, 1, o.shape[1] // n_kv_group))


def reduce_mlp_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Per-neuron sums: gate row + up row + down column. ``(mlp_dim, hidden) x2, (hidden, mlp_dim) -> (mlp_dim,)``."""
    return reduce_owned(gate, 0, 1) + reduce_owned(up, 0, 1) + reduce_owned(down, 1, 1)


def check_finite(scores: list[torch.Tensor], kind: str) -> None:
    """Raise if any unit score is NaN or Inf (naming the layer), before anything is cut."""
    for layer, s in enumerate(scores):
        if not torch.isfinite(s).all():
            raise FloatingPointError(
                f"non-finite {kind} saliency in layer {layer} ({int((~torch.isfinite(s)).sum())} of {s.numel()} "
                "units): the calibration pass overflowed or the weights hold NaN/Inf; try scoring in float32"
            )
