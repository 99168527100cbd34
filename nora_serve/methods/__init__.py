"""Adapter methods, one module each, registered in :mod:`.registry`.

Each module defines its method's math (a delta as factors ``(P, Q)`` with ``ΔW = P @ Q``, its
forward, its shared basis, its trainer init, its own training settings and hooks:
:mod:`.training`) and registers one :class:`Method`. Everything else (readers, the fold, the
trainer, the server) looks methods up with :func:`get_method`; nothing else knows a method's
math. Pure torch. Every module of this package is imported here (the built-in ones in a fixed
order, which is the registry's), so a new method's module registers itself without an edit here.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .base import Factors
from .registry import InitArgs, Method, get_method, is_method, method_names, register_method
from .training import BasisInputs, Procedure, RunInputs, TrainOptions, option
from .lora import lora_factors
from .nora import nora_core, nora_factors, svd_outer
from .three_matrix import nystrom_init, three_matrix_core, three_matrix_factors
from .dyrank import dyrank_budget, dyrank_factors, dyrank_importance, dyrank_start_rank, dyrank_variance_reg
from .peft_variants import adalora_factors, vera_factors
from .loraxs import loraxs_factors, loraxs_outer
from .dora import dora_forward, dora_row_scale, dora_serving_form

__all__ = [
    "Factors",
    "Method",
    "InitArgs",
    "register_method",
    "TrainOptions",
    "Procedure",
    "RunInputs",
    "BasisInputs",
    "option",
    "get_method",
    "method_names",
    "is_method",
    "lora_factors",
    "nora_factors",
    "nora_core",
    "svd_outer",
    "three_matrix_factors",
    "three_matrix_core",
    "nystrom_init",
    "dyrank_factors",
    "dyrank_importance",
    "dyrank_budget",
    "dyrank_start_rank",
    "dyrank_variance_reg",
    "adalora_factors",
    "vera_factors",
    "loraxs_factors",
    "loraxs_outer",
    "dora_forward",
    "dora_row_scale",
    "dora_serving_form",
]

for _m in _pkgutil.iter_modules(__path__):  # any other method module: registered on import
    _importlib.import_module(f"{__name__}.{_m.name}")
