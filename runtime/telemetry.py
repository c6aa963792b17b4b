"""How the device was while a schedule ran: NVML queries (each wrapped: a query the device or
the VM does not support reads None), and how busy the machine was (`busy_mark`/`busy_since`).

NVML numbers GPUs physically; torch numbers the GPUs CUDA_VISIBLE_DEVICES lets it see. So the
handle for torch's device is found by its UUID, else its PCI bus id, never by torch's index (with
CUDA_VISIBLE_DEVICES=1, torch's cuda:0 is NVML's device 1). A device matched by neither reads as
having no NVML ("nvml": None), not as another GPU's clocks.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .devices import device_type

CONTENDED_SHARE = 0.25  # other processes using more than this share of the CPUs: a contended reading


def _nvml():
    try:
        import pynvml  # the module of the nvidia-ml-py package

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no GPU: every query reads None
        return None


def _query(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # NVMLError_NotSupported and friends
        return None


_HANDLES: dict[int, Any] = {}


def nvml_handle(nv, index: int):
    """NVML's handle of torch's cuda:<index>, by UUID, else by PCI bus id; None if neither matches."""
    if index in _HANDLES:
        return _HANDLES[index]
    props = _query(lambda: torch.cuda.get_device_properties(index))
    handle = None
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid:
        for name in (uuid, f"GPU-{uuid}", f"MIG-{uuid}"):
            handle = _query(lambda: nv.nvmlDeviceGetHandleByUUID(name))
            if handle is not None:
                break
    if handle is None and getattr(props, "pci_bus_id", None) is not None:
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        handle = _query(lambda: nv.nvmlDeviceGetHandleByPciBusId(bus_id))
    _HANDLES[index] = handle
    return handle


def nvml_static(index: int) -> dict[str, Any]:
    nv = _nvml()
    if nv is None:
        return {}
    handle = nvml_handle(nv, index)
    if handle is None:
        return {}
    mig = _query(lambda: nv.nvmlDeviceGetMigMode(handle))
    return {
        "driver": _query(nv.nvmlSystemGetDriverVersion),
        "mig": bool(mig[0]) if mig else None,
    }


# device type -> (sample(device), what else ran on it since a mark: busy(device)); a type without one: {}
_SAMPLERS: dict[str, tuple[Callable[[str], dict[str, Any]], Callable[[str], dict[str, Any]]]] = {}


def register_sampler(device_type: str, sample: Callable[[str], dict[str, Any]],
                     busy: Callable[[str], dict[str, Any]]) -> None:
    _SAMPLERS[device_type] = (sample, busy)


def sample(device: str) -> dict[str, Any]:
    """The device's clocks, temperature, power and throttle reasons (on a GPU); {} where its type has no sampler."""
    sampler = _SAMPLERS.get(device_type(device).name)
    return sampler[0](device) if sampler else {}


def _cuda_sample(device: str) -> dict[str, Any]:
    """SM clock (MHz), temperature, power (W) and active throttle reasons, from NVML."""
    nv = _nvml()
    if nv is None:
        return {"nvml": None}
    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    handle = nvml_handle(nv, index)
    if handle is None:
        return {"nvml": None}
    reasons = _query(lambda: nv.nvmlDeviceGetCurrentClocksEventReasons(handle))
    power = _query(lambda: nv.nvmlDeviceGetPowerUsage(handle))
    return {
        "sm_clock_mhz": _query(lambda: nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM)),
        "temperature_c": _query(lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)),
        "power_w": power / 1000 if power is not None else None,
        "throttle_reasons": _decode_reasons(nv, reasons),
    }


def _decode_reasons(nv, mask: int | None) -> list[str] | None:
    if mask is None:
        return None
    names = [n for n in dir(nv) if n.startswith("nvmlClocksEventReason") and n != "nvmlClocksEventReasonNone"]
    return sorted(n.removeprefix("nvmlClocksEventReason") for n in names
                  if isinstance(getattr(nv, n), int) and mask & getattr(nv, n) and n != "nvmlClocksEventReasonAll")


# --- how busy the machine was ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BusyMark:
    wall: float
    system_cpu_s: float | None  # busy time of every CPU (Linux /proc/stat), steal included
    own_cpu_s: float


