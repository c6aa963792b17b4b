"""Measurement, in one place: verify against the sequential reference, warm up, time, report.

    bench = Bench(workload)              # builds the model once, runs the reference once
    m = bench.measure(schedule)          # Measurement: outcome, median/spread, tokens/s, ...

A candidate whose outputs differ from the reference is a result (INCORRECT), never a fast one.
"""
from __future__ import annotations

import math
import statistics
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from . import steady, telemetry
from .counters import count
from .executor import Compiled, Executor, Output, clone_output, first_tensor
from .hardware import Hardware, Peaks, detect, measure_peaks
from .schedule import Schedule
from .case import Case
from .timeline import Timeline, overlap, record_timelines

if TYPE_CHECKING:  # a workload only builds its case here (workload.build()); the core never imports it
    from .workload import Workload

OnSample = Callable[[list[float]], bool]


def tokens_per_s(num_tokens: int, ms: float) -> float:
    """Throughput of a forward over `num_tokens` tokens that took `ms` milliseconds."""
    return num_tokens / ms * 1e3


ACCUMULATE = torch.float32  # GEMMs and attention accumulate in float32 for every dtype here


@dataclass(frozen=True, kw_only=True, slots=True)
class Tolerance:
    """An output passes when |out - ref| <= rtol * |ref| + atol, element-wise.

    Derived (`derive`) from the dtype and the layer's reductions, after Higham's bound on n
    rounded additions (n * eps): rtol = K * eps(float32) + sqrt(D) * eps(dtype), atol = rtol *
    rms(reference). K is the longest reduction any op makes (terms summed into one element:
    a GEMM's inner dimension, attention's key length), whose order a schedule may change (other
    GEMM blockings for other nano-batch sizes); D is the number of ops on the graph's longest
    path, each rounding its output to the dtype once. A schedule that drops a dependency or
    cuts a batch wrong errs by the size of the values themselves, far above either term."""

    rtol: float
    atol: float
    reduction: int | None = None  # K, when derived
    depth: int | None = None  # D, when derived

    def __post_init__(self) -> None:
        if not (self.rtol >= 0 and self.atol >= 0 and math.isfinite(self.rtol + self.atol)):
            raise ValueError(f"rtol and atol must be finite and >= 0, but got {self.rtol!r} and {self.atol!r}.")

    @classmethod
    def derive(cls, dtype: torch.dtype, *, reduction: int, depth: int, reference: torch.Tensor) -> "Tolerance":
        eps_acc, eps_out = torch.finfo(ACCUMULATE).eps, torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
        rtol = reduction * eps_acc + math.sqrt(depth) * eps_out
        flat = _flat(reference)
        rms = float(flat.pow(2).mean().sqrt()) if flat.numel() else 0.0
        return cls(rtol=rtol, atol=rtol * rms, reduction=reduction, depth=depth)

    def error(self, out: Output, ref: Output) -> float:
        """Worst |out - ref| / (atol + rtol |ref|): <= 1 passes. A tuple output: the worst of its elements."""
        if isinstance(ref, (tuple, list)):
            if not isinstance(out, (tuple, list)) or len(out) != len(ref):
                return math.inf
            return max((self.error(o, r) for o, r in zip(out, ref)), default=0.0)
        if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
            return math.inf
        ref = ref.float()
        err = (out.float() - ref).abs() / (self.atol + self.rtol * ref.abs()).clamp_min(torch.finfo(torch.float32).tiny)
        worst = float(err.max()) if err.numel() else 0.0
        return worst if math.isfinite(worst) else math.inf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _flat(out: Output) -> torch.Tensor:
    """Every element of an output as one float32 vector (a tuple output's, concatenated)."""
    parts = out if isinstance(out, (tuple, list)) else (out,)
    return torch.cat([t.detach().float().flatten() for t in parts]) if parts else torch.zeros(0)


def relative_spread(samples: list[float]) -> float:
    """(p90 - p10) / median of timing samples: their relative noise; 0 for fewer than 2."""
    if len(samples) < 2:
        return 0.0
    deciles = statistics.quantiles(samples, n=10)
    return (deciles[-1] - deciles[0]) / statistics.median(samples)


class TrialOutcome(str, Enum):
    OK = "ok"
    INCORRECT = "incorrect"
    OOM = "oom"
    TIMEOUT = "timeout"
    CRASHED = "crashed"
    INVALID = "invalid"
    PRUNED = "pruned"  # stopped early: clearly slower than the best so far


