"""Progress of a study on stderr: distinct schedules measured, the best paired speedup so far
among quiet rounds (each trial against the sequential run measured right before it: one round,
marked unconfirmed, since only the confirmation's rounds decide; a round measured while the
machine was busy is no evidence there, and none here: such rounds are only counted), failures
by outcome, duplicates answered from the study."""
from __future__ import annotations

import sys

from dynaflow.runtime import Measurement, telemetry

from .measuring import paired_speedup


class Progress:
    def __init__(self, *, total: int | None, desc: str, enabled: bool = True, done: int = 0,
                 position: int = 0) -> None:
        self.best: float | None = None  # the best paired speedup of a completed trial measured quiet
        self.busy = 0  # completed trials whose round was busy: not in `best`
        self.failures: dict[str, int] = {}
        self.duplicates = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm  # optuna's own dependency

            total = None if total is None else max(total, done)  # a budget already spent reads n/n
            self.bar = tqdm(total=total, initial=done, desc=desc, unit=" schedules", file=sys.stderr,
                            dynamic_ncols=True, position=position)

    def update(self, m: Measurement, *, counted: bool = True, workers: dict[str, dict[str, int]] | None = None) -> None:
        speedup = paired_speedup(m) if m.ok else None
        if speedup is not None and telemetry.contention(m.telemetry.get("busy")) is not None:
            self.busy += 1
        elif speedup is not None:
            self.best = speedup if self.best is None else max(self.best, speedup)
        if not counted:
            self.duplicates += 1
        elif not m.ok:
            self.failures[m.outcome.value] = self.failures.get(m.outcome.value, 0) + 1
        if self.bar is None:
            return
        postfix = {"best quiet round": "none yet" if self.best is None else f"{self.best:.2f}x (unconfirmed)"}
        if self.busy:
            postfix["busy rounds (not counted)"] = self.busy
        postfix.update(self.failures)
        if self.duplicates:
            postfix["duplicates"] = self.duplicates
        for name, counts in (workers or {}).items():
            postfix[name] = sum(counts.values())
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1 if counted else 0)
        if not counted:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
