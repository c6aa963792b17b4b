"""When each op of each nano-batch ran, on which stream: CUDA events on a GPU, clocks on CPU.

    tl = record_timeline(compiled)           # runs the schedule 5 times, every task timed, medians kept
    tl.to_chrome_trace("trace.json")         # open in chrome://tracing or ui.perfetto.dev

Recording wraps the plan's tasks for one run and restores them; the model is not touched.
"""
from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path


from .executor import Compiled


@dataclass(frozen=True, kw_only=True, slots=True)
class Span:
    op: str
    nano: int
    stream: int
    start_ms: float
    end_ms: float
    resource: str = "compute"  # a graph.Resource (a str) of the op


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeline:
    label: str
    spans: tuple[Span, ...]

    @property
    def makespan_ms(self) -> float:
        return max((s.end_ms for s in self.spans), default=0.0)

    def to_chrome_trace(self, path: str | Path | None = None) -> dict:
        """The Chrome/Perfetto trace-event format: one thread per stream, one slice per task."""
        events = [{"name": s.op, "cat": s.resource, "ph": "X", "pid": 1, "tid": s.stream,
                   "ts": s.start_ms * 1e3, "dur": (s.end_ms - s.start_ms) * 1e3,
                   "args": {"nano_batch": s.nano, "resource": s.resource}} for s in self.spans]
        events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": k, "args": {"name": f"stream {k}"}}
                   for k in sorted({s.stream for s in self.spans})]
        trace = {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"schedule": self.label}}
        if path is not None:
            Path(path).write_text(json.dumps(trace))
        return trace


def record_timeline(compiled: Compiled, resources: dict[str, str] | None = None, *, runs: int = 5) -> Timeline:
    """Run the compiled schedule `runs` times with every task timed; each (op, nano-batch) span
    is the median start and end over the runs (one run's noise would draw a different picture
    each time). Not for measuring: timing adds a little overhead per task, which is why
    measurement (Bench.measure) never does this."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, but got {runs}.")
    plan, resources = compiled.plan, resources or {}
    if plan.schedule.cuda_graph:
        raise ValueError("a timeline needs the schedule run eagerly: a CUDA graph replays without its tasks; "
                         "compile it with cuda_graph=False to see its timeline.")
    cuda = compiled.out.is_cuda
    marks: list[tuple] = []
    lock = threading.Lock()
    originals = [t.fn for t in plan.tasks]
    runner = compiled.runner
    # On a device each stream's spans are timed with events of its own context (a green stream
    # may record no other), from a base event that stream records before each run: the streams
    # are idle then, so the bases fire together, within the microseconds between their issues.
    events = {id(t): (runner.mark(t.stream, True), runner.mark(t.stream, True)) for t in plan.tasks} if cuda else {}
    bases = [runner.mark(k, True) for k in range(len(runner.streams))] if cuda else []

    def timed(task, fn):
        def run() -> None:
            if cuda:
                start, end = events[id(task)]
                start.record(runner.streams[task.stream])
                fn()
                end.record(runner.streams[task.stream])
            else:
                start = time.perf_counter()
                fn()
                end = time.perf_counter()
            with lock:
                marks.append((task, start, end))
        return run

    for task in plan.tasks:
        task.fn = timed(task, task.fn)
    per_task: dict[int, list[tuple[float, float]]] = {}
    try:
        compiled()  # warm: first-run costs are not the schedule's
        compiled.backend.synchronize()
        for _ in range(runs):
            marks.clear()
            for base, stream in zip(bases, runner.streams):
                base.record(stream)
            t0 = time.perf_counter()
            compiled()
            compiled.backend.synchronize()
            for t, s, e in marks:
                span = ((bases[t.stream].elapsed_ms(s), bases[t.stream].elapsed_ms(e)) if cuda
                        else ((s - t0) * 1e3, (e - t0) * 1e3))
                per_task.setdefault(id(t), []).append(span)
    finally:
        for task, fn in zip(plan.tasks, originals):
            task.fn = fn
        for m in (*bases, *(m for pair in events.values() for m in pair)):
            m.close()
    spans = []
    for t in plan.tasks:
        times = per_task.get(id(t), [])
        if times:
            spans.append(Span(op=t.op, nano=t.nano, stream=t.stream, resource=resources.get(t.op, "compute"),
                              start_ms=statistics.median(a for a, _ in times),
                              end_ms=statistics.median(b for _, b in times)))
    return Timeline(label=plan.schedule.label, spans=tuple(sorted(spans, key=lambda s: s.start_ms)))
