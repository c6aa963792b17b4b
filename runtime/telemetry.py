"""NVML queries, each wrapped: a query the device or the VM does not support reads None."""
from __future__ import annotations

from typing import Any, Callable


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


def nvml_static(index: int) -> dict[str, Any]:
    nv = _nvml()
    if nv is None:
        return {}
    handle = _query(lambda: nv.nvmlDeviceGetHandleByIndex(index))
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
    index = int(device.split(":")[1]) if ":" in device else 0
    handle = _query(lambda: nv.nvmlDeviceGetHandleByIndex(index))
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
