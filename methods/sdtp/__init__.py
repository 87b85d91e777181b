"""SDTP, saliency-driven dynamic token pruning (arXiv 2504.04514): see methods.sdtp.method."""

from methods.sdtp.method import SDTP, keep_ratio_for_sparsity, planned_compute_sparsity
from methods.sdtp.pruning import prompt_length

__all__ = ["SDTP", "keep_ratio_for_sparsity", "planned_compute_sparsity", "prompt_length"]
