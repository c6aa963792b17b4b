"""Batch shapes: the bucket a record was tuned for, the shape of a live batch, which stored
bucket may answer a live batch, and a log of the shapes a server met (to tune those).

    smap = ScheduleMap.load("results", model="llama3-8b")   # counts the shapes it is asked for
    ... serve ...
    smap.shapes.save("shapes.json")                          # then: dynaflow-tune tune --shapes shapes.json
"""
from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import validate
from .batch import BatchLayout
from .files import write_json_atomic

SHAPES_SCHEMA = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class Bucket:
    """The batch shape a record was tuned for, or the shape of a live batch: decode requests,
    prefill tokens (in num_prefill requests), and the context length (a live one bucketed to
    the next power of two, so growing contexts make few shapes)."""

    num_decode: int
    prefill_tokens: int
    context_len: int
    num_prefill: int = 0

    @classmethod
    def of(cls, layout: BatchLayout, context_len: int = 0) -> "Bucket":
        kinds, tokens = layout.request_kinds, layout.request_tokens
        decode = sum(1 for k in kinds if k == "decode")
        prefill = [t for k, t in zip(kinds, tokens) if k != "decode"]
        return cls(num_decode=decode, prefill_tokens=sum(prefill), context_len=context_bucket(context_len),
                   num_prefill=len(prefill))

    @property
    def kinds(self) -> tuple[bool, bool]:
        """Which kinds of request the batch holds: (decode, prefill)."""
        return self.num_decode > 0, self.prefill_tokens > 0

    @property
    def tokens(self) -> int:
        return self.num_decode + self.prefill_tokens


def context_bucket(context_len: int) -> int:
    """0, or the next power of two at or above the context length."""
    return 0 if context_len <= 0 else 1 << (int(context_len) - 1).bit_length()


NEAREST_RATIO = 2.0  # a stored bucket answers live batches up to this factor away, per dimension



def distance(stored: Bucket, live: Bucket) -> float:
    """How far a stored bucket is from a live batch: the sum over decode requests and prefill
    tokens of |log2(live / stored)| (0 for a dimension empty in both). Infinite when the two
    hold different kinds of request: a split tuned for a mixed batch says nothing about a
    decode-only one, nor the reverse."""
    if stored.kinds != live.kinds:
        return math.inf
    return abs(_log2(live.num_decode) - _log2(stored.num_decode)) + \
        abs(_log2(live.prefill_tokens) - _log2(stored.prefill_tokens))  # an empty dimension adds 0.0


def candidates(buckets: list[Bucket], live: Bucket, max_ratio: float = NEAREST_RATIO) -> list[tuple[int, str]]:
    """(index, rule) of the stored buckets that may answer `live`, best first. "exact": the same
    decode requests and prefill tokens; "nearest": the same kinds of request, each dimension
    within `max_ratio` of the live batch, the smallest distance first (at or below the live
    batch before above it at equal distance). Within each, the closest context first."""
    limit = math.log2(max_ratio)
    out = []
    for i, b in enumerate(buckets):
        d = distance(b, live)
        if d == 0:
            out.append(((0, 0, abs(b.context_len - live.context_len)), (i, "exact")))
        elif d < math.inf and within(b, live, limit):
            above = b.num_decode > live.num_decode or b.prefill_tokens > live.prefill_tokens
            out.append(((1, d, above, abs(b.context_len - live.context_len)), (i, "nearest")))
    return [c for _, c in sorted(out, key=lambda x: x[0])]


def within(stored: Bucket, live: Bucket, limit: float) -> bool:
    """Each dimension the stored bucket holds within 2**limit of the live batch's."""
    return all(abs(math.log2(y / x)) <= limit + 1e-9 for x, y in (
        (stored.num_decode, live.num_decode), (stored.prefill_tokens, live.prefill_tokens)) if x)


