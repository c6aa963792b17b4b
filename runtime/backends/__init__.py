"""Backends run a Plan's tasks on a device. Adding one means adding a module and a registry line."""
from __future__ import annotations

from .base import Backend, Runner
from .cpu import CPUBackend


def get_backend(device: str) -> Backend:
    """The backend for a device string: "cpu", "cuda" or "cuda:N"."""
    if device == "cpu":
        return CPUBackend()
    if device.startswith("cuda"):
        from .cuda import CUDABackend  # imported lazily: it probes the driver

        return CUDABackend(device)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', but got {device!r}.")


__all__ = ["Backend", "Runner", "CPUBackend", "get_backend"]
