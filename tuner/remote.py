"""Measuring in another process: one protocol for every place a trial runs away from the tuner's
driver: a tensor-parallel group's rank processes (tuner/tp.py), vLLM's worker
(tuner/vllm_engine.py) and a Ray actor (tuner/ray_fanout.py).

The driver sends requests, frozen dataclasses that pickle, over its transport (pipes, vLLM's
collective_rpc, Ray actor calls):

    Prepare(workload, config)                   build the workload there    -> a Description
    Measure(schedule, time_limit_s, paired)     time it (a paired round)    -> a Measurement
    Explain(schedule)                           what ran at the same time   -> a dict, or None

The process that holds the model answers each with `Station.handle(request)`, a `Reply` that
never raises: a measure that raises is a CRASHED measurement, a Prepare or an Explain that
raises a Reply carrying the error's text. What only the driver can see, the transport failing,
is `WorkerLost`: a process that died makes the trial CRASHED (`died`), one that did not answer
within the trial's limit and a grace TIMEOUT (`hung`), both with `killed_worker` set (the loop
never dispatches that schedule again). `RemoteTarget` is the Target over any transport: a
subclass says how to start its process(es), send one request and stop them; a lost process is
started and prepared again at the next request. tests/test_remote.py runs one conformance suite
over every target and every pool.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from dynaflow.runtime import (BatchLayout, Hardware, MeasureConfig, Measurement, OpGraph, Schedule, TrialOutcome,
                              Workload)
from dynaflow.search_spaces import SpaceContext

from .measuring import Target, close_target, crashed, run
from .records import TrialMeasurement


@dataclass(frozen=True, slots=True)
class Prepare:
    workload: Workload
    config: MeasureConfig | None = None  # None: the station's own (a Ray worker's target factory holds it)


@dataclass(frozen=True, slots=True)
class Measure:
    schedule: Schedule
    time_limit_s: float | None = None
    paired: bool = False  # a search trial: the sequential schedule is measured right before it


@dataclass(frozen=True, slots=True)
class Explain:
    schedule: Schedule


Request = Prepare | Measure | Explain


@dataclass(frozen=True, slots=True)
class Reply:
    value: Any = None
    error: str | None = None  # a request that failed there, in one line

    def measurement(self) -> Measurement:
        """A Measure's answer: its measurement, or a CRASHED one carrying the error."""
        return crashed(self.error) if self.error is not None else self.value


@dataclass(frozen=True, kw_only=True, slots=True)
class Description:
    """What the driver needs of a prepared workload: the search space's context (its graph
    without weights), the device's peaks and the output tolerance."""

    hardware: Hardware
    graph: OpGraph
    layout: BatchLayout
    peaks: Any = None
    tolerance: Any = None

    @classmethod
    def of(cls, target: Target) -> "Description":
        ctx = target.space_context()
        light = OpGraph(ops=ctx.graph.ops, module=None, writes_output=ctx.graph.writes_output)
        return cls(hardware=target.hardware, graph=light, layout=ctx.layout, peaks=getattr(target, "peaks", None),
                   tolerance=getattr(target, "tolerance", None))

    def space_context(self) -> SpaceContext:
        return SpaceContext(hardware=self.hardware, graph=self.graph, layout=self.layout)


class WorkerLost(Exception):
    """The transport failed: the process died or did not answer. `measurement` is the trial's."""

    def __init__(self, measurement: Measurement, replies: dict[int, Reply] | None = None) -> None:
        super().__init__(measurement.message)
        self.measurement = measurement
        self.replies = replies or {}  # what the others of a group answered before (tuner/tp.py)


def died(message: str, replies: dict[int, Reply] | None = None) -> WorkerLost:
    return WorkerLost(TrialMeasurement(outcome=TrialOutcome.CRASHED, message=message, killed_worker=True), replies)


def hung(message: str, replies: dict[int, Reply] | None = None) -> WorkerLost:
    return WorkerLost(TrialMeasurement(outcome=TrialOutcome.TIMEOUT, message=message, killed_worker=True), replies)


def error_text(e: BaseException) -> str:
    """An error in one line: a ValueError (a refusal, worded for the user) as it is, others with their type."""
    first = (str(e).splitlines() or [""])[0]
    return first if type(e) is ValueError else f"{type(e).__name__}: {first}"


