"""The tune command's configuration: one dataclass, filled once at the edge (the CLI)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dynaflow.runtime import Workload

SAMPLERS = ("tpe", "random", "qmc")


@dataclass(frozen=True, kw_only=True, slots=True)
class TuneConfig:
    workloads: tuple[Workload, ...]
    space: str = "nanoflow"
    trials: int | None = 30  # search trials per workload study, counted across resumed runs
    timeout_s: float | None = None  # wall time of this run's search, per workload
    trial_timeout_s: float | None = 60.0
    storage: str = "sqlite:///results/studies.db"
    store_root: Path = Path("results")
    sampler: str = "tpe"
    seed: int | None = 0
    warmup: int = 2
    repeats: int = 10
    prune: bool = True
    confirm_top: int = 3
    confirm_rounds: int = 3
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.workloads:
            raise ValueError("at least one --workload is needed.")
        if self.trials is None and self.timeout_s is None:
            raise ValueError("give --trials or --timeout-s (or both): the search needs a budget.")
        if self.trials is not None and self.trials < 0:
            raise ValueError(f"--trials must be >= 0, but got {self.trials}.")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"--timeout-s must be > 0, but got {self.timeout_s}.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {SAMPLERS}, but got {self.sampler!r}.")
        if self.confirm_top < 1 or self.confirm_rounds < 1:
            raise ValueError(f"--confirm-top and --confirm-rounds must be >= 1, but got "
                             f"{self.confirm_top} and {self.confirm_rounds}.")
        if "://" not in self.storage and not self.storage.startswith("journal:"):
            raise ValueError(f"--storage must be an Optuna storage URL such as sqlite:///results/studies.db "
                             f"or postgresql://user@host/db, or journal:PATH, but got {self.storage!r}.")
