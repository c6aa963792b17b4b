"""Where trials run, behind one small protocol: the tuning loop (tuner/search.py) submits jobs
and waits for what finished, whether they run in this process, on Ray actors
(tuner/ray_fanout.py) or on a fake in the tests.

    pool.free()           how many more jobs it can take now
    pool.submit(job)      start measuring job.schedule
    pool.wait(timeout_s)  the jobs finished since the last call (a result, or a dead or hung worker)

A pool never raises for a schedule: a measure that raises, a worker that dies or hangs, is a
`Done` whose measurement says so (a dead or hung worker sets `killed_worker`, so the loop never
dispatches that schedule again). Ctrl-C (KeyboardInterrupt) is the one exception let through,
with `PoolLost`: the pool as a whole is gone (a Ray cluster whose head stopped answering).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dynaflow.runtime import Measurement, Schedule

from .config import TuneError
from .measuring import OnPairedSample, Target, crashed, run


class PoolLost(TuneError):
    """Every worker of the pool is out of reach: the tune ends, saying what the study keeps."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    id: int  # the trial's number: unique in its study
    schedule: Schedule
    time_limit_s: float | None = None
    on_sample: OnPairedSample | None = None  # pruning and Ctrl-C; pools in another process time fully
    paired: bool = False  # a search trial: the sequential schedule is measured right before it (tuner/measuring.py's measure_pair)


@dataclass(frozen=True, kw_only=True, slots=True)
class Done:
    job: Job
    measurement: Measurement
    worker: str | None = None  # who measured it; None: this process


class Pool(Protocol):
    def free(self) -> int: ...

    def submit(self, job: Job) -> None: ...

    def wait(self, timeout_s: float) -> list[Done]: ...


class InlinePool:
    """One job at a time, measured in this process when the loop waits for it."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.job: Job | None = None

    def free(self) -> int:
        return 0 if self.job else 1

    def submit(self, job: Job) -> None:
        if self.job is not None:
            raise RuntimeError("an InlinePool measures one job at a time; wait for it first")
        self.job = job

    def wait(self, timeout_s: float) -> list[Done]:
        job, self.job = self.job, None
        if job is None:
            return []
        try:
            m = run_job(self.target, job)
        except KeyboardInterrupt:
            self.job = job  # still in flight: the loop marks it interrupted
            raise
        except Exception as e:  # a bug in a target costs one trial, not the study
            m = crashed(e)
        return [Done(job=job, measurement=m)]


def run_job(target: Target, job: Job) -> Measurement:
    """What every pool runs for a job, in whichever process holds the target."""
    return run(target, job.schedule, time_limit_s=job.time_limit_s, paired=job.paired, on_sample=job.on_sample)


def measure_one(pool: Pool, schedule: Schedule, *, time_limit_s: float | None = None,
                poll_s: float = 0.1) -> Measurement:
    """Measure one schedule on an idle pool and wait for it (a baseline, a confirmation round)."""
    pool.submit(Job(id=-1, schedule=schedule, time_limit_s=time_limit_s))
    while not (done := pool.wait(poll_s)):
        pass
    return done[0].measurement
