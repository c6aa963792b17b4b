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


class LocalTarget:
    """Measures on the workload's device, in this process."""

    def __init__(self, workload: Workload, config: MeasureConfig) -> None:
        self.bench = Bench(workload, config=config)
        self.hardware = self.bench.hardware

    def space_context(self) -> SpaceContext:
        return SpaceContext(hardware=self.hardware, graph=self.bench.executor.graph, layout=self.bench.case.layout)

    def measure(self, schedule: Schedule, *, on_sample=None, time_limit_s=None) -> Measurement:
        return self.bench.measure(schedule, on_sample=on_sample, time_limit_s=time_limit_s)
