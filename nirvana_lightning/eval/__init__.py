"""Evaluation that works with or without a Trainer."""

from ..pruning.plan import allocation_rows
from .kl import compute_kl, target_mask, token_kl
from .lm_eval import OFFLINE_TASKS, run_lm_eval, validate_tasks
from .perplexity import build_text_windows, compute_perplexity, compute_text_perplexity
from .report import save_allocation_plot
from .speed import count_parameters_detailed, flops_per_token, measure_throughput

__all__ = ["OFFLINE_TASKS", "allocation_rows", "build_text_windows", "compute_kl", "compute_perplexity", "compute_text_perplexity",
           "count_parameters_detailed", "flops_per_token", "measure_throughput", "run_lm_eval",
           "save_allocation_plot", "target_mask", "token_kl", "validate_tasks"]
