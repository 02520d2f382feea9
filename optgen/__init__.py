"""optgen: compile optimizers written as math into fused multi-tensor kernels and torch.optim classes.

Public API: :class:`Spec` (the language), :func:`build` (spec -> ``torch.optim.Optimizer`` subclass), the
spec helpers (``norm``, ``trust_ratio``, ``where`` ...), :func:`layer_adaptive` (a layer-wise trust ratio on any
optimizer's step), and the built-in optimizers.
"""

from .groups import param_groups
from .layerwise import layer_adaptive
from .runtime.optimizer import GeneratedOptimizer, build
from .spec import (
    Abs,
    Hyper,
    Max,
    Min,
    Spec,
    SpecError,
    clip,
    col_mean,
    col_sum,
    global_max,
    global_norm,
    global_sum,
    global_sumsq,
    layer_max,
    layer_mean,
    layer_numel,
    layer_sum,
    maxabs,
    norm,
    rms,
    row_mean,
    row_sum,
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
LARSOptax = build(BUILTINS["lars_optax"]())
NovoGrad = build(BUILTINS["novograd"]())
Lion = build(BUILTINS["lion"]())
LayerAdaptiveLion = build(BUILTINS["layer_adaptive_lion"]())
AdaBelief = build(BUILTINS["adabelief"]())
Adafactor = build(BUILTINS["adafactor"]())
LayerAdaptiveAdafactor = build(BUILTINS["layer_adaptive_adafactor"]())
CAME = build(BUILTINS["came"]())
AdamW8bit = build(BUILTINS["adamw8bit"]())
LAMB8bit = build(BUILTINS["lamb8bit"]())

__all__ = [
    "Spec",
    "SpecError",
    "Hyper",
    "build",
    "layer_adaptive",
    "GeneratedOptimizer",
    "param_groups",
    "where",
    "norm",
    "sumsq",
    "maxabs",
    "layer_sum",
    "layer_max",
    "layer_numel",
    "layer_mean",
    "rms",
    "row_sum",
    "col_sum",
    "row_mean",
    "col_mean",
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
    "LARSOptax",
    "NovoGrad",
    "Lion",
    "LayerAdaptiveLion",
    "AdaBelief",
    "Adafactor",
    "LayerAdaptiveAdafactor",
    "CAME",
    "AdamW8bit",
    "LAMB8bit",
    "BUILTINS",
]
