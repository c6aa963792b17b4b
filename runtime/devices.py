"""What differs by device type, outside the backend that runs a plan (runtime/backends/): one
`DeviceType` per type, registered by its torch name. The rest of the project asks it about a
device, a torch.device or a Hardware.kind, and never names a type:

    device_type("cuda:1").unit        # "SMs": what SM partitions divide
    device_type(hardware.kind).accelerator

A new device type (ROCm shows as torch's "cuda"; XPU as "xpu") is a `register_device` here or
in its own module, its Backend's `register` (runtime/backends/), its hardware detection and
timer (runtime/hardware.py `register_hardware`) and, if it has one, its telemetry sampler
(runtime/telemetry.py `register_sampler`)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True, kw_only=True)
class DeviceType:
    name: str  # torch's device type: "cpu", "cuda"
    label: str  # how messages call it: "CPU", "CUDA"
    unit: str  # what a stream's share of the device counts: "SMs", "cores"
    accelerator: bool  # a card of its own: a Ray worker holds one GPU, peaks are measured at card sizes
    default_dtype: str  # what a workload on it runs in unless told: "bfloat16", "float32"
    collectives: str  # torch.distributed's backend for a tensor-parallel group on it: "nccl", "gloo"
    indexed: bool  # devices are numbered (cuda:N): a tensor-parallel rank gets its own
    graphs: bool  # a plan can be captured once and replayed (the nanoflow space's cuda_graph choice)
    partitions: bool  # a stream can be given a share of the compute units (SM partitions)
    count: Callable[[], int]  # how many of them torch sees
    synchronize: Callable[[str], None]  # wait until a device's work issued so far is done
    install: str = ""  # what to do when torch sees none


_TYPES: dict[str, DeviceType] = {}


def register_device(t: DeviceType) -> None:
    _TYPES[t.name] = t


register_device(DeviceType(
    name="cpu", label="CPU", unit="cores", accelerator=False, default_dtype="float32", collectives="gloo",
    indexed=False, graphs=False, partitions=False, count=lambda: 1, synchronize=lambda device: None))
register_device(DeviceType(
    name="cuda", label="CUDA", unit="SMs", accelerator=True, default_dtype="bfloat16", collectives="nccl",
    indexed=True, graphs=True, partitions=True,
    count=lambda: torch.cuda.device_count() if torch.cuda.is_available() else 0,
    synchronize=lambda device: torch.cuda.synchronize(device),
    install="install a CUDA build of torch on a GPU machine"))


def names() -> list[str]:
    return list(_TYPES)


def spellings() -> str:
    """The device strings a user may give, for messages: 'cpu', 'cuda' or 'cuda:N'."""
    said = [f"'{n}'" + (f", '{n}:N'" if t.indexed else "") for n, t in _TYPES.items()]
    words = ", ".join(said).split(", ")
    return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]


def parse(device: str) -> tuple[DeviceType, int | None] | None:
    """(its type, its index or None) for a device string of a registered type, else None."""
    name, sep, index = device.partition(":")
    t = _TYPES.get(name)
    if t is None or (sep and not (t.indexed and re.fullmatch(r"[0-9]+", index))):  # ASCII digits only
        return None
    return t, int(index) if sep else None


def device_type(device: str | torch.device) -> DeviceType:
    """The type of a device ("cuda:1", a torch.device) or of a Hardware's kind ("cuda")."""
    name = device.type if isinstance(device, torch.device) else str(device).partition(":")[0]
    t = _TYPES.get(name)
    if t is None:
        raise ValueError(f"device must be {spellings()}, but got {str(device)!r}.")
    return t


def default_device() -> str:
    """Where this process runs by default: the first accelerator torch sees, else the CPU."""
    return next((t.name for t in _TYPES.values() if t.accelerator and t.count() > 0), "cpu")


def check_device(device: str) -> None:
    """A device that is not there is a one-line error, not a traceback from deep in torch."""
    t = device_type(device)
    if not t.accelerator:
        return
    have = t.count()
    if have == 0:
        raise ValueError(f"device {device!r} asked for, but torch {torch.__version__} sees no {t.label} device; "
                         f"use --device cpu" + (f", or {t.install}." if t.install else "."))
    index = parse(device)[1] if parse(device) else None
    if index is not None and index >= have:
        raise ValueError(f"device {device!r} asked for, but only {have} {t.label} device(s) exist.")