COLLECTIVE_TIMEOUT_S = 60.0


@dataclass(frozen=True, kw_only=True, slots=True)
class MeasureConfig:
    warmup: int = 3
    repeats: int = 15
    peaks_dir: Path | None = None  # where measured peaks are cached per hardware; None: per process
    remeasure_peaks: bool = False  # measure the peaks again and renew the cache
    rtol: float | None = None  # replaces the derived tolerance's rtol (see Tolerance)
    atol: float | None = None  # replaces the derived tolerance's atol
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S  # a tensor-parallel collective not done by then raises (a hung rank)

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"warmup must be >= 0 and repeats >= 1, but got {self.warmup} and {self.repeats}.")
        if not 0 < self.collective_timeout_s < math.inf:
            raise ValueError(f"collective_timeout_s must be a finite number > 0, but got {self.collective_timeout_s!r}.")
        for flag, v in (("--rtol", self.rtol), ("--atol", self.atol)):
            if v is not None and not (0 <= v < math.inf):
                raise ValueError(f"{flag} must be a finite number >= 0, but got {v!r}.")


@dataclass(frozen=True, kw_only=True)
class Measurement:
    outcome: TrialOutcome
    message: str = ""
    error_ratio: float | None = None  # worst |out - ref| / (atol + rtol |ref|); <= 1 passes
    tolerance: dict[str, Any] | None = None  # the Tolerance the output was checked against
    latency_ms: float | None = None  # median
    latency_p10_ms: float | None = None
    latency_p90_ms: float | None = None
    samples_ms: tuple[float, ...] = ()
    # the sequential schedule's samples, timed right beside these (a paired round); () when not paired
    baseline_samples_ms: tuple[float, ...] = ()
    tokens_per_s: float | None = None
    peak_bytes: int | None = None
    flops: float | None = None
    bytes: float | None = None
    bound_ms: float | None = None  # roofline lower bound
    efficiency: float | None = None  # bound_ms / latency_ms
    telemetry: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    state: steady.RunState | None = None  # the state its timed runs ran in, read inside them
    baseline_state: steady.RunState | None = None  # the paired sequential run's; None when not paired

    @property
    def ok(self) -> bool:
        return self.outcome is TrialOutcome.OK

    @property
    def spread(self) -> float | None:
        """(p90 - p10) / median: the relative noise of the samples."""
        if self.latency_ms is None or self.latency_p10_ms is None:
            return None
        return (self.latency_p90_ms - self.latency_p10_ms) / self.latency_ms

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outcome"] = self.outcome.value
        d["spread"] = self.spread
        for key in ("state", "baseline_state"):
            d[key] = getattr(self, key).to_dict() if getattr(self, key) is not None else None
        return d

    def summary(self) -> str:
        if not self.ok:
            return f"{self.outcome.value.upper()}: {self.message}"
        eff = f", {self.efficiency:.1%} of roofline" if self.efficiency is not None else ""
        peak = f"peak {self.peak_bytes / 2**20:.1f} MiB" if self.peak_bytes else "peak memory unknown"
        return (f"{self.latency_ms:.3f} ms median (p10 {self.latency_p10_ms:.3f}, p90 {self.latency_p90_ms:.3f}), "
                f"{self.tokens_per_s:,.0f} tokens/s, {peak}{eff}")


