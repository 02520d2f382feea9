"""The built-in optimizers, each a small spec. ``BUILTINS`` maps the CLI name to the spec factory."""

from .adam import adam, adamw
from .lamb import lamb, nvlamb
from .lars import lars
from .sgd import sgd

BUILTINS = {
    "sgd": sgd,
    "adam": adam,
    "adamw": adamw,
    "lars": lars,
    "lamb": lamb,
    "nvlamb": nvlamb,
}

__all__ = ["BUILTINS", "sgd", "adam", "adamw", "lars", "lamb", "nvlamb"]
