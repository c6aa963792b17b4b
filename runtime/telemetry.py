"""NVML queries, each wrapped: a query the device or the VM does not support reads None.

NVML numbers GPUs physically; torch numbers the GPUs CUDA_VISIBLE_DEVICES lets it see. So the
handle for torch's device is found by its UUID, else its PCI bus id, never by torch's index (with
CUDA_VISIBLE_DEVICES=1, torch's cuda:0 is NVML's device 1). A device matched by neither reads as
having no NVML ("nvml": None), not as another GPU's clocks.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


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


def sample(device: str) -> dict[str, Any]:
    """SM clock (MHz), temperature, power (W) and active throttle reasons, or {} on CPU."""
    if not device.startswith("cuda"):
        return {}
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
