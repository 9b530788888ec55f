"""Evaluation that works with or without a Trainer."""

from .perplexity import compute_perplexity, lm_loss_and_count

__all__ = ["compute_perplexity", "lm_loss_and_count"]