class BucketIndex:
    """The stored buckets arranged for lookups: `first(live)` is the head of `candidates(...)` (the
    candidates at the smallest distance, in the same order) found without scoring every bucket.
    Grouped by the kinds of request; within a group, the distinct decode counts sorted (their log2
    beside), each with its distinct prefill token counts sorted; a search walks outward from the
    live shape and stops once a dimension alone is farther than the best distance found."""

    def __init__(self, buckets: list[Bucket], max_ratio: float = NEAREST_RATIO) -> None:
        self.buckets, self.limit = buckets, math.log2(max_ratio)
        points: dict[tuple, dict[int, dict[int, list[int]]]] = {}
        for i, b in enumerate(buckets):
            points.setdefault(b.kinds, {}).setdefault(b.num_decode, {}).setdefault(b.prefill_tokens, []).append(i)
        # kinds -> (log2 of each decode count, sorted; per decode count: (log2 of each prefill token count,
        # sorted; the indices of the buckets at each point))
        self.groups: dict[tuple, tuple[list[float], list[tuple[list[float], list[list[int]]]]]] = {}
        for kinds, by_decode in points.items():
            rows = [(by_decode[d], sorted(by_decode[d])) for d in sorted(by_decode)]
            self.groups[kinds] = ([_log2(d) for d in sorted(by_decode)],
                                  [([_log2(p) for p in ps], [at[p] for p in ps]) for at, ps in rows])

    def first(self, live: Bucket) -> list[tuple[int, str]]:
        """(index, rule) of the stored buckets at the smallest distance from `live`, in the order
        `candidates` gives them (exact ones by context; nearest ones at or below the live batch
        first, then by context); [] when none is within `max_ratio`."""
        group = self.groups.get(live.kinds)
        if group is None:
            return []
        logs, rows = group
        bound = 2 * self.limit + 1e-9  # no candidate is farther
        found: list[int] = []
        ld, lp = _log2(live.num_decode), _log2(live.prefill_tokens)
        for j in _outward(logs, ld):
            dd = abs(ld - logs[j])
            if dd > min(bound, self.limit + 1e-9) + 1e-9:
                break
            plogs, indices = rows[j]
            for k in _outward(plogs, lp):
                dp = abs(lp - plogs[k])
                if dp > min(bound - dd, self.limit + 1e-9) + 1e-9:
                    break
                b = self.buckets[indices[k][0]]  # the point's buckets differ only in their context
                d = dd + dp  # distance(b, live), from the logs kept
                if d and not within(b, live, self.limit):
                    continue
                if d < bound - 1e-9:
                    bound, found = d, []
                if d <= bound + 1e-9:
                    found.append((d, indices[k]))
        if not found:
            return []
        best = min(d for d, _ in found)
        out = []
        for i in (i for d, indices in found if d == best for i in indices):
            b = self.buckets[i]
            above = b.num_decode > live.num_decode or b.prefill_tokens > live.prefill_tokens
            out.append(((above, abs(b.context_len - live.context_len), i), (i, "exact" if best == 0 else "nearest")))
        return [c for _, c in sorted(out, key=lambda x: x[0])]


def _log2(n: int) -> float:
    return math.log2(n) if n > 0 else 0.0


def _outward(sorted_logs: list[float], target: float):
    """Indices of `sorted_logs` in order of their distance from `target` (both sides interleaved)."""
    hi = bisect.bisect_left(sorted_logs, target)
    lo = hi - 1
    while lo >= 0 or hi < len(sorted_logs):
        if hi >= len(sorted_logs) or (lo >= 0 and target - sorted_logs[lo] <= sorted_logs[hi] - target):
            yield lo
            lo -= 1
        else:
            yield hi
            hi += 1


class ShapeLog:
    """Calls per live bucket. Adding is one dict increment (a lookup's bucket is computed once per
    new shape and cached by its caller)."""

    def __init__(self, calls: Counter | None = None, *, model: str | None = None) -> None:
        self.calls: Counter = Counter(calls or {})
        self.model = model

    def add(self, bucket: Bucket, n: int = 1) -> None:
        self.calls[bucket] += n

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def to_dict(self) -> dict[str, Any]:
        return {"shapes_schema": SHAPES_SCHEMA, "model": self.model,
                "shapes": [{**asdict(b), "calls": n} for b, n in sorted(self.calls.items(), key=lambda x: -x[1])]}

    def save(self, path: str | Path) -> Path:
        """Atomically, as JSON (mode 0644)."""
        write_json_atomic(Path(path), self.to_dict(), indent=1)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "ShapeLog":
        """A saved log, validated; any defect is one ValueError naming the file."""
        data = validate.obj(validate.read_json(path, "shapes file"), f"shapes file {path}")
        try:
            if data.get("shapes_schema") != SHAPES_SCHEMA or isinstance(data.get("shapes_schema"), bool):
                raise ValueError(f"shapes_schema must be {SHAPES_SCHEMA}, but got {validate.short(data.get('shapes_schema'))}")
            validate.known(data, {"shapes_schema", "model", "shapes"}, "the file")
            model = validate.string(data, "model", "shapes", optional=True)
            shapes = data.get("shapes")
            if not isinstance(shapes, list):
                raise ValueError(f"shapes must be a list, but got {validate.short(shapes)}")
            log = cls(model=model)
            for i, entry in enumerate(shapes):
                entry = validate.obj(entry, f"shapes[{i}]")
                validate.known(entry, {"num_decode", "prefill_tokens", "context_len", "num_prefill", "calls"}, f"shapes[{i}]")
                fields = {k: validate.integer(entry, k, f"shapes[{i}]", lo=0, default=0)
                          for k in ("num_decode", "prefill_tokens", "context_len", "num_prefill")}
                if (fields["prefill_tokens"] > 0) != (fields["num_prefill"] > 0) or fields["num_decode"] + fields["prefill_tokens"] == 0:
                    raise ValueError(f"shapes[{i}] must hold decode requests or prefill requests with their tokens")
                log.add(Bucket(**fields), validate.integer(entry, "calls", f"shapes[{i}]", lo=1))
            return log
        except ValueError as e:
            raise ValueError(f"shapes file {path} is invalid: {e}") from None
