"""Fault injection for tests/test_remote.py, importable in the processes a trial runs in (a
tensor-parallel rank, a Ray actor): a target that measures a schedule by its label.

    poison-raise  its measure raises (a bug in a target: the process lives on)
    poison-exit   the process measuring it exits at once (a segfault, an OOM kill)
    poison-hang   the process measuring it never answers (a hung kernel or collective)

Every other schedule is measured by the real target inside, and its measurement says which
schedule it was (`notes["measured"]`), so a test sees a result reach its own trial."""
from __future__ import annotations

import dataclasses
import os
import time

from dynaflow.runtime import MeasureConfig, Workload
from dynaflow.tuner.measuring import LocalTarget

CONFIG = MeasureConfig(warmup=0, repeats=2)


class WorkerDied(BaseException):
    """Raised instead of exiting where the 'process' is a thread of the test (the fake vLLM)."""


class Faulty:
    exit = staticmethod(os._exit)  # an in-process host replaces it (see WorkerDied)

    def __init__(self, inner) -> None:
        self.inner = inner
        self.hardware = inner.hardware
        self.peaks, self.tolerance = getattr(inner, "peaks", None), getattr(inner, "tolerance", None)

    def space_context(self):
        return self.inner.space_context()

    def measure(self, schedule, *, on_sample=None, time_limit_s=None):
        if schedule.label == "poison-raise":
            raise RuntimeError("poisoned schedule")
        if schedule.label == "poison-exit":
            self.exit(3)
        if schedule.label == "poison-hang":
            time.sleep(3600)
        m = self.inner.measure(schedule, on_sample=on_sample, time_limit_s=time_limit_s)
        return dataclasses.replace(m, notes={**m.notes, "measured": schedule.label})

    def explain(self, schedule):
        return self.inner.explain(schedule)


def local(workload: Workload, config: MeasureConfig | None = None) -> Faulty:
    """A Faulty LocalTarget (a Ray worker's make_target, a rank's build)."""
    return Faulty(LocalTarget(workload, config or CONFIG))
