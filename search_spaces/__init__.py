"""dynaflow.search_spaces: one module per strategy, found by name. A new strategy is a new
module here defining `name` and `suggest(trial, ctx) -> Schedule`; the tuner needs no edit."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from .base import SpaceContext, Trial

_NOT_SPACES = {"base"}


def registry() -> dict[str, Callable]:
    spaces = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_SPACES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        spaces[module.name] = module.suggest
    return spaces


def get_space(name: str) -> Callable:
    spaces = registry()
    if name not in spaces:
        raise ValueError(f"space must be one of {sorted(spaces)}, but got {name!r}.")
    return spaces[name]


__all__ = ["SpaceContext", "Trial", "get_space", "registry"]
