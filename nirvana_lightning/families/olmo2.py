"""OLMo-2: q/k RMS norms over the FULL projection width (not per head), and post-norms (after attention and MLP).

The q norm's weight has one entry per q row (``n_head * d``), the k norm's one per k row: a unit owns its rows
of the norm weights too (:class:`~.base.Owned` on the norm, a 1-D weight), so the cut keeps norm and projection
in agreement. The norm's statistic is a mean over the whole width, so removing heads changes the kept heads'
normalisation; the pruned model computes it over the kept rows, and masking does the same
(:meth:`Olmo2Family.masking_hooks`), so pruned equals masked exactly. The post-norms act on the hidden size,
which pruning never changes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import check_choice
from .base import GRANULARITIES, ModelFamily, Owned, UnitKind

#: the full-width norms: norm role -> the projection whose rows it normalises
NORMS = {"q_norm": "q", "k_norm": "k"}


def _kept_rms(kept: torch.Tensor):
    """A forward hook: the norm's output as if its input had only the ``kept`` entries (the others' outputs are
    never read: their heads are masked at ``o``)."""
    def hook(module, args, _output):
        x = args[0].float()
        index = kept.to(x.device)
        variance = x.index_select(-1, index).pow(2).mean(-1, keepdim=True)
        return (module.weight * (x * torch.rsqrt(variance + module.variance_epsilon))).to(args[0].dtype)
    return hook


class Olmo2Family(ModelFamily):
    model_types = ("olmo2",)
    # special tokens inside the tiny vocabulary (the stock eos is 50279)
    tiny_models = {"tiny-olmo2": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 255}}

    def projection(self, layer: nn.Module, role: str) -> nn.Module:
        if role in NORMS:
            return getattr(layer.self_attn, role)
        return super().projection(layer, role)

    def unit_kinds(self, layer: nn.Module, granularity: str = "group") -> dict[str, UnitKind]:
        """The Llama layout's kinds, each attention kind owning its rows of the q/k norm weights as well."""
        check_choice("target.attention_granularity", granularity, GRANULARITIES)
        kinds = super().unit_kinds(layer, granularity)
        for name, kind in kinds.items():
            rows = {o.role: o for o in kind.owns if o.axis == 0}
            norms = tuple(Owned(norm, 0, rows[role].block) for norm, role in NORMS.items() if role in rows)
            kinds[name] = dataclasses.replace(kind, owns=kind.owns + norms)
        return kinds

    def masking_hooks(self, layer: nn.Module, kept: dict[tuple[str, int], torch.Tensor]) -> list:
        return [self.projection(layer, norm).register_forward_hook(_kept_rms(kept[(norm, 0)]))
                for norm in NORMS if (norm, 0) in kept]
