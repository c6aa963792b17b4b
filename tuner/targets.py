"""Where a trial is measured: this process's device, or anything with the same shape (a Ray
actor's device, a fake with a known landscape in tests)."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Protocol

from dynaflow.runtime import Bench, Hardware, MeasureConfig, Measurement, Schedule, TrialOutcome, Workload, telemetry
from dynaflow.runtime.measure import OnSample
from dynaflow.search_spaces import SpaceContext

from .paired import round_ms

# on_sample of a paired measurement: (the candidate's samples so far, the baseline's figure in ms) -> stop?
OnPairedSample = Callable[[list[float], float], bool]


class Target(Protocol):
    hardware: Hardware

    def space_context(self) -> SpaceContext: ...

    def measure(self, schedule: Schedule, *, on_sample: OnSample | None = None,
                time_limit_s: float | None = None) -> Measurement: ...

    def explain(self, schedule: Schedule) -> dict | None:
        """What of the schedule ran at the same time (runtime.timeline.overlap), or None."""
        ...


class LocalTarget:
    """Measures on the workload's device, in this process."""

    def __init__(self, workload: Workload, config: MeasureConfig) -> None:
        self.bench = Bench(workload, config=config)
        self.hardware = self.bench.hardware

    @property
    def graph(self):
        return self.bench.executor.graph

    @property
    def peaks(self):
        return self.bench.peaks

    @property
    def tolerance(self):
        return self.bench.tolerance

    def space_context(self) -> SpaceContext:
        return SpaceContext(hardware=self.hardware, graph=self.graph, layout=self.bench.case.layout)

    def measure(self, schedule: Schedule, *, on_sample=None, time_limit_s=None) -> Measurement:
        return self.bench.measure(schedule, on_sample=on_sample, time_limit_s=time_limit_s)

    def explain(self, schedule: Schedule) -> dict | None:
        return self.bench.explain(schedule)


def explain(target, schedule: Schedule) -> dict | None:
    """A target's explanation of a schedule; None where it has none (a fake) or it fails: a
    missing why never costs the verdict."""
    fn = getattr(target, "explain", None)
    if fn is None:
        return None
    try:
        return fn(schedule)
    except Exception as e:  # noqa: BLE001 - reported, never raised
        import warnings

        warnings.warn(f"could not record the winner's timeline: {type(e).__name__}: {e}")
        return None


class VllmTarget:
    """Measures a `vllm:<folder>` model where vLLM serves it: in vLLM's worker process, on a step
    of the workload's shape that vLLM's scheduler formed and the plugin kept (runtime/vllm/replay.py)."""

    def __init__(self, workload: Workload, config: MeasureConfig) -> None:
        from dynaflow.runtime.vllm import replay

        self.engine, self.step = replay.start(workload)
        info = self.engine.rpc("dynaflow_bench", workload.model, config, os.getpid())  # the driver: not contention
        self.hardware: Hardware = info["hardware"]
        self.graph, self.peaks, self.tolerance = info["graph"], info["peaks"], info["tolerance"]
        self.context = SpaceContext(hardware=self.hardware, graph=self.graph, layout=info["layout"])

    def space_context(self) -> SpaceContext:
        return self.context

    def measure(self, schedule: Schedule, *, on_sample=None, time_limit_s=None) -> Measurement:
        """`on_sample` is not forwarded: pruning needs the driver's study, and the worker is another
        process (as for Ray actors), so trials time fully."""
        try:
            return self.engine.rpc("dynaflow_measure", schedule, time_limit_s)
        except Exception as e:  # noqa: BLE001 - the worker failed this schedule; the search goes on
            return crashed(e)

    def explain(self, schedule: Schedule) -> dict | None:
        return self.engine.rpc("dynaflow_explain", schedule)


def crashed(e: BaseException, prefix: str = "") -> Measurement:
    """A measure that raised: the trial is CRASHED, the worker lives on."""
    first = (str(e).splitlines() or [""])[0]
    return Measurement(outcome=TrialOutcome.CRASHED, message=f"{prefix}{type(e).__name__}: {first}")


