"""The tune command's configuration: one dataclass, filled once at the edge (the CLI)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dynaflow.runtime import MeasureConfig, Workload

from .storage import StorageConfig

# Optuna's QMC sampler needs a fixed search space; the spaces here are define-by-run (a parameter's
# range depends on earlier ones), so it would draw every trial after the first at random, warning
# each time: it is not offered.
SAMPLERS = ("tpe", "random")


class TuneError(RuntimeError):
    """A run that cannot go on, said in one line with what to do (the CLI prints it, no traceback)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TuneConfig:
    workloads: tuple[Workload, ...]
    space: str = "nanoflow"
    trials: int | None = 30  # distinct schedules measured per workload study, across resumed runs
    timeout_s: float | None = None  # wall time of this run's search, per workload
    trial_timeout_s: float | None = 60.0
    storage: StorageConfig = StorageConfig()
    store_root: Path = Path("results")
    sampler: str = "tpe"
    seed: int | None = None  # None: each run seeds its sampler with its baseline trial's number (0 in a new study)
    measure: MeasureConfig = MeasureConfig()  # the one set of measure defaults: the CLI's flags default to it too
    prune: bool = True
    confirm_top: int = 3
    confirm_rounds: int = 12  # paired rounds per candidate at most: the confirmation's round budget
    confirm_min_rounds: int = 5  # quiet paired rounds a candidate needs before any verdict on it
    accept_contention: bool = False  # busy rounds count as evidence (the record says so; never replaces a quiet one)
    min_effect: float = 0.03  # the smallest speedup the confirmation is asked to resolve
    max_duplicates: int = 25  # proposals in a row of schedules already measured: the search converged
    progress: bool = True
    model: bool = True  # the performance model orders and bounds the search (tuner/guide.py); False: blind
    renew_profile: bool = False  # measure the model's profile again instead of reading the cached one

    def __post_init__(self) -> None:
        if isinstance(self.storage, str):
            object.__setattr__(self, "storage", StorageConfig(url=self.storage))
        if not self.workloads:
            raise ValueError("at least one --workload is needed.")
        if self.trials is None and self.timeout_s is None:
            raise ValueError("give --trials or --timeout-s (or both): the search needs a budget.")
        if self.trials is not None and self.trials < 1:
            raise ValueError(f"--trials must be >= 1 (distinct schedules to measure), but got {self.trials}.")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"--timeout-s must be > 0, but got {self.timeout_s}.")
        if self.trial_timeout_s is not None and not self.trial_timeout_s > 0:
            raise ValueError(f"--trial-timeout-s must be > 0, but got {self.trial_timeout_s}.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {SAMPLERS}, but got {self.sampler!r}.")
        if self.confirm_top < 1 or self.confirm_rounds < 1:
            raise ValueError(f"--confirm-top and --confirm-rounds must be >= 1, but got "
                             f"{self.confirm_top} and {self.confirm_rounds}.")
        if self.confirm_min_rounds < 2:
            raise ValueError(f"--confirm-min-rounds must be >= 2 (an interval needs two rounds), but got "
                             f"{self.confirm_min_rounds}.")
        if not 0 < self.min_effect < 1:
            raise ValueError(f"--min-effect must be in (0, 1), e.g. 0.03 for 3%, but got {self.min_effect}.")
