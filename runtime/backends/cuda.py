"""CUDA backend: streams made once per share set (the most recent few kept), events per plan;
issue from one host thread.

The sequential schedule (one stream, no share, no graph) runs on the current stream, as the
unchanged model does: nothing a candidate made (green streams, priorities, graph pools) is on
its path. Each other run forks every stream off the current stream and joins them back, so work of one run
never overlaps the next and memory freed after a run is safe to reuse. Every event is made in
the context of the stream that records it (a green stream's is its green context: the driver
refuses a torch event recorded there); waiting on an event of another context is allowed. SM shares become
disjoint green-context partitions when the stack allows; otherwise the streams run
unpartitioned and the runner's notes say why. With `cuda_graph`, the whole schedule is
captured once (multi-stream capture: fork and join inside the capture) and replayed.

How a capture over green streams begins is not documented, so both ways are tried at the first
partitioned capture and the one that works is kept for the backend (`capture_mode`, also in each
runner's notes): "green", the capture begun on the first green stream, the others forking from
and joining into it by events of their own contexts; or "joined", begun on a torch stream
(primary context) that the green streams join by events. Where neither works, a graph schedule
with SM shares is invalid here (ValueError), and says why.
"""
from __future__ import annotations

import torch

from ..plan import Plan
from ..schedule import StreamSpec
from .base import Backend, Runner
from .green_ctx import PartitionUnavailable, StreamSet, StreamSets, TorchMark, make_partitioned_streams

CAPTURE_MODES = ("green", "joined")  # tried in this order at the first capture over green streams
_FOUND: dict[int, str] = {}  # device index -> the capture mode that worked in this process


def graph_pool_bytes(pool, device_index: int) -> int | None:
    """Bytes the caching allocator holds in a CUDA graph's private pool: the segments of the
    allocator's snapshot tagged with that pool. None if the snapshot says nothing of it."""
    segments = [s for s in torch.cuda.memory_snapshot()
                if tuple(s.get("segment_pool_id", ())) == tuple(pool) and s.get("device", device_index) == device_index]
    total = sum(int(s["total_size"]) for s in segments)
    return total or None


