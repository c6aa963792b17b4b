"""Where a trial is measured, as the search sees it: a `Target` (this process's device, another
process reached by tuner/remote.py's protocol, a fake with a known landscape in tests), and the
paired round every search trial is (the sequential schedule timed right beside the candidate)."""
from __future__ import annotations

import dataclasses
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
    """Measures on the workload's device, in this process (or on a Bench built already: `bench=`,
    as a tensor-parallel rank and vLLM's worker build theirs)."""

    def __init__(self, workload: Workload | None, config: MeasureConfig | None, *, bench: Bench | None = None) -> None:
        self.bench = bench if bench is not None else Bench(workload, config=config)
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

    def profile(self, path, *, renew: bool = False, label: str = "", family: str = ""):
        """The performance model's profile of this device and batch (cached at `path`; with `family`,
        transferred from another batch's of the same model where one is cached beside it) and a
        line saying where it came from (runtime/perfmodel)."""
        from dynaflow.runtime.perfmodel import load_or_measure

        return load_or_measure(self.bench, path, renew=renew, label=label, family=family)


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


def crashed(e: BaseException | str, prefix: str = "") -> Measurement:
    """A measure that raised (or an error's text): the trial is CRASHED, the worker lives on."""
    text = e if isinstance(e, str) else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    return Measurement(outcome=TrialOutcome.CRASHED, message=f"{prefix}{text}")


def measure_pair(target: Target, schedule: Schedule, *, first: str = "baseline",
                 on_sample: OnPairedSample | None = None, time_limit_s: float | None = None,
                 baseline: Schedule = Schedule()) -> Measurement:
    """One paired round: `baseline` (the sequential schedule) and `schedule` measured back to back
    on the same target (`first` says which runs first). Returns the candidate's measurement
    carrying the baseline's samples (`baseline_samples_ms`) and state (`baseline_state`), and the
    busy reading of both.
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
    return dataclasses.replace(m, baseline_samples_ms=tuple(base.samples_ms), telemetry={**m.telemetry, "busy": busy},
                               baseline_state=base.state)


def _baseline_failed(base: Measurement) -> Measurement:
    """The sequential run beside a candidate failed: the round is lost (a crash, not the candidate's verdict)."""
    return Measurement(outcome=TrialOutcome.CRASHED,
                       message=f"the sequential run beside it failed ({base.outcome.value}: {base.message})")


def run(target: Target, schedule: Schedule, *, time_limit_s: float | None = None, paired: bool = False,
        on_sample: OnPairedSample | None = None) -> Measurement:
    """What every place a trial runs does with it, in whichever process holds the target: a search
    trial is a paired round (`paired`), a baseline or a confirmation round one measure."""
    if paired:
        return measure_pair(target, schedule, on_sample=on_sample, time_limit_s=time_limit_s)
    return target.measure(schedule, time_limit_s=time_limit_s)


def paired_speedup(m: Measurement) -> float | None:
    """A paired measurement's speedup over its baseline (a pruned one's from its partial samples)."""
    if not m.samples_ms or not m.baseline_samples_ms:
        return None
    return round_ms(m.baseline_samples_ms) / round_ms(m.samples_ms)


def close_target(target) -> None:
    """Stop what a target started for its workload (a TP group's rank processes); most hold nothing."""
    close = getattr(target, "close", None)
    if close is not None:
        close()
