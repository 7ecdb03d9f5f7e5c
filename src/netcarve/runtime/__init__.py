"""netcarve's native CPU runtime: sparse kernels compiled for this CPU and a whole-model execution plan.

``compile(model_or_checkpoint, example_input, sparse="auto")`` lowers a model to one native plan (BN folded,
ReLU and residual additions fused into convs) and picks, per conv, the faster of the sparse kernel and the
dense one on this CPU (:mod:`netcarve.runtime.compiled`). Every native path has a plain-PyTorch reference
twin used by the tests and as the fallback when no C++ compiler is available (:func:`kernel_status`).

Layers: ``_build`` (compile + cache the C++ in ``csrc/``) -> ``kernels`` (one layer, with reference twin)
-> ``plan`` (fx graph -> ops -> native / reference plan) -> ``compiled`` (autotuning, the public callable).
"""

from ._build import kernel_status, load_kernels
from .compiled import CompiledModel, LayerChoice, compile
from .kernels import SparseConv2d, conv_taps
from .plan import Op, ReferencePlan, fold_bn, lower

__all__ = [
    "CompiledModel",
    "LayerChoice",
    "Op",
    "ReferencePlan",
    "SparseConv2d",
    "compile",
    "conv_taps",
    "fold_bn",
    "kernel_status",
    "load_kernels",
    "lower",
]
