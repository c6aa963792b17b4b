"""A measurer with a known landscape, for testing the tuner without timing anything."""
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


class FakeMeasurer:
    """latency_ms = landscape(schedule); `failures` maps the n-th real measure call to an outcome
    (or to an exception class, which the measurer raises)."""

    def __init__(self, ctx: SpaceContext, landscape, failures=None, samples: int = 6) -> None:
        self.ctx, self.landscape, self.failures = ctx, landscape, dict(failures or {})
        self.hardware = ctx.hardware
        self.calls = 0
        self.samples = samples

    def space_context(self) -> SpaceContext:
        return self.ctx

    def measure(self, schedule, *, on_sample=None, time_limit_s=None) -> Measurement:
        self.calls += 1
        failure = self.failures.get(self.calls)
        if isinstance(failure, type) and issubclass(failure, BaseException):
            raise failure(f"injected at call {self.calls}")
        if failure is not None:
            return Measurement(outcome=failure, message=f"injected {failure.value} at call {self.calls}")
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
