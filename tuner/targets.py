"""Where a trial is measured: this process's device, or anything with the same shape (a Ray
actor's device, a fake with a known landscape in tests)."""
from __future__ import annotations

from typing import Protocol

from dynaflow.runtime import Bench, Hardware, MeasureConfig, Measurement, Schedule, Workload
from dynaflow.runtime.measure import OnSample
from dynaflow.search_spaces import SpaceContext


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

    def space_context(self) -> SpaceContext:
        return SpaceContext(hardware=self.hardware, graph=self.bench.executor.graph, layout=self.bench.case.layout)

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
