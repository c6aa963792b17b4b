"""Hardware fingerprint and measured peaks.

The key names the device type (kind, name, architecture, SM count): records tuned on one H200
load on every H200. What makes a schedule invalid elsewhere is refused on a mismatch: another
architecture or SM count, or memory more than MEMORY_TOLERANCE apart (two boards of one SKU, or
one with ECC toggled, differ by a little; another SKU by far more). Software versions are
recorded but not keyed: a drift is a warning at load time, not a miss. On a GPU the SM
partition geometry is read from the driver (`sm_step`, `sm_groups`): the one place spaces and
backends learn how SMs can be shared.
"""
from __future__ import annotations

import dataclasses

import copy
import os
import platform
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import devices, telemetry, validate
from .devices import device_type
from .backends.green_ctx import sm_granularity, sm_layout
from .files import write_json_atomic


@dataclass(frozen=True, kw_only=True, slots=True)
class Hardware:
    kind: str  # a registered device type (runtime/devices.py): "cuda", "cpu"
    name: str
    arch: str  # compute capability "9.0", or the CPU machine type
    num_sms: int  # SMs on a GPU, cores on a CPU
    memory_bytes: int
    mig: bool | None = None
    software: dict[str, str | None] = field(default_factory=dict)
    sm_step: int | None = None  # SMs per partition group, as the driver reports them (None: the arch rule)
    sm_groups: int | None = None  # groups one split of the device gives (None: num_sms // step)

    @property
    def key(self) -> str:
        name = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        return f"{self.kind}-{name}-{self.arch.replace('.', '')}-{self.num_sms}sm"

    @property
    def legacy_key(self) -> str:
        """The key before memory left it (record folders of older stores)."""
        return f"{self.key}-{round(self.memory_bytes / 2**30)}g"

    @property
    def partition_step(self) -> int:
        """SMs per partition step: the driver's where read, else the architecture's rule; threads on CPU."""
        if not device_type(self.kind).partitions:
            return 1
        return self.sm_step or sm_granularity(self.arch)

    @property
    def partition_groups(self) -> int:
        """How many partition steps the device holds (the driver may split into fewer than SMs / step)."""
        return self.sm_groups or self.num_sms // self.partition_step

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, name: str = "hardware") -> "Hardware":
        """Every field checked (a record's hardware is read from a file). A store's records share
        one hardware: a dict equal to the last one checked gives the same (frozen) value."""
        last = _LAST_READ.get(name)
        if last is not None and last[0] == d:
            return last[1]
        hardware = cls._from_dict(d, name)
        _LAST_READ[name] = (copy.deepcopy(d), hardware)
        return hardware

    @classmethod
    def _from_dict(cls, d: dict, name: str) -> "Hardware":
        d = validate.obj(d, name)
        validate.known(d, {"kind", "name", "arch", "num_sms", "memory_bytes", "mig", "software", "sm_step", "sm_groups"},
                       name)
        if d.get("kind") not in devices.names():
            raise ValueError(f"{name}.kind must be one of {devices.names()}, but got {validate.short(d.get('kind'))}.")
        software = validate.obj(d.get("software", {}), f"{name}.software")
        for k, v in software.items():
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{name}.software.{k} must be a version string or null, but got {validate.short(v)}.")
        return cls(kind=d["kind"], name=validate.string(d, "name", name), arch=validate.string(d, "arch", name),
                   num_sms=validate.integer(d, "num_sms", name, lo=1),
                   memory_bytes=validate.integer(d, "memory_bytes", name, lo=0),
                   mig=validate.boolean(d, "mig", name, optional=True), software=dict(software),
                   sm_step=validate.integer(d, "sm_step", name, lo=1) if d.get("sm_step") is not None else None,
                   sm_groups=validate.integer(d, "sm_groups", name, lo=1) if d.get("sm_groups") is not None else None)

    def mismatch(self, other: "Hardware") -> list[str]:
        """The hard fields that differ: a schedule tuned on `other` must not run here. Memory may
        differ by MEMORY_TOLERANCE (boards of one SKU, ECC on or off)."""
        wrong = [f"{f}: {getattr(other, f)!r} vs {getattr(self, f)!r}"
                 for f in ("kind", "arch", "num_sms") if getattr(self, f) != getattr(other, f)]
        mine, theirs = self.memory_bytes, other.memory_bytes
        if abs(mine - theirs) > MEMORY_TOLERANCE * max(mine, theirs):
            wrong.append(f"memory_bytes: {theirs!r} vs {mine!r} (more than {MEMORY_TOLERANCE:.0%} apart)")
        return wrong

    def drift(self, other: "Hardware") -> list[str]:
        """Software versions that changed since `other` was recorded."""
        return [f"{k}: {other.software.get(k)!r} -> {v!r}" for k, v in self.software.items()
                if other.software.get(k) not in (None, v) and v is not None]


