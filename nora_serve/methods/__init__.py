"""The methods' math: each module returns a delta as factors ``(P, Q)`` with ``ΔW = P @ Q``.

Everything else (readers, the fold, the trainer, the server) asks a method for its factors;
nothing else knows a method's math. Pure torch.
"""

from .base import Factors
from .lora import lora_factors, lora_scale
from .nora import nora_core, nora_factors, svd_outer
from .three_matrix import nystrom_init, three_matrix_core, three_matrix_factors
from .dyrank import dyrank_budget, dyrank_factors, dyrank_importance, dyrank_variance_reg
from .peft_variants import adalora_factors, vera_factors

__all__ = [
    "Factors",
    "lora_factors",
    "lora_scale",
    "nora_factors",
    "nora_core",
    "svd_outer",
    "three_matrix_factors",
    "three_matrix_core",
    "nystrom_init",
    "dyrank_factors",
    "dyrank_importance",
    "dyrank_budget",
    "dyrank_variance_reg",
    "adalora_factors",
    "vera_factors",
]
