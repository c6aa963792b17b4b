"""Backends run a Plan's tasks on a device, one per device type. Adding one means adding a module
and one `register` line (here, or in the module that defines it); nothing else names backends."""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from .base import Backend, Runner
from .cpu import CPUBackend

_FACTORIES: dict[str, Callable[[torch.device], Backend]] = {}


def register(device_type: str, factory: Callable[[torch.device], Backend]) -> None:
    """`factory(device)` makes the backend for devices of `device_type` ("cpu", "cuda", ...)."""
    _FACTORIES[device_type] = factory


def _lazy(module: str, cls: str) -> Callable[[torch.device], Backend]:
    """A backend whose module is imported at first use (the CUDA one probes the driver)."""
    return lambda device: getattr(importlib.import_module(f"{__name__}.{module}"), cls)(str(device))


register("cpu", lambda device: CPUBackend())
register("cuda", _lazy("cuda", "CUDABackend"))


def get_backend(device: str | torch.device) -> Backend:
    """The backend for a device ("cpu", "cuda", "cuda:N", a torch.device, or a tensor's device)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in _FACTORIES:
        raise ValueError(f"device must be one of {sorted(_FACTORIES)} (or 'cuda:N'), but got {device!r}.")
    return _FACTORIES[dev.type](dev)


__all__ = ["Backend", "Runner", "CPUBackend", "get_backend", "register"]
