"""Policies the vLLM plugin tests name in DYNAFLOW_VLLM_POLICY (they run inside vLLM's worker)."""
from __future__ import annotations

import json
import os
import itertools
import random

from dynaflow.runtime.schedule import Schedule, Step, StreamSpec

_CALLS = itertools.count()


def random_schedules(layout) -> Schedule:
    """A random schedule for every step of two requests or more: 2-4
    nano-batches cut on request boundaries, on 1 or 2 streams, ops issued op-major (nano-batches
    interleaved); a new draw at every step (seeded by the step's index: the same run, the same draws).
    About one step in seven with a prefill chunk gets a token split inside a request instead.
    Each distinct schedule is appended to the file DYNAFLOW_TEST_SCHEDULES names."""
    from dynaflow.runtime.vllm import RUNNERS

    n = layout.num_requests
    if n < 2 or not RUNNERS:
        return Schedule()
    rng = random.Random(next(_CALLS))
    if rng.random() < 0.15 and max(layout.request_tokens) > 1:
        return cut_inside_a_request(layout)  # one the step cannot take: sequential, said once
    k = rng.randint(2, min(4, n))
    cuts = sorted(rng.sample(range(1, n), k - 1))
    sizes = tuple(b - a for a, b in zip([0, *cuts], [*cuts, n]))
    streams = int(os.environ.get("DYNAFLOW_TEST_STREAMS", "0")) or rng.choice((1, 2))
    order = tuple(Step(op=op, nano=b, stream=b % streams) for op in RUNNERS[-1].graph.names for b in range(k))
    schedule = Schedule(split_sizes=sizes, streams=tuple(StreamSpec() for _ in range(streams)), order=order)
    path = os.environ.get("DYNAFLOW_TEST_SCHEDULES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"split_sizes": sizes, "streams": streams}) + "\n")
    return schedule


def cut_inside_a_request(layout) -> Schedule:
    """Token splits that fall inside a request whenever one holds more than one token: the plugin
    must run such a step sequential and say why once."""
    longest = max(range(layout.num_requests), key=lambda i: layout.request_tokens[i])
    if layout.request_tokens[longest] < 2:
        return Schedule()
    half = sum(layout.request_tokens[:longest]) + layout.request_tokens[longest] // 2
    return Schedule(split_unit="tokens", split_sizes=(half, layout.num_tokens - half))
