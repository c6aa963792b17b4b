"""The backend interface: turn a Plan into a callable that runs it once, and wait for the device."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

from ..plan import Plan


@dataclass(kw_only=True)
class Runner:
    """Runs a plan once per call. `notes`: how the backend realised the schedule (e.g. why SM
    partitions were not applied), recorded with every measurement."""

    run: Callable[[], None]
    notes: dict[str, str] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    streams: list = field(default_factory=list)  # a device backend's streams, by schedule stream index
    mark: Callable[..., object] | None = None  # mark(k, timing): an event stream k may record
    peak_bytes: int | None = None  # known without a run (a CUDA graph's pool, sized at capture)
    # around(fn): fn as this plan's runs run, in the state the backend sets before each (the CPU
    # backend's thread counts); the executor wraps the case's own sequential call in it
    around: Callable[[Callable[[], None]], Callable[[], None]] = lambda fn: fn
    # the intra-op thread count each stream's thread saw in the last run; None: the backend has none
    threads_seen: Callable[[], tuple[int, ...]] | None = None


class Backend(ABC):
    name: str = "abstract"

    @abstractmethod
    def prepare(self, plan: Plan) -> Runner:
        """Create streams/threads/events once; the returned runner issues the plan's tasks."""

    @abstractmethod
    def synchronize(self) -> None:
        """Block until all work issued so far has finished."""

    def peak_bytes(self, plan: Plan, runner: Runner) -> int | None:
        """Peak bytes allocated above the starting level during one run; None if unknown."""
        return None
