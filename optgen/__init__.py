"""optgen: compile optimizers written as math into fused multi-tensor kernels and torch.optim classes.

Public API: :class:`Spec` (the language), :func:`build` (spec -> ``torch.optim.Optimizer`` subclass), the
spec helpers (``norm``, ``trust_ratio``, ``where`` ...), and the built-in optimizers.
"""

from .groups import param_groups
from .runtime.optimizer import GeneratedOptimizer, build
from .spec import (
    Abs,
    Hyper,
    Max,
    Min,
    Spec,
    SpecError,
    clip,
    global_max,
    global_norm,
    global_sum,
    global_sumsq,
    layer_max,
    layer_sum,
    maxabs,
    norm,
    sign,
    sqrt,
    sumsq,
    trust_ratio,
    where,
)
from .specs import BUILTINS

__version__ = "0.1.0"

SGD = build(BUILTINS["sgd"]())
Adam = build(BUILTINS["adam"]())
AdamW = build(BUILTINS["adamw"]())
LARS = build(BUILTINS["lars"]())
LAMB = build(BUILTINS["lamb"]())
NVLAMB = build(BUILTINS["nvlamb"]())

__all__ = [
    "Spec",
    "SpecError",
    "Hyper",
    "build",
    "GeneratedOptimizer",
    "param_groups",
    "where",
    "norm",
    "sumsq",
    "maxabs",
    "layer_sum",
    "layer_max",
    "global_norm",
    "global_sumsq",
    "global_sum",
    "global_max",
    "trust_ratio",
    "clip",
    "sqrt",
    "sign",
    "Abs",
    "Max",
    "Min",
    "SGD",
    "Adam",
    "AdamW",
    "LARS",
    "LAMB",
    "NVLAMB",
    "BUILTINS",
]
