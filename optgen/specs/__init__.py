"""The built-in optimizers, each a small spec. ``BUILTINS`` maps the CLI name to the spec factory."""

from ..layerwise import layer_adaptive
from .adabelief import adabelief
from .adafactor import adafactor
from .adam import adam, adamw, adamw8bit
from .came import came
from .lamb import lamb, lamb8bit, nvlamb
from .lars import lars
from .lars_optax import lars_optax
from .lion import lion
from .novograd import novograd
from .sgd import sgd


def layer_adaptive_lion():
    """Lion with a layer-wise trust ratio: ``layer_adaptive(lion)``."""
    return layer_adaptive(lion, name="LayerAdaptiveLion")


def layer_adaptive_adafactor():
    """Adafactor with a layer-wise trust ratio on its step: ``layer_adaptive(adafactor)``."""
    return layer_adaptive(adafactor, name="LayerAdaptiveAdafactor")


BUILTINS = {
    "sgd": sgd,
    "adam": adam,
    "adamw": adamw,
    "lars": lars,
    "lars_optax": lars_optax,
    "lamb": lamb,
    "nvlamb": nvlamb,
    "novograd": novograd,
    "lion": lion,
    "layer_adaptive_lion": layer_adaptive_lion,
    "adabelief": adabelief,
    "adafactor": adafactor,
    "layer_adaptive_adafactor": layer_adaptive_adafactor,
    "came": came,
    "adamw8bit": adamw8bit,
    "lamb8bit": lamb8bit,
}

__all__ = [
    "BUILTINS",
    "sgd",
    "adam",
    "adamw",
    "lars",
    "lars_optax",
    "lamb",
    "nvlamb",
    "novograd",
    "lion",
    "layer_adaptive_lion",
    "adabelief",
    "adafactor",
    "layer_adaptive_adafactor",
    "came",
    "adamw8bit",
    "lamb8bit",
]