class CUDABackend(Backend):
    name = "cuda"

    def __init__(self, device: str = "cuda", *, capture_mode: str | None = None) -> None:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device.")
        if capture_mode not in (None, *CAPTURE_MODES):
            raise ValueError(f"capture_mode must be one of {CAPTURE_MODES} or None, but got {capture_mode!r}.")
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._sets = StreamSets(make=self._make_streams, synchronize=self.synchronize)
        self._forced = capture_mode is not None  # the probe tries each mode on its own
        self.capture_mode = capture_mode or _FOUND.get(self.device.index)  # None: found at the first capture

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def peak_bytes(self, plan: Plan, runner: Runner) -> int | None:
        """Bytes a run needs above what it starts from. From a quiesced start: the values the
        previous run left in the plan are freed first (a run frees them as it begins, so counting
        them in the start would hide the run's own peak). A CUDA graph's replays allocate nothing:
        its private pool, sized at capture, is what it needs; None where that is unknown."""
        if plan.schedule.cuda_graph:
            return runner.peak_bytes
        plan.reset()
        self.synchronize()
        start = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        runner.run()
        self.synchronize()
        return torch.cuda.max_memory_allocated(self.device) - start

    def prepare(self, plan: Plan) -> Runner:
        specs = plan.schedule.streams
        if len(specs) == 1 and specs[0] == StreamSpec() and not plan.schedule.cuda_graph:
            return self._plain(plan)
        key = (tuple(s.sm_share for s in specs), tuple(s.priority for s in specs))
        stream_set = self._sets.acquire(key)
        streams, notes = stream_set.streams, stream_set.notes
        recorded = {w for t in plan.tasks for w in t.waits}
        marks = {i: stream_set.mark(plan.tasks[i].stream) for i in recorded}
        joins = [stream_set.mark(k) for k in range(len(streams))]
        forks: list = []  # each issuer's fork event, closed with the runner

        def issuer(origin: int | None):
            """One run, forked from and joined into the current torch stream (origin None) or into
            stream `origin` of the set (a capture begun there), with events each stream may record."""
            fork = TorchMark() if origin is None else stream_set.mark(origin)
            forks.append(fork)

            @torch.no_grad()
            def run_once() -> None:
                plan.reset()
                main = torch.cuda.current_stream(self.device) if origin is None else streams[origin]
                fork.record(main)
                for k, s in enumerate(streams):
                    if k != origin:
                        fork.block(s)
                for i, task in enumerate(plan.tasks):
                    stream = streams[task.stream]
                    with torch.cuda.stream(stream):
                        for w in task.waits:
                            marks[w].block(stream)
                        task.fn()
                        if i in marks:
                            marks[i].record(stream)
                for k, (s, join) in enumerate(zip(streams, joins)):
                    if k != origin:
                        join.record(s)
                        join.block(main)

            return run_once

        run_once = issuer(None)
        released = []

        def close() -> None:  # once per runner, however often called; events before their contexts
            if not released:
                released.append(True)
                for m in (*marks.values(), *joins, *forks):
                    m.close()
                self._sets.release(key)

        if not plan.schedule.cuda_graph:
            return Runner(run=run_once, notes=notes, close=close, mark=stream_set.mark, streams=streams)
        try:
            green = [k for k, spec in enumerate(specs) if spec.sm_share is not None] if stream_set.marks else []
            replay, pool_bytes, how = self._capture(run_once, issuer, green[0] if green else None, streams)
        except BaseException:
            close()
            raise
        return Runner(run=replay, notes={**notes, "cuda_graph": f"captured once ({how}), replayed"}, close=close,
                      peak_bytes=pool_bytes)

    def _plain(self, plan: Plan) -> Runner:
        """One stream, no share, the default priority, no graph (the sequential schedule): its tasks
        in order on the current stream, in the primary context, on every SM, as the unchanged model
        runs, whatever streams, partitions or graphs the schedules measured before it made."""
        stream = torch.cuda.current_stream(self.device)

        @torch.no_grad()
        def run() -> None:
            plan.reset()
            for task in plan.tasks:
                task.fn()

        return Runner(run=run, streams=[stream], mark=lambda k, timing=False: TorchMark(timing))

    def _capture(self, run_once, issuer, first_green: int | None, streams: list):
        """(replay, bytes of the graph's private memory pool or None, how it was captured). Over
        green streams (the first is `first_green`), the backend's capture mode, or each mode in
        turn until one works."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up outside capture: lazy inits, cuBLAS workspaces
                run_once()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if first_green is None:
            return (*self._capture_once(run_once, None), "begun on a torch stream")
        failed = []
        for mode in ([self.capture_mode] if self.capture_mode else CAPTURE_MODES):
            origin = first_green if mode == "green" else None
            run = run_once if origin is None else issuer(origin)
            try:
                replay, pool = self._capture_once(run, None if origin is None else streams[origin])
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:
                failed.append(f"{mode}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                self.synchronize()
                continue
            self.capture_mode = mode
            if not self._forced:
                _FOUND[self.device.index] = mode
            tried = f"; {failed[0]}" if failed else ""
            return replay, pool, f"capture mode {mode}{tried}"
        raise ValueError("a CUDA graph over green-context streams cannot be captured on this stack ("
                         + "; ".join(failed) + "); run this schedule without cuda_graph or without sm_share")

    def _capture_once(self, run, stream):
        """Capture `run` on `stream` (None: a torch stream of torch's choosing)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            run()
        self.synchronize()
        return graph.replay, graph_pool_bytes(graph.pool(), self.device.index)

    def _make_streams(self, key) -> StreamSet:
        shares, priorities = key
        notes: dict[str, str] = {}
        if any(s is not None for s in shares):
            if any(s is None for s in shares):
                notes["partition"] = "mixed: streams without sm_share run on the SMs the others leave"
            try:
                want = [s for s in shares if s is not None]
                own = [p for s, p in zip(shares, priorities) if s is not None]  # each share's own priority
                part, granted, green_marks, close = make_partitioned_streams(self.device.index, want, own)
                notes["partition"] = f"green contexts, granted SMs {granted} for requested {want}"
                it, made = iter(zip(part, green_marks)), []
                for s, p in zip(shares, priorities):
                    made.append(next(it) if s is not None else (torch.cuda.Stream(self.device, priority=p), TorchMark))
                return StreamSet(streams=[st for st, _ in made], marks=[m for _, m in made], notes=notes, close=close)
            except PartitionUnavailable as e:
                notes["partition"] = f"unavailable: {e}; streams run unpartitioned"
        return StreamSet(streams=[torch.cuda.Stream(self.device, priority=p) for p in priorities], notes=notes)
