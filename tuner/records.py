"""What the tuner knows of a trial beyond the runtime's Measurement: the outcomes only a study
gives (`StudyOutcome`), a measurement as a trial holds it (`TrialMeasurement`: reused from the
study, or fatal to its worker), and a trial's record: what the study keeps of one trial (the
`result` user attribute of its Optuna trial), typed, with its JSON round trip. The JSON is the
study's format, unchanged: studies written by earlier versions read back (a field they lack
takes its default), and the notebook, optuna-dashboard and `analysis.trials_table` read the same
keys."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

from dynaflow.runtime import Measurement, Schedule, TrialOutcome


class StudyOutcome(str, Enum):
    """A trial's outcome that no measurement gives, only the study: beside TrialOutcome's."""

    INTERRUPTED = "interrupted"  # the user stopped the study while it ran
    SKIPPED = "skipped"  # not measured: other processes sharing the study had spent its budget


@dataclass(frozen=True, kw_only=True)
class TrialMeasurement(Measurement):
    """A measurement as a trial of the study holds it: the runtime's Measurement, or a study's
    outcome, with what only the tuner knows of it."""

    outcome: TrialOutcome | StudyOutcome
    duplicate: bool = False  # a result reused from the study for a schedule measured before, not measured again
    killed_worker: bool = False  # the run killed or hung the process measuring it (never dispatched again)

    @classmethod
    def of(cls, m: Measurement, **changes) -> "TrialMeasurement":
        return cls(**{**{f.name: getattr(m, f.name) for f in dataclasses.fields(m)}, **changes})


def killed_worker(m: Measurement) -> bool:
    return isinstance(m, TrialMeasurement) and m.killed_worker


def duplicate(m: Measurement) -> bool:
    return isinstance(m, TrialMeasurement) and m.duplicate


@dataclass(frozen=True, kw_only=True, slots=True)
class TrialRecord:
    outcome: str | None = None  # a TrialOutcome's value; None: nothing recorded yet (a running trial)
    message: str = ""
    schedule: dict | None = None  # Schedule.to_json(); None: the trial ended before one was recorded
    label: str | None = None
    latency_ms: float | None = None
    spread: float | None = None
    efficiency: float | None = None
    peak_bytes: int | None = None
    samples_ms: tuple[float, ...] = ()
    baseline_samples_ms: tuple[float, ...] = ()
    speedup: float | None = None  # over the sequential run measured right before it (a pruned one's: partial)
    tokens_per_s: float | None = None
    worker: str | None = None  # None: this process; "driver": answered from the study, not measured
    baseline_trial: int | None = None  # the baseline trial of the run it belongs to
    killed_worker: bool | None = None  # None: written before the field existed
    duplicate: bool = False  # a result reused from the study, not measured again
    tolerance: dict[str, Any] | None = None
    telemetry: dict[str, Any] | None = None
    notes: dict[str, str] | None = None

    @classmethod
    def of(cls, schedule: Schedule, m: Measurement, *, worker: str | None, baseline: int | None,
           speedup: float | None) -> "TrialRecord":
        return cls(outcome=m.outcome.value, message=m.message, schedule=schedule.to_json(), label=schedule.label,
                   latency_ms=m.latency_ms, spread=m.spread, efficiency=m.efficiency, peak_bytes=m.peak_bytes,
                   samples_ms=tuple(m.samples_ms), baseline_samples_ms=tuple(m.baseline_samples_ms), speedup=speedup,
                   tokens_per_s=m.tokens_per_s, worker=worker, baseline_trial=baseline, killed_worker=killed_worker(m),
                   duplicate=duplicate(m), tolerance=m.tolerance, telemetry=m.telemetry or None, notes=m.notes or None)

    def to_json(self) -> dict[str, Any]:
        if self.outcome is None:
            return {}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["samples_ms"], out["baseline_samples_ms"] = list(self.samples_ms), list(self.baseline_samples_ms)
        for optional in ("tolerance", "telemetry", "notes"):
            if out[optional] is None:
                del out[optional]
        if not self.duplicate:
            del out["duplicate"]
        if self.killed_worker is None:
            del out["killed_worker"]
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> "TrialRecord":
        d = d or {}
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for samples in ("samples_ms", "baseline_samples_ms"):
            kw[samples] = tuple(kw.get(samples) or ())
        kw["duplicate"] = bool(kw.get("duplicate"))
        return cls(**kw)

    @property
    def killed(self) -> bool:
        """Whether the schedule killed or hung its worker (never dispatched again). Studies written
        before `killed_worker` was recorded said so only in the message."""
        if self.killed_worker is not None:
            return self.killed_worker
        failed = self.outcome in (TrialOutcome.CRASHED.value, TrialOutcome.TIMEOUT.value)
        return failed and "worker" in (self.message or "")

    def schedule_obj(self) -> Schedule | None:
        return Schedule.from_json(self.schedule) if self.schedule else None