_LAST_READ: dict[str, tuple[dict, Hardware]] = {}
MEMORY_TOLERANCE = 0.08  # ECC on GDDR boards reserves 1/16 (6.25%); SKUs of one SM count differ by 20%+


def live_device(device: str | None = None) -> str:
    """`device`, or where this process would run by default: cuda where torch sees a GPU, else cpu."""
    return device or devices.default_device()


# device type -> (detect(device) -> Hardware, best_time(fn, repeats, launches) -> seconds per call or None)
_HARDWARE: dict[str, tuple[Callable[[str], "Hardware"], Callable[..., float] | None]] = {}


def register_hardware(device_type: str, detect: Callable[[str], "Hardware"],
                      best_time: Callable[..., float] | None = None) -> None:
    """How a device type's hardware is read, and how a call on it is timed (None: the host's
    clock around each call, after it returned)."""
    _HARDWARE[device_type] = (detect, best_time)


def detect(device: str = "cpu") -> Hardware:
    return _HARDWARE[device_type(device).name][0](device)


def _detect_cuda(device: str) -> Hardware:
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    nvml = telemetry.nvml_static(index)
    software = {"torch": torch.__version__, "cuda": torch.version.cuda, "driver": nvml.get("driver")}
    step, groups = sm_layout(index)
    return Hardware(kind="cuda", name=props.name, arch=f"{props.major}.{props.minor}",
                    num_sms=props.multi_processor_count, memory_bytes=props.total_memory,
                    mig=nvml.get("mig"), software=software, sm_step=step, sm_groups=groups)


def _detect_cpu(device: str = "cpu") -> Hardware:
    name = _cpu_model() or platform.processor() or "cpu"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return Hardware(kind="cpu", name=name, arch=platform.machine(), num_sms=cores, memory_bytes=memory,
                    software={"torch": torch.__version__, "python": platform.python_version()})


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Peaks:
    """Peaks measured on this device: a large GEMM and a large device-to-device copy; in a
    tensor-parallel group, also its all-reduce bus bandwidth (parallel.Parallel.bus_bytes_per_s),
    measured by the group's ranks together each time the group starts (never cached: it is the
    group's, not the device's)."""

    flops_per_s: float
    bytes_per_s: float
    dtype: str
    busy: dict = field(default_factory=dict)  # how busy the machine was while they were measured
    bus_bytes_per_s: float | None = None  # a group's all-reduce bus bandwidth; None: one device
    world_size: int = 1  # the group it was measured in
    attempts: int = 0  # measurements under contention merged into these peaks (0: measured quiet)

    @property
    def balance(self) -> float:
        return self.flops_per_s / self.bytes_per_s


RECHECK = 1.25  # a quick check this much above a cached peak: the cache was measured under load
CONTENDED_ATTEMPTS = 3  # peaks measured under contention are measured again by later commands, this many in all


_PEAKS: dict[tuple[str, str], Peaks] = {}


def measure_peaks(device: str, dtype: torch.dtype, *, hardware: Hardware, cache_dir: Path | None = None,
                  remeasure: bool = False) -> Peaks:
    """Measured once per (hardware, dtype) and cached as JSON under cache_dir (the store's
    `peaks/` folder for every command), so every process reads the same balance; `remeasure`
    renews the file. An unreadable cache file is measured again and replaced, with a warning
    naming it."""
    key = (hardware.key, str(dtype).removeprefix("torch."))
    if key in _PEAKS and not remeasure:
        return _PEAKS[key]
    path = Path(cache_dir) / f"{key[0]}_{key[1]}.json" if cache_dir else None
    if path is not None and not path.resolve().is_relative_to(Path(cache_dir).parent.resolve()):
        warnings.warn(f"peaks cache {path} resolves outside the store {Path(cache_dir).parent} (a symbolic link?); "
                      "not read or written: the peaks are measured for this process only")
        path = None
    cached, stale = None, None
    if path is not None and path.exists() and not remeasure:
        try:
            cached = _read_peaks(path)
            if (stale := _stale(cached, device, dtype)) is None:
                _PEAKS[key] = cached
                return cached
        except ValueError as e:
            warnings.warn(f"{e}; measuring the peaks again")
    _PEAKS[key] = peaks = _merge(cached, _run_peaks(device, dtype))
    said = f"peaks cached in {path} {stale}: measured again; " if stale else "the device peaks were measured "
    if (why := telemetry.contention(peaks.busy)) is not None:
        later = CONTENDED_ATTEMPTS - peaks.attempts
        warnings.warn(f"{said}under contention ({why}); the op classes follow from the highest of each peak so far, "
                      + (f"and the next {later} command(s) measure them again" if later > 0 else
                         f"which are now kept (after {CONTENDED_ATTEMPTS} attempts) until --remeasure-peaks"))
    elif stale:
        warnings.warn(f"{said}this time quiet, and cached")
    if path is not None:
        try:
            write_json_atomic(path, asdict(peaks))
        except OSError as e:  # a read-only store: the peaks still serve this process
            warnings.warn(f"cannot cache the device peaks in {path}: {e.strerror or e}")
    return peaks


