"""Which buckets to tune for the shapes a server recorded (`dynaflow-tune tune --shapes FILE`).

The recorded shapes are weighted by the tokens they carried (calls x tokens per call). Buckets
are chosen greedily, each the recorded shape that answers the most still-unanswered weight,
where "answers" is exactly the start-up map's rule (runtime/shapes.py: the same decode requests
and prefill tokens, or the same kinds of request within the nearest ratio per dimension): so the
coverage printed before tuning is the share of recorded calls the tuned map will answer with a
tuned schedule rather than the sequential fallback.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from dynaflow.runtime import Workload
from dynaflow.runtime.shapes import NEAREST_RATIO, Bucket, ShapeLog, candidates


def choose_buckets(log: ShapeLog, k: int, max_ratio: float = NEAREST_RATIO) -> list[Bucket]:
    if k < 1:
        raise ValueError(f"--buckets must be >= 1, but got {k}.")
    weight = {b: n * b.tokens for b, n in log.calls.items()}
    open_shapes, chosen = set(weight), []
    for _ in range(k):
        gains = {c: sum(weight[s] for s in open_shapes if candidates([c], s, max_ratio)) for c in weight if c not in chosen}
        if not gains or max(gains.values()) == 0:
            break
        best = max(gains, key=lambda c: (gains[c], weight[c], -c.tokens))
        chosen.append(best)
        open_shapes = {s for s in open_shapes if not candidates([best], s, max_ratio)}
    return chosen


@dataclass(frozen=True, kw_only=True)
class Coverage:
    total_calls: int
    by_rule: Counter  # calls by the rule that will answer them: exact, nearest, sequential
    by_bucket: Counter  # calls answered by each chosen bucket

    @property
    def share(self) -> float:
        """Recorded calls answered by an exact or nearest bucket."""
        return (self.by_rule["exact"] + self.by_rule["nearest"]) / self.total_calls if self.total_calls else 0.0


def coverage(log: ShapeLog, buckets: list[Bucket], max_ratio: float = NEAREST_RATIO) -> Coverage:
    by_rule, by_bucket = Counter(), Counter()
    for shape, calls in log.calls.items():
        answer = candidates(buckets, shape, max_ratio)
        if answer:
            i, rule = answer[0]
            by_rule[rule] += calls
            by_bucket[buckets[i]] += calls
        else:
            by_rule["sequential"] += calls
    return Coverage(total_calls=log.total_calls, by_rule=by_rule, by_bucket=by_bucket)


def workload_of(bucket: Bucket, *, model: str, dtype: str, device: str, tp: int = 1,
                sequence_parallel: bool = False) -> Workload:
    """The workload that tunes a bucket: its decode requests at its context, its prefill tokens
    in its number of requests (equal chunks)."""
    chunk = bucket.prefill_tokens // bucket.num_prefill if bucket.num_prefill else None
    return Workload(model=model, num_decode=bucket.num_decode,
                    context_len=max(bucket.context_len, 1) if bucket.num_decode else 0,
                    prefill_tokens=chunk * bucket.num_prefill if chunk else 0, prefill_chunk=chunk,
                    dtype=dtype, device=device, tp=tp, sequence_parallel=sequence_parallel)


def coverage_text(log: ShapeLog, buckets: list[Bucket], workloads: list[Workload], source: str,
                  max_ratio: float = NEAREST_RATIO) -> str:
    cov = coverage(log, buckets, max_ratio)
    pct = (lambda n: f"{100 * n / cov.total_calls:.1f}%") if cov.total_calls else (lambda n: "0%")
    lines = [f"recorded: {cov.total_calls:,} layer calls in {len(log.calls)} shapes ({source}); "
             f"{len(buckets)} bucket(s) chosen, weighted by tokens:"]
    for b, w in zip(buckets, workloads):
        lines.append(f"  {w.key}: answers {pct(cov.by_bucket[b])} of calls")
    lines.append(f"coverage: {pct(cov.by_rule['exact'] + cov.by_rule['nearest'])} of recorded calls will be answered "
                 f"by a tuned bucket (exact {pct(cov.by_rule['exact'])}, nearest {pct(cov.by_rule['nearest'])}); "
                 f"{pct(cov.by_rule['sequential'])} fall back to sequential")
    return "\n".join(lines)
