"""Pure saliency maths (docs/method.md sections 1-2): tensors in, tensors out.

A weight's saliency is ``S(w) = |w * df/dw|`` in float32, where ``f`` is a scalar of the model
output (NIRVANA) or the LM loss (``taylor``). Units aggregate S entrywise (L1):

* attention unit = one KV group h: q rows ``[h*g*d, (h+1)*g*d)``, k and v rows ``[h*d, (h+1)*d)``,
  o columns ``[h*g*d, (h+1)*g*d)``;
* MLP unit = neuron j: gate row j + up row j + down column j.
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
#: roles whose input channels wanda_sp and flap score (the output projections); the others add nothing
FLAP_ROLES = ("o", "down")


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


def reduce_role_scores(role: str, saliency: torch.Tensor, n_unit: int) -> torch.Tensor:
    """Sum one projection's weight saliencies ``(out, in)`` into its ``(n_unit,)`` unit scores.

    Attention roles reduce to KV groups (q/k/v rows in contiguous blocks, o columns), MLP roles
    to neurons (gate/up rows, down columns).
    """
    if role in ("q", "k", "v"):
        return saliency.reshape(n_unit, -1).sum(1).float()
    if role == "o":
        return saliency.reshape(saliency.shape[0], n_unit, -1).sum((0, 2)).float()
    if role in ("gate", "up"):
        return saliency.sum(1).float()
    if role == "down":
        return saliency.sum(0).float()
    raise ValueError(f"unknown role {role!r}")


def reduce_attention_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, n_kv_group: int
) -> torch.Tensor:
    """Per-KV-group sums of weight saliencies.

    Args:
        q: ``(n_kv_group*g*head_dim, hidden)``; k, v: ``(n_kv_group*head_dim, hidden)``;
            o: ``(hidden, n_kv_group*g*head_dim)``.

    Returns:
        ``(n_kv_group,)`` float32.
    """
    return sum(reduce_role_scores(r, t, n_kv_group) for r, t in (("q", q), ("k", k), ("v", v), ("o", o)))


def reduce_mlp_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Per-neuron sums: gate row + up row + down column. ``(mlp_dim, hidden) x2, (hidden, mlp_dim) -> (mlp_dim,)``."""
    n = gate.shape[0]
    return sum(reduce_role_scores(r, t, n) for r, t in (("gate", gate), ("up", up), ("down", down)))


def check_finite(scores: list[torch.Tensor], kind: str) -> None:
    """Raise if any unit score is NaN or Inf (naming the layer), before anything is cut."""
    for layer, s in enumerate(scores):
        if not torch.isfinite(s).all():
            raise FloatingPointError(
                f"non-finite {kind} saliency in layer {layer} ({int((~torch.isfinite(s)).sum())} of {s.numel()} "
                "units): the calibration pass overflowed or the weights hold NaN/Inf; try scoring in float32"
            )