def _merge(cached: Peaks | None, new: Peaks) -> Peaks:
    """Peaks measured again: quiet ones replace the cache; under contention (which only lowers a
    peak) the higher of each is kept and the attempt counted, so op classes settle, not flip."""
    if telemetry.contention(new.busy) is None:
        return new
    if cached is None:
        return dataclasses.replace(new, attempts=1)
    return dataclasses.replace(new, flops_per_s=max(new.flops_per_s, cached.flops_per_s),
                               bytes_per_s=max(new.bytes_per_s, cached.bytes_per_s), attempts=cached.attempts + 1)


def _stale(cached: Peaks, device: str, dtype: torch.dtype) -> str | None:
    """Why cached peaks are not to be trusted: measured under contention (fewer than
    CONTENDED_ATTEMPTS times), or a quick check now beats them by RECHECK (they were measured while
    something else ran); None if they stand."""
    if (why := telemetry.contention(cached.busy)) is not None:
        if cached.attempts >= CONTENDED_ATTEMPTS:
            return None  # said when they were kept: measured again only with --remeasure-peaks
        return f"were measured under contention ({why})"
    quick = _run_peaks(device, dtype, repeats=3)
    for what, now, then in (("GEMM", quick.flops_per_s, cached.flops_per_s),
                            ("copy", quick.bytes_per_s, cached.bytes_per_s)):
        if now > RECHECK * then:
            return f"are contradicted by a quick check ({what} {now / then:.2f}x faster now)"
    return None


def _read_peaks(path: Path) -> Peaks:
    data = validate.obj(validate.read_json(path, "peaks cache"), f"peaks cache {path}")
    try:
        peaks = Peaks(**data)
    except TypeError:
        raise ValueError(f"peaks cache {path} needs the fields flops_per_s, bytes_per_s, dtype (and busy)") from None
    if not isinstance(peaks.busy, dict):
        raise ValueError(f"peaks cache {path}: busy must be a JSON object")
    if not isinstance(peaks.attempts, int) or isinstance(peaks.attempts, bool) or peaks.attempts < 0:
        raise ValueError(f"peaks cache {path}: attempts must be an integer >= 0")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")
               for v in (peaks.flops_per_s, peaks.bytes_per_s)):
        raise ValueError(f"peaks cache {path} holds non-positive or non-finite peaks")
    return peaks


def _run_peaks(device: str, dtype: torch.dtype, repeats: int = 10) -> Peaks:
    mark = telemetry.busy_mark()
    card = device_type(device).accelerator
    n = 4096 if card else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / _best_time(lambda: torch.mm(a, b), device, repeats)
    size = 256 * 2**20 if card else 64 * 2**20  # well past the caches
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bw = 2 * src.nbytes / _best_time(lambda: dst.copy_(src), device, repeats)
    return Peaks(flops_per_s=flops, bytes_per_s=bw, dtype=str(dtype).removeprefix("torch."),
                 busy=telemetry.busy_since(mark, device))


def _best_time(fn, device: str, repeats: int = 10, launches: int = 20) -> float:
    """Seconds per call, best of `repeats`: by the device type's own timer where it has one, else
    the host's clock around each call."""
    timer = _HARDWARE[device_type(device).name][1]
    if timer is not None:
        return timer(fn, repeats, launches)
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _cuda_best_time(fn, repeats: int, launches: int) -> float:
    """Each repeat times `launches` back-to-back launches between two CUDA events on the stream:
    the device's time, with no host clock or launch latency in it (a 4096^3 GEMM takes ~0.2 ms on
    an H100, the size of a sync's jitter)."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(launches):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / launches)
    return best


register_hardware("cpu", _detect_cpu)
register_hardware("cuda", _detect_cuda, _cuda_best_time)