def _system_cpu_s() -> tuple[float, int] | None:
    """(seconds every CPU spent busy since boot, number of CPUs) from /proc/stat; None elsewhere."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    fields = [float(x) for x in lines[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), max(cpus, 1)


_PEERS: list[int] = []  # processes whose CPU time is this one's work (the other ranks of a TP group)


def count_as_own(pids) -> None:
    """The CPU time of `pids` (a tensor-parallel group's other ranks) is this process's work, not
    contention: their ranks compute the same schedule, in lockstep."""
    _PEERS[:] = [p for p in pids if p != os.getpid()]


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + sum(_cpu_s_of(p) for p in _PEERS)


def _cpu_s_of(pid: int) -> float:
    """User + system seconds of another process (Linux /proc); 0 where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (float(fields[11]) + float(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_mark() -> BusyMark:
    system = _system_cpu_s()
    return BusyMark(wall=time.perf_counter(), system_cpu_s=system and system[0], own_cpu_s=_own_cpu_s())


def busy_since(mark: BusyMark, device: str = "cpu") -> dict[str, Any]:
    """What else ran since `mark`: other processes' CPU seconds (all CPUs' busy time less this
    process's), the load average, and on a GPU the other processes NVML sees on it."""
    wall = time.perf_counter() - mark.wall
    out: dict[str, Any] = {"wall_s": round(wall, 4)}
    system = _system_cpu_s()
    if system is not None and mark.system_cpu_s is not None:
        others = (system[0] - mark.system_cpu_s) - (_own_cpu_s() - mark.own_cpu_s)
        out.update(others_cpu_s=round(max(others, 0.0), 3), cpus=system[1])
    if hasattr(os, "getloadavg"):
        out["load1"] = round(os.getloadavg()[0], 2)
    sampler = _SAMPLERS.get(device_type(device).name)
    if sampler:
        out.update(sampler[1](device))
    return out


def _cuda_busy(device: str) -> dict[str, Any]:
    return {"gpu_other_processes": _gpu_other_processes(device), "gpu_slowdown": _gpu_slowdown(device)}


SLOWDOWNS = ("HwSlowdown", "HwThermalSlowdown", "HwPowerBrakeSlowdown", "SwThermalSlowdown")  # not SwPowerCap:
# a GPU at full load sits at its power cap routinely; these mean its clocks were cut by heat or hardware


def _nvml_device(device: str):
    """(NVML, the handle of torch's `device`), or (None, None) where either cannot be had."""
    nv = _nvml()
    if nv is None:
        return None, None
    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    handle = nvml_handle(nv, index)
    return (nv, handle) if handle is not None else (None, None)


def _gpu_slowdown(device: str) -> int | None:
    """1 when NVML reports a thermal or hardware slowdown of the clocks now, 0 when not, None unread."""
    nv, handle = _nvml_device(device)
    if handle is None:
        return None
    reasons = _decode_reasons(nv, _query(lambda: nv.nvmlDeviceGetCurrentClocksEventReasons(handle)))
    return None if reasons is None else int(any(r in SLOWDOWNS for r in reasons))


def _gpu_other_processes(device: str) -> int | None:
    nv, handle = _nvml_device(device)
    if handle is None:
        return None
    procs = _query(lambda: nv.nvmlDeviceGetComputeRunningProcesses(handle))
    return None if procs is None else sum(1 for p in procs if p.pid != os.getpid())


def merge_busy(readings: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Readings over several spans as one: times add up, the load and other GPU processes peak."""
    readings = [r for r in readings if r]
    if not readings:
        return {}
    out: dict[str, Any] = {"wall_s": round(sum(r.get("wall_s", 0.0) for r in readings), 4)}
    if all("others_cpu_s" in r for r in readings):
        out.update(others_cpu_s=round(sum(r["others_cpu_s"] for r in readings), 3), cpus=readings[0]["cpus"])
    for key in ("load1", "gpu_other_processes", "gpu_slowdown"):
        values = [r[key] for r in readings if r.get(key) is not None]
        if values:
            out[key] = max(values)
    return out


def others_share(busy: dict[str, Any]) -> float | None:
    """The share of all CPUs other processes used: 0 quiet, 1 every CPU busy with others' work."""
    if not busy.get("wall_s") or "others_cpu_s" not in busy:
        return None
    return min(busy["others_cpu_s"] / (busy["wall_s"] * busy["cpus"]), 1.0)


def contention(busy: dict[str, Any] | None) -> str | None:
    """Why a reading was taken under contention, in words; None when it was not (or unknown)."""
    if not busy:
        return None
    why = []
    share = others_share(busy)
    if share is not None and share > CONTENDED_SHARE:
        why.append(f"other processes used {share:.0%} of the {busy['cpus']} CPU(s)"
                   + (f" (load average {busy['load1']:g})" if busy.get("load1") is not None else ""))
    if busy.get("gpu_other_processes"):
        why.append(f"{busy['gpu_other_processes']} other process(es) ran on the GPU")
    if busy.get("gpu_slowdown"):
        why.append("the GPU's clocks were cut (a thermal or hardware slowdown)")
    return "; ".join(why) or None


register_sampler("cuda", _cuda_sample, _cuda_busy)
