"""``param_groups``: the usual LAMB/LARS exclusions as torch param-group dicts."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

Rule = Callable[[str, torch.nn.Parameter], bool]


def _is_vector(name: str, param: torch.nn.Parameter) -> bool:
    """Biases and normalisation weights: parameters with at most one dimension."""
    return param.ndim <= 1


def _rule(rule: Rule | Iterable[str] | None) -> Rule:
    if rule is None:
        return _is_vector
    if callable(rule):
        return rule
    patterns = tuple(rule)
    return lambda name, _: any(p in name for p in patterns)


def param_groups(
    model: torch.nn.Module,
    weight_decay: float = 0.01,
    no_decay: Rule | Iterable[str] | None = None,
    no_adaptation: Rule | Iterable[str] | None = None,
    **options,
) -> list[dict]:
    """Split ``model``'s trainable parameters into groups for a layer-wise optimizer.

    By default 1-D parameters (biases, norm weights) get ``weight_decay=0`` and ``layer_adaptation=False``
    (trust ratio 1, as in the LARS and LAMB papers' practice); matrices keep ``weight_decay``. A rule is a
    callable on ``(name, param)`` or a list of name substrings (``["bias", "norm"]``). ``options`` are
    copied into every group (``lr=...``). Empty groups are left out.
    """
    decay_off, adapt_off = _rule(no_decay), _rule(no_adaptation)
    buckets: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (decay_off(name, param), adapt_off(name, param))
        buckets.setdefault(key, []).append(param)
    groups = []
    for (no_wd, no_adapt), params in sorted(buckets.items()):
        group = {"params": params, "weight_decay": 0.0 if no_wd else weight_decay, **options}
        if no_adapt:
            group["layer_adaptation"] = False
        groups.append(group)
    return groups
