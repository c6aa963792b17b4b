"""Progress of a study on stderr: trials done, best so far and its speedup, failures by outcome."""
from __future__ import annotations

import sys

from dynaflow.runtime import Measurement


class Progress:
    def __init__(self, *, total: int | None, desc: str, baseline_tokens_per_s: float, enabled: bool = True,
                 done: int = 0, position: int = 0) -> None:
        self.baseline = baseline_tokens_per_s
        self.best = baseline_tokens_per_s
        self.failures: dict[str, int] = {}
        self.bar = None
        if enabled:
            from tqdm import tqdm  # optuna's own dependency

            self.bar = tqdm(total=total, initial=done, desc=desc, unit="trial", file=sys.stderr, dynamic_ncols=True,
                            position=position)

    def update(self, study, m: Measurement, workers: dict[str, dict[str, int]] | None = None) -> None:
        if m.ok:
            self.best = max(self.best, m.tokens_per_s)
        else:
            self.failures[m.outcome.value] = self.failures.get(m.outcome.value, 0) + 1
        if self.bar is None:
            return
        postfix = {"best": f"{self.best:,.0f} tok/s", "speedup": f"{self.best / self.baseline:.3f}x"}
        postfix.update(self.failures)
        for name, counts in (workers or {}).items():
            postfix[name] = sum(counts.values())
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