def measure_pair(target: Target, schedule: Schedule, *, first: str = "baseline",
                 on_sample: OnPairedSample | None = None, time_limit_s: float | None = None,
                 baseline: Schedule = Schedule()) -> Measurement:
    """One paired round: `baseline` (the sequential schedule) and `schedule` measured back to back
    on the same target (`first` says which runs first). Returns the candidate's measurement
    carrying the baseline's samples (`baseline_samples_ms`) and the busy reading of both.
    `on_sample` sees the candidate's samples with the baseline's figure (when the baseline ran first)."""
    if first not in ("baseline", "candidate"):
        raise ValueError(f"first must be 'baseline' or 'candidate', but got {first!r}.")
    base = None
    if first == "baseline":
        base = target.measure(baseline, time_limit_s=time_limit_s)
        if not base.ok:
            return _baseline_failed(base)
    figure = round_ms(base.samples_ms) if base is not None else None
    hook = None if on_sample is None or figure is None else (lambda samples: on_sample(samples, figure))
    m = target.measure(schedule, on_sample=hook, time_limit_s=time_limit_s)
    if base is None and m.outcome in (TrialOutcome.OK, TrialOutcome.PRUNED):
        base = target.measure(baseline, time_limit_s=time_limit_s)
        if not base.ok:
            return _baseline_failed(base)
    if base is None:  # the candidate ran first and failed: nothing to pair
        return m
    busy = telemetry.merge_busy([base.telemetry.get("busy") or {}, m.telemetry.get("busy") or {}])
    return dataclasses.replace(m, baseline_samples_ms=tuple(base.samples_ms), telemetry={**m.telemetry, "busy": busy})


def _baseline_failed(base: Measurement) -> Measurement:
    """The sequential run beside a candidate failed: the round is lost (a crash, not the candidate's verdict)."""
    return Measurement(outcome=TrialOutcome.CRASHED, message=f"the sequential run beside it failed "
                                                            f"({base.outcome.value}: {base.message})")


def paired_speedup(m: Measurement) -> float | None:
    """A paired measurement's speedup over its baseline (a pruned one's from its partial samples)."""
    if not m.samples_ms or not m.baseline_samples_ms:
        return None
    return round_ms(m.baseline_samples_ms) / round_ms(m.samples_ms)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Integration:
    """How the tuner measures the models of one prefix (a serving engine's): the target it
    measures them on, what starts once before the first target (an engine holding every
    workload's step), and why a Ray pool cannot run them (None: it can)."""

    target: Callable[[Workload, MeasureConfig], Target]
    reserve: Callable[[list[Workload]], None] | None = None
    no_pool: str | None = None


INTEGRATIONS: dict[str, Integration] = {}  # model prefix -> its integration; other models: LocalTarget


def register_integration(prefix: str, integration: Integration) -> None:
    INTEGRATIONS[prefix] = integration


def integration_of(workload: Workload) -> Integration | None:
    return next((i for p, i in INTEGRATIONS.items() if workload.model.startswith(p)), None)


def _reserve_vllm(workloads: list[Workload]) -> None:
    from dynaflow.runtime.vllm import replay
    replay.reserve(workloads)


register_integration("vllm:", Integration(
    target=VllmTarget, reserve=_reserve_vllm,
    no_pool="vllm: models are measured in the one vLLM engine this process drives; --workers (a Ray pool) is not "
            "supported for them."))


def reserve(workloads) -> None:
    """Before the first target: what each integration starts once for all its workloads."""
    for prefix, integration in INTEGRATIONS.items():
        mine = [w for w in workloads if w.model.startswith(prefix)]
        if mine and integration.reserve is not None:
            integration.reserve(mine)


def target_for(workload: Workload, config: MeasureConfig) -> Target:
    """Where a workload is measured: its integration's target (vLLM's worker for a `vllm:` model),
    a group of rank processes at tensor parallelism > 1 (tuner/tp.py), else this process."""
    if (integration := integration_of(workload)) is not None:
        return integration.target(workload, config)
    if workload.tp > 1:
        from .tp import TPTarget
        return TPTarget(workload, config)
    return LocalTarget(workload, config)


def close_target(target) -> None:
    """Stop what a target started for its workload (a TP group's rank processes); most hold nothing."""
    close = getattr(target, "close", None)
    if close is not None:
        close()
