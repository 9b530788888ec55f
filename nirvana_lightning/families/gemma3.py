"""Gemma 3 (text): explicit head_dim, per-head q/k norms, sliding and global layers, tied and scaled embeddings,
and final-logit soft-capping.

The q/k norms act on head_dim, which pruning never changes; the embedding scale, the sliding window and the
two RoPE bases are the stock model's and are left untouched. Soft-capping (``cap * tanh(logits / cap)``)
changes the logits NIRVANA's functional reads and the loss recovery trains on, so the lean scorer and the
chunked losses apply it (:meth:`~.base.ModelFamily.finalize_logits`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .base import ModelFamily


class Gemma3Family(ModelFamily):
    model_types = ("gemma3_text",)
    # per-head q/k norms, one sliding and one global layer, tied and scaled embeddings, and a final-logit soft-cap
    # low enough to bend the tiny model's logits (Gemma-3-270M has none; Gemma 2 used 30)
    tiny_models = {"tiny-gemma3": {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16,
                                   "layer_types": ["sliding_attention", "full_attention"],
                                   "final_logit_softcapping": 5.0, "tie_word_embeddings": True}}

    @property
    def logit_softcap(self) -> float | None:
        cap = getattr(self.config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    @contextmanager
    def raw_logits(self) -> Iterator[None]:
        saved = self.config.final_logit_softcapping
        self.config.final_logit_softcapping = None
        try:
            yield
        finally:
            self.config.final_logit_softcapping = saved
