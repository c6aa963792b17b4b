"""Progress of a study on stderr: distinct schedules measured, the best so far and its speedup
(single measurements, marked unconfirmed: the confirmation re-measures before anything is
stored), failures by outcome, duplicates answered from the study."""
from __future__ import annotations

import sys

from dynaflow.runtime import Measurement


class Progress:
    def __init__(self, *, total: int | None, desc: str, baseline_tokens_per_s: float, enabled: bool = True,
                 done: int = 0, position: int = 0) -> None:
        self.baseline = baseline_tokens_per_s
        self.best = baseline_tokens_per_s
        self.failures: dict[str, int] = {}
        self.duplicates = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm  # optuna's own dependency

            total = None if total is None else max(total, done)  # a budget already spent reads n/n
            self.bar = tqdm(total=total, initial=done, desc=desc, unit=" schedules", file=sys.stderr,
                            dynamic_ncols=True, position=position)

    def update(self, m: Measurement, *, counted: bool = True, workers: dict[str, dict[str, int]] | None = None) -> None:
        if m.ok:
            self.best = max(self.best, m.tokens_per_s)
        if not counted:
            self.duplicates += 1
        elif not m.ok:
            self.failures[m.outcome.value] = self.failures.get(m.outcome.value, 0) + 1
        if self.bar is None:
            return
        postfix = {"unconfirmed best": f"{self.best:,.0f} tok/s ({self.best / self.baseline:.2f}x this run's baseline)"}
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
