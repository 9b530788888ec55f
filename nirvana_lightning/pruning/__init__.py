"""NIRVANA pruning: saliency (pure), scoring pass, allocation (pure), plan, surgery."""

from .allocation import Allocation, allocate, compute_prune_fractions, sparsity_for_param_budget
from .api import apply_plan, count_parameters, cut, make_plan, plan_from_scores, prune
from .gradients import UnitScores, compute_unit_scores
from .plan import PruningPlan
from .saliency import (
    CRITERIA,
    FUNCTIONALS,
    compute_output_functional,
    compute_weight_saliency,
    reduce_attention_scores,
    reduce_mlp_scores,
)
from .selection import SelectionResult, check_disjoint, mean_token_kl, select_calibration
from .surgery import masked_units

__all__ = [
    "CRITERIA", "FUNCTIONALS", "Allocation", "PruningPlan", "UnitScores", "allocate", "apply_plan", "cut",
    "compute_output_functional", "compute_prune_fractions", "compute_unit_scores", "compute_weight_saliency",
    "count_parameters", "make_plan", "masked_units", "plan_from_scores", "prune", "reduce_attention_scores",
    "reduce_mlp_scores", "sparsity_for_param_budget", "SelectionResult", "check_disjoint", "mean_token_kl",
    "select_calibration",
]