class Station:
    """The side that holds the model: `build(workload, config)` makes its target at each Prepare
    (the last one's is closed first), and every request gets a Reply."""

    def __init__(self, build: Callable[[Workload, MeasureConfig | None], Target]) -> None:
        self.build = build
        self.target: Target | None = None

    def handle(self, request: Request) -> Reply:
        if isinstance(request, Prepare):
            self.close()
            try:
                self.target = self.build(request.workload, request.config)
                return Reply(Description.of(self.target))
            except Exception as e:  # noqa: BLE001 - the workload cannot be built here: the driver says why
                self.target = None
                return Reply(error=error_text(e))
        if self.target is None:
            return Reply(error=f"{type(request).__name__} before any Prepare: no workload is built here")
        if isinstance(request, Measure):
            try:
                return Reply(run(self.target, request.schedule, time_limit_s=request.time_limit_s,
                                 paired=request.paired))
            except Exception as e:  # noqa: BLE001 - a measure that raised: one crashed trial, the process lives on
                return Reply(crashed(e))
        if isinstance(request, Explain):
            explain = getattr(self.target, "explain", None)  # a fake's may have none
            try:
                return Reply(None if explain is None else explain(request.schedule))
            except Exception as e:  # noqa: BLE001 - said by the driver
                return Reply(error=error_text(e))
        return Reply(error=f"not a request of tuner/remote.py: {type(request).__name__}")

    def close(self) -> None:
        if self.target is not None:
            close_target(self.target)
            self.target = None


class RemoteTarget:
    """A Target whose model lives in another process. A subclass is the transport: `connect()`
    starts the process(es), `send(request, timeout_s)` returns the Reply to one request (raising
    WorkerLost when the process died, or did not answer by `timeout_s` and its own grace),
    `disconnect()` stops them (killing what does not stop), and `lost()`, after a WorkerLost,
    by default `disconnect()`. Trials time fully: pruning needs the driver's study."""

    def __init__(self, workload: Workload, config: MeasureConfig | None) -> None:
        self.prepare = Prepare(workload, config)
        self.connected = False
        self.description = self._prepared()
        self.hardware = self.description.hardware
        d = self.description
        self.graph, self.peaks, self.tolerance = d.graph, d.peaks, d.tolerance

    # --- the transport: a subclass's --------------------------------------------------------

    def connect(self) -> None:
        pass

    def send(self, request: Request, timeout_s: float | None) -> Reply:
        raise NotImplementedError

    def disconnect(self) -> None:
        pass

    def lost(self) -> None:
        self.disconnect()

    # --- the Target -------------------------------------------------------------------------

    def space_context(self) -> SpaceContext:
        return self.description.space_context()

    def measure(self, schedule: Schedule, *, on_sample=None, time_limit_s=None) -> Measurement:
        try:
            reply = self.ask(Measure(schedule, time_limit_s), time_limit_s)
        except WorkerLost as e:
            return e.measurement
        return reply.measurement()

    def explain(self, schedule: Schedule) -> dict | None:
        try:
            reply = self.ask(Explain(schedule), None)
        except WorkerLost as e:
            raise RuntimeError(e.measurement.message) from None
        if reply.error is not None:
            raise RuntimeError(reply.error)
        return reply.value

    def close(self) -> None:
        if self.connected:
            self.connected = False
            self.disconnect()

    def ask(self, request: Request, timeout_s: float | None) -> Reply:
        """The reply to `request` (the process started and prepared again first if it was lost)."""
        if not self.connected:
            self._prepared()
        try:
            return self.send(request, timeout_s)
        except WorkerLost:
            self.connected = False
            self.lost()
            raise

    def _prepared(self) -> Description:
        self.connect()
        self.connected = True
        try:
            reply = self.send(self.prepare, None)
        except WorkerLost as e:
            self.connected = False
            self.lost()
            raise RuntimeError(f"{self.prepare.workload.key} could not be prepared: {e.measurement.message}") from None
        if reply.error is not None:
            self.close()
            raise ValueError(reply.error)
        return reply.value