class Bench:
    """A workload ready to measure schedules on: model, reference output and bound, built once."""

    def __init__(self, workload: Workload | None = None, *, case: Case | None = None,
                 config: MeasureConfig = MeasureConfig(), hardware: Hardware | None = None) -> None:
        if (workload is None) == (case is None):
            raise ValueError("Bench needs exactly one of workload or case.")
        # before the model is built: its memory then stays in the process once freed (steady.py)
        self.allocator = steady.keep_freed_memory()
        self.case = case or workload.build()
        self.config = config
        self.device = str(self.case.device)
        self.hardware = hardware or detect(self.device)
        self.executor = Executor(self.case)
        self.reference = clone_output(self.executor.reference())
        _, counts = count(self.case.model, *self.case.inputs)
        self.flops, self.bytes, self.network_bytes = counts.flops, counts.bytes, counts.network_bytes
        parallel, dtype = self.case.parallel, first_tensor(self.reference).dtype
        self._agree = parallel.agree if parallel is not None else lambda value: value

        def peaks(remeasure: bool = config.remeasure_peaks) -> Peaks:
            return measure_peaks(self.device, dtype, hardware=self.hardware, cache_dir=config.peaks_dir,
                                 remeasure=remeasure)
        self._renew_peaks = (lambda: peaks(True)) if parallel is None else None  # once, if a run beats them
        if parallel is None:
            self.peaks: Peaks = peaks()
        else:  # one rank at a time (ranks share the machine), then the group's bus bandwidth, together
            self.peaks = dataclasses.replace(parallel.in_turn(peaks), world_size=parallel.world_size,
                                             bus_bytes_per_s=parallel.bus_bytes_per_s(self.device, dtype))
        self.executor.profile_ops(flops_per_byte=self.peaks.balance)
        derived = tolerance_for(self.executor, self.reference, counts=counts)
        self.tolerance = Tolerance(rtol=derived.rtol if config.rtol is None else config.rtol,
                                   atol=derived.atol if config.atol is None else config.atol,
                                   reduction=derived.reduction, depth=derived.depth)

    @property
    def bound_ms(self) -> float:
        """The roofline: the slowest of the compute, memory and (tensor-parallel) network terms."""
        network = self.network_bytes / self.peaks.bus_bytes_per_s if self.peaks.bus_bytes_per_s else 0.0
        return 1e3 * max(self.flops / self.peaks.flops_per_s, self.bytes / self.peaks.bytes_per_s, network)

    def measure(self, schedule: Schedule, *, on_sample: OnSample | None = None,
                time_limit_s: float | None = None) -> Measurement:
        """on_sample(samples_ms) -> True stops timing early (PRUNED); time_limit_s bounds the
        timing loop (TIMEOUT). A hung kernel needs a worker process to be cut off (tuner's pool)."""
        compiled = None
        try:
            compiled = self.executor.compile(schedule, sm_count=self.hardware.num_sms)
            return self._measure(compiled, on_sample, time_limit_s)
        except ValueError as e:  # the schedule breaks a rule of this model, batch or device
            if compiled is None:
                return Measurement(outcome=TrialOutcome.INVALID, message=str(e))
            return Measurement(outcome=TrialOutcome.CRASHED, message=f"ValueError: {e}")
        except torch.cuda.OutOfMemoryError as e:
            return Measurement(outcome=TrialOutcome.OOM, message=str(e).splitlines()[0])
        except Exception as e:  # a schedule that raises (also in CUDA-graph capture) is a failed trial
            return Measurement(outcome=TrialOutcome.CRASHED, message=f"{type(e).__name__}: {e}")
        finally:
            if compiled is not None:
                compiled.close()

    def timelines(self, schedules: list[Schedule], *, runs: int = 5) -> list[Timeline]:
        """When each op of each nano-batch ran, for each schedule: run eagerly (a CUDA graph hides
        its tasks), warmed up and interleaved so that the timelines compare (timeline.py)."""
        resources = {op.name: op.resource for op in self.executor.graph.ops}
        compiled: list[Compiled] = []
        try:
            for s in schedules:
                compiled.append(self.executor.compile(dataclasses.replace(s, cuda_graph=False),
                                                      sm_count=self.hardware.num_sms))
            return record_timelines(compiled, resources, runs=runs)
        finally:
            for c in compiled:
                c.close()

    def explain(self, schedule: Schedule) -> dict:
        """Why `schedule` is fast: what of it ran at the same time, from its timeline (timeline.overlap)."""
        return overlap(self.timelines([schedule])[0])

    def check(self, out: Output) -> float:
        """Worst error relative to the tolerance; <= 1 means equal to the reference."""
        return self.tolerance.error(out, self.reference)

    def _measure(self, compiled: Compiled, on_sample, time_limit_s) -> Measurement:
        notes, tol = dict(compiled.runner.notes), self.tolerance.to_dict()
        first = self._agree(self.check(compiled()))  # ranks of a group agree: the worst rank decides
        if first > 1:
            return Measurement(outcome=TrialOutcome.INCORRECT, error_ratio=first, notes=notes, tolerance=tol,
                               message=f"output differs from the sequential reference: error {first:.2f}x tolerance "
                                       f"(rtol {tol['rtol']:.2g}, atol {tol['atol']:.2g})")
        mark = telemetry.busy_mark()  # how busy the machine is while this schedule is timed
        samples, faults, stop = self._time(compiled, on_sample, time_limit_s)
        state = self._state(compiled, faults)
        if stop is not None:
            return Measurement(outcome=stop[0], message=stop[1], samples_ms=tuple(samples), notes=notes,
                               latency_ms=statistics.median(samples) if samples else None, state=state)
        last = self._agree(self.check(compiled.out))  # races show up on later runs too
        if last > 1:
            return Measurement(outcome=TrialOutcome.INCORRECT, error_ratio=last, notes=notes, tolerance=tol,
                               message=f"output differs after timed runs: error {last:.2f}x tolerance (a race?)")
        return self._result(samples, max(first, last), compiled, notes, telemetry.busy_since(mark, self.device),
                            state)

    def _state(self, compiled: Compiled, faults: list[int]) -> steady.RunState:
        """The state the timed runs ran in: each running thread's count, page faults per run."""
        seen = compiled.runner.threads_seen
        return steady.RunState.read(faults, threads=seen() if seen is not None else (),
                                    full_threads=getattr(compiled.backend, "threads", None), allocator=self.allocator)

    def _time(self, compiled: Compiled, on_sample, time_limit_s):
        """Warm up, then time `repeats` synced runs, reading each run's page faults. Returns
        (samples, faults, None) or (samples, faults, (outcome, why))."""
        sync = compiled.backend.synchronize
        start = time.perf_counter()
        for _ in range(self.config.warmup):
            compiled()
        sync()
        samples: list[float] = []
        faults: list[int] = []
        for _ in range(self.config.repeats):
            f0 = steady.page_faults()
            t0 = time.perf_counter()
            compiled()
            sync()
            samples.append((time.perf_counter() - t0) * 1e3)
            faults.append(steady.page_faults() - f0)
            over = time_limit_s is not None and time.perf_counter() - start > time_limit_s
            stop = 2 if over else 1 if on_sample is not None and on_sample(samples) else 0
            stop = self._agree(stop)  # a TP group's ranks stop at once
            if stop == 2:
                return samples, faults, (TrialOutcome.TIMEOUT, f"timing exceeded the {time_limit_s:g} s limit")
            if stop == 1:
                return samples, faults, (TrialOutcome.PRUNED, f"stopped after {len(samples)} samples: clearly slower")
        return samples, faults, None

    def _beaten_peaks(self, median_ms: float) -> None:
        """A run faster than the roofline bound says the peaks were measured low (a moment the host
        was slow, another process busy): measured again, once per Bench, each kept at its highest."""
        if self.bound_ms <= median_ms or self._renew_peaks is None:
            return
        fresh, self._renew_peaks = self._renew_peaks(), None
        self.peaks = dataclasses.replace(self.peaks, flops_per_s=max(self.peaks.flops_per_s, fresh.flops_per_s),
                                         bytes_per_s=max(self.peaks.bytes_per_s, fresh.bytes_per_s))

    def _result(self, samples: list[float], error: float, compiled: Compiled, notes: dict,
                busy: dict, state: steady.RunState) -> Measurement:
        median = statistics.median(samples)
        self._beaten_peaks(median)
        deciles = statistics.quantiles(samples, n=10) if len(samples) > 1 else [median] * 9
        peak = compiled.backend.peak_bytes(compiled.plan, compiled.runner)
        return Measurement(
            outcome=TrialOutcome.OK, error_ratio=error, latency_ms=median, latency_p10_ms=deciles[0],
            latency_p90_ms=deciles[-1], samples_ms=tuple(samples), tokens_per_s=tokens_per_s(self.case.num_tokens, median),
            peak_bytes=peak, flops=self.flops, bytes=self.bytes, bound_ms=self.bound_ms,
            efficiency=self.bound_ms / median, notes=notes,
            telemetry={**telemetry.sample(self.device), "busy": busy},
            tolerance=self.tolerance.to_dict(), state=state,
        )


def tolerance_for(executor: Executor, reference: Output, *, counts=None) -> Tolerance:
    """The derived tolerance of an executor's model and batch (what Bench checks against);
    `counts`: the model's counts, when the caller has them already."""
    counts = counts or count(executor.case.model, *executor.case.inputs)[1]
    return Tolerance.derive(first_tensor(reference).dtype, reduction=counts.max_reduction, depth=executor.graph.depth,
                            reference=reference)


def measure(workload: Workload, schedule: Schedule, *, config: MeasureConfig = MeasureConfig()) -> Measurement:
    """Verify, then time, one schedule on one workload."""
    return Bench(workload, config=config).measure(schedule)
