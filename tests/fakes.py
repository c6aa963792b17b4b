"""A target with a known landscape, for testing the tuner without timing anything."""
from __future__ import annotations

import statistics

from dynaflow.runtime import Executor, Hardware, Measurement, TrialOutcome, Workload
from dynaflow.search_spaces import SpaceContext

H100 = Hardware(kind="cuda", name="NVIDIA H100 80GB HBM3", arch="9.0", num_sms=132, memory_bytes=80 * 2**30,
                software={"torch": "2.11.0", "cuda": "12.8", "driver": "570.1"})


def tiny_context(hardware: Hardware = H100, **batch) -> SpaceContext:
    batch = batch or dict(num_decode=32, context_len=16, prefill_tokens=32, prefill_chunk=16)
    ex = Executor(Workload(model="llama-tiny", **batch).build())
    ex.profile_ops(flops_per_byte=4.0)
    return SpaceContext(hardware=hardware, graph=ex.graph, layout=ex.case.layout)


class FakeTarget:
    """latency_ms = landscape(schedule); `failures` maps the n-th real measure call (of any
    schedule, or with `fail_candidates` of a non-sequential one: the search pairs each candidate
    with a sequential run) to an outcome (or to an exception class, which the measurer raises)."""

    def __init__(self, ctx: SpaceContext, landscape, failures=None, samples: int = 6,
                 fail_candidates: bool = False) -> None:
        self.ctx, self.landscape, self.failures = ctx, landscape, dict(failures or {})
        self.hardware = ctx.hardware
        self.calls = 0
        self.candidate_calls = 0
        self.fail_candidates = fail_candidates
        self.samples = samples

    def space_context(self) -> SpaceContext:
        return self.ctx

    def measure(self, schedule, *, on_sample=None, time_limit_s=None) -> Measurement:
        self.calls += 1
        self.candidate_calls += not schedule.is_sequential
        n = self.candidate_calls if self.fail_candidates else self.calls
        failure = None if self.fail_candidates and schedule.is_sequential else self.failures.get(n)
        if isinstance(failure, type) and issubclass(failure, BaseException):
            raise failure(f"injected at call {n}")
        if failure is not None:
            return Measurement(outcome=failure, message=f"injected {failure.value} at call {n}")
        latency = self.landscape(schedule)
        samples = []
        for i in range(self.samples):
            samples.append(latency * (1 + 0.002 * ((i * 7) % 5)))  # deterministic, small spread
            if on_sample is not None and on_sample(samples):
                return Measurement(outcome=TrialOutcome.PRUNED, samples_ms=tuple(samples))
        med = statistics.median(samples)
        tokens = self.ctx.layout.num_tokens
        return Measurement(outcome=TrialOutcome.OK, latency_ms=med, latency_p10_ms=min(samples),
                           latency_p90_ms=max(samples), samples_ms=tuple(samples),
                           tokens_per_s=tokens / med * 1e3, bound_ms=1.0, efficiency=1.0 / med)


A100 = Hardware(kind="cuda", name="NVIDIA A100-SXM4-80GB", arch="8.0", num_sms=108, memory_bytes=80 * 2**30)


def split_landscape(schedule) -> float:
    """Latency in ms: the baseline 10, candidate k (k + 1 requests first) 10 - |k - 2| ... best at k = 2."""
    if schedule.is_sequential:
        return 10.0
    k = schedule.split_sizes[0] - 1 if schedule.split_sizes else 5
    return 8.0 + 0.4 * abs(k - 2)


class PoisonFake(FakeTarget):
    """Schedules labelled poison-exit kill the process, poison-hang hang it (inside a Ray actor);
    with `die=False` they return CRASHED/TIMEOUT instead, for a single-process reference run."""

    def __init__(self, ctx, die: bool = True) -> None:
        super().__init__(ctx, split_landscape)
        self.die = die

    def measure(self, schedule, *, on_sample=None, time_limit_s=None):
        import os
        import time

        if schedule.label == "poison-exit":
            if self.die:
                os._exit(3)
            return Measurement(outcome=TrialOutcome.CRASHED, message="would exit")
        if schedule.label == "poison-hang":
            if self.die:
                time.sleep(3600)
            return Measurement(outcome=TrialOutcome.TIMEOUT, message="would hang")
        return super().measure(schedule, on_sample=on_sample, time_limit_s=time_limit_s)


def make_poison_fake(workload):
    return PoisonFake(tiny_context())


def make_sleeping_fake(workload, sleep_s: float = 0.05):
    import time

    class Sleeping(FakeTarget):
        def measure(self, schedule, **kw):
            time.sleep(sleep_s)
            return super().measure(schedule, **kw)

    return Sleeping(tiny_context(), split_landscape, samples=1)


def make_gpu_typed_fake(workload):
    """GPU 0 of the (faked) cluster is an H100, GPU 1 an A100."""
    import ray

    hardware = H100 if ray.get_gpu_ids()[0] == 0 else A100
    return FakeTarget(tiny_context(hardware), split_landscape)
