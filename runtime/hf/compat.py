"""The transformers releases the HF integration is tested with, and the API drift it bridges.

transformers 5.24 renamed the cache argument of every model and decoder layer from
`past_key_values` to `cache` (the old name warns, and goes in 5.40). The wrappers read
whichever name a call used and hand the nano-batches the cache under the same name; callers
that build a call use `cache_kwargs(model, cache)`. A transformers outside the tested range
gets one WARNING, naming both, when the integration is first used. transformers itself is
never imported here.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import logging

from torch import nn

log = logging.getLogger("dynaflow")

# pyproject.toml's `hf` extra declares the same range (tests/test_hf_compat.py checks it); the upper
# bound is the newest release the suite passed with: raising it is a change that runs the suite.
TESTED_TRANSFORMERS = ">=5.16.1,<=5.24.0"
# Inside the range, 5.18 and 5.19 cannot be captured whole by dynamo with a static cache: their
# causal-mask code branches on the cache offset, a tensor (masking_utils._ignore_causal_mask_sdpa).
# The compile backend then runs at layer granularity; `hf:` models cannot be tuned at op level.
NO_WHOLE_GRAPH = ">=5.18,<5.20"
ALSO_TESTED = ("5.19.0",)  # vLLM's CPU build pins transformers<5.20: scripts/test.sh runs it too
CACHE_ARGS = ("cache", "past_key_values")  # the name since 5.24, the name before
_checked: list[str] = []  # the version already checked in this process


def cache_arg(kwargs: dict) -> str | None:
    """The name under which a model or layer call passed its cache, if it passed one."""
    if kwargs.get("cache") is not None:  # plain lookups: this runs on every decoder-layer call
        return "cache"
    return "past_key_values" if kwargs.get("past_key_values") is not None else None


def cache_kwargs(model: nn.Module, cache) -> dict:
    """`{name: cache}` under the name the model's forward takes (`cache` from transformers 5.24).
    A subclass whose forward takes only `*args, **kwargs` is read through its bases."""
    model = getattr(model, "unscheduled", model)  # the model a compiled wrapper wraps
    for cls in type(model).__mro__:
        try:
            params = inspect.signature(cls.__dict__["forward"]).parameters
        except (KeyError, TypeError, ValueError):
            continue
        if name := next((n for n in CACHE_ARGS if n in params), None):
            return {name: cache}
    return {CACHE_ARGS[-1]: cache}


def check_transformers() -> str | None:
    """Warn once if the installed transformers is outside the tested range; the version."""
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None
    if _checked and _checked[0] == version:
        return version
    _checked[:] = [version]
    if not in_tested_range(version):
        log.warning("transformers %s is outside the range dynaflow-tune's Hugging Face integration is tested "
                    "with (%s); it may fail inside transformers' cache code. pip install "
                    "'dynaflow-tune[hf]' installs a tested release.", version, TESTED_TRANSFORMERS)
    return version


def whole_graph_note(version: str | None = None) -> str | None:
    """Why dynamo cannot capture an HF model whole under this transformers, where that is known."""
    try:
        version = version or importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not _in(version, NO_WHOLE_GRAPH, unknown=False):
        return None
    return (f"transformers {version}'s causal-mask code branches on the cache offset (a tensor), which breaks "
            "dynamo's graph; 5.16.1-5.17 and 5.20-5.24 are captured whole")


def oldest_transformers() -> str:
    """The lowest release of the tested range (scripts/test.sh runs the HF tests with it)."""
    return next(spec[2:] for spec in TESTED_TRANSFORMERS.split(",") if spec.startswith(">="))


def in_tested_range(version: str) -> bool:
    return _in(version, TESTED_TRANSFORMERS)


def _in(version: str, specifiers: str, unknown: bool = True) -> bool:
    """Whether `version` satisfies `specifiers`; `unknown` where packaging is missing."""
    try:
        from packaging.specifiers import SpecifierSet  # a dependency of transformers itself
        from packaging.version import InvalidVersion
    except ImportError:
        return unknown
    try:
        return SpecifierSet(specifiers).contains(version, prereleases=True)
    except InvalidVersion:
        return False
