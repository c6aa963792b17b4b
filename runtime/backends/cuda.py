"""CUDA backend: streams made once per share set (the most recent few kept), events per plan;
issue from one host thread.

Each run forks every stream off the current stream and joins them back, so work of one run
never overlaps the next and memory freed after a run is safe to reuse. Every event is made in
the context of the stream that records it (a green stream's is its green context: the driver
refuses a torch event recorded there); waiting on an event of another context is allowed. SM shares become
disjoint green-context partitions when the stack allows; otherwise the streams run
unpartitioned and the runner's notes say why. With `cuda_graph`, the whole schedule is
captured once (multi-stream capture: fork and join inside the capture) and replayed.
"""
from __future__ import annotations

import torch

from ..plan import Plan
from .base import Backend, Runner
from .green_ctx import PartitionUnavailable, StreamSet, StreamSets, TorchMark, make_partitioned_streams


def graph_pool_bytes(pool, device_index: int) -> int | None:
    """Bytes the caching allocator holds in a CUDA graph's private pool: the segments of the
    allocator's snapshot tagged with that pool. None if the snapshot says nothing of it."""
    segments = [s for s in torch.cuda.memory_snapshot()
                if tuple(s.get("segment_pool_id", ())) == tuple(pool) and s.get("device", device_index) == device_index]
    total = sum(int(s["total_size"]) for s in segments)
    return total or None


class CUDABackend(Backend):
    name = "cuda"

    def __init__(self, device: str = "cuda") -> None:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device.")
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._sets = StreamSets(make=self._make_streams, synchronize=self.synchronize)

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
        key = (tuple(s.sm_share for s in specs), tuple(s.priority for s in specs))
        stream_set = self._sets.acquire(key)
        streams, notes = stream_set.streams, stream_set.notes
        recorded = {w for t in plan.tasks for w in t.waits}
        marks = {i: stream_set.mark(plan.tasks[i].stream) for i in recorded}
        fork, joins = TorchMark(), [stream_set.mark(k) for k in range(len(streams))]

        @torch.no_grad()
        def run_once() -> None:
            plan.reset()
            main = torch.cuda.current_stream(self.device)
            fork.record(main)
            for s in streams:
                fork.block(s)
            for i, task in enumerate(plan.tasks):
                stream = streams[task.stream]
                with torch.cuda.stream(stream):
                    for w in task.waits:
                        marks[w].block(stream)
                    task.fn()
                    if i in marks:
                        marks[i].record(stream)
            for s, join in zip(streams, joins):
                join.record(s)
                join.block(main)

        released = []

        def close() -> None:  # once per runner, however often called; events before their contexts
            if not released:
                released.append(True)
                for m in (*marks.values(), *joins):
                    m.close()
                self._sets.release(key)

        if not plan.schedule.cuda_graph:
            return Runner(run=run_once, notes=notes, close=close, mark=stream_set.mark, streams=streams)
        try:
            replay, pool_bytes = self._capture(run_once)
        except BaseException:
            close()
            raise
        return Runner(run=replay, notes={**notes, "cuda_graph": "captured once, replayed"}, close=close,
                      peak_bytes=pool_bytes)

    def _capture(self, run_once):
        """Returns (replay, bytes of the graph's private memory pool or None if unknown)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up outside capture: lazy inits, cuBLAS workspaces
                run_once()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_once()
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
