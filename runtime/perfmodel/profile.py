"""A performance profile of one model and batch on one device, measured once and cached.

    profile, said = load_or_measure(bench, path)    # read the cached one, or measure (~1-10 s on a CPU)
    profile.solo_ms("qkv_proj", {"decode": 8}, share=1)

What is measured, all from timelines of real runs (runtime/timeline.py, the executor's own tasks):
- **solo times**: every op on nano-batches of 1/1, 1/2 and 1/4 of the requests, one stream, at a
  few stream shares (thread caps on a CPU, SM partitions in the device's steps on a GPU, and the
  whole device); each op's time is fitted per share as a line in the nano-batch's tokens per
  request kind (decode, prefill), so any split is interpolated;
- **dispatch**: the gap between tasks on one stream, the wake-up of a task waiting for another
  stream, and each run's fixed cost (starting and joining 1, 2, 3 streams);
- **interference**: schedules that put ops of each class beside each other on two streams
  (shared and partitioned), whose spans give, per pair of classes, how much slower a task runs
  while the other class runs (beta: the fraction of its speed it loses).
Checked for contention like the peaks: a profile measured while the machine was busy is used
for this process only, never cached.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import telemetry
from ..files import write_json_atomic
from ..plan import default_order, staggered_order
from ..schedule import Schedule, StreamSpec

VERSION = 1
SPLITS = (1, 2, 4)  # nano-batches the solo grid cuts the batch into (by requests)
MAX_BETA = 0.95
MODES = ("shared", "partitioned")


@dataclass(frozen=True, kw_only=True)
class Profile:
    hardware: str
    workload: str  # the workload's key (model, shape, dtype) or the case's name
    issue: str  # "per-stream" (a thread per stream: CPU) or "one-issuer" (one host thread: CUDA)
    total_share: int  # the whole device in share units (threads on a CPU, SMs on a GPU)
    shares: tuple[int, ...]  # the shares profiled, the whole device last
    kinds: tuple[str, ...]  # request kinds, the fits' features
    ops: dict[str, dict[str, Any]]  # op -> {"resource", "fits": {share: [intercept, per-token of each kind]}}
    points: list[list] = field(default_factory=list)  # [op, share, {kind: tokens}, ms]: what the fits came from
    dispatch_ms: float = 0.0
    wake_ms: float = 0.0
    overhead_ms: dict[str, float] = field(default_factory=dict)  # streams -> a run's fixed cost
    interference: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # mode -> own -> other -> beta
    busy: dict[str, Any] = field(default_factory=dict)
    measured_s: float = 0.0
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    whole: dict[str, int] = field(default_factory=dict)  # the whole batch's tokens per kind
    sequential_ms: float | None = None  # the sequential schedule's own call (it may not run the tasks), measured
    error: dict[str, Any] | None = None  # the model's error the last time its predictions were measured
    version: int = VERSION

    # ---- what the simulator reads
    def solo_ms(self, op: str, features: dict[str, int], share: int | None) -> float:
        """The op alone on a nano-batch of these tokens per kind, on a stream of this share."""
        s = self.total_share if share is None else min(share, self.total_share)
        fits = self.ops[op]["fits"]
        at = {int(k): self._line(v, features) for k, v in fits.items()}
        if s in at:
            return at[s]
        shares = sorted(at)
        lower = [x for x in shares if x < s]
        upper = [x for x in shares if x > s]
        if not lower:  # below the smallest share profiled: time scales with 1/share
            return at[shares[0]] * shares[0] / s
        if not upper:
            return at[shares[-1]]
        s1, s2 = lower[-1], upper[0]
        w = (1 / s - 1 / s1) / (1 / s2 - 1 / s1)
        return at[s1] + w * (at[s2] - at[s1])

    def _line(self, coef: list[float], features: dict[str, int]) -> float:
        value = coef[0] + sum(c * features.get(k, 0) for c, k in zip(coef[1:], self.kinds))
        return max(value, 1e-6)

    def beta(self, mode: str, own: str, other: str) -> float:
        return self.interference.get(mode, {}).get(own, {}).get(other, 0.0)

    def run_overhead_ms(self, streams: int) -> float:
        """A run's fixed cost with this many streams (extrapolated linearly past those measured)."""
        known = {int(k): v for k, v in self.overhead_ms.items()}
        if not known:
            return 0.0
        if streams in known:
            return known[streams]
        ks = sorted(known)
        if streams < ks[0]:
            return known[ks[0]]
        if len(ks) == 1:
            return known[ks[0]]
        a, b = ks[-2], ks[-1]
        return max(0.0, known[b] + (streams - b) * (known[b] - known[a]) / (b - a))

    # ---- files
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        if not isinstance(d, dict) or d.get("version") != VERSION:
            raise ValueError(f"not a version-{VERSION} profile (version {d.get('version') if isinstance(d, dict) else None})")
        try:
            p = cls(**{**d, "shares": tuple(d["shares"]), "kinds": tuple(d["kinds"])})
        except (KeyError, TypeError) as e:
            raise ValueError(f"a profile with missing or unknown fields ({e})") from None
        for name, op in p.ops.items():
            if not isinstance(op, dict) or "fits" not in op or "resource" not in op:
                raise ValueError(f"op {name!r} needs resource and fits")
        return p

    def table(self) -> str:
        """Each op's solo time on the whole batch, at each share profiled."""
        whole = self.whole
        w = max(16, *(len(n) for n in self.ops))
        heads = " ".join(f"{_share_name(self, s):>10}" for s in self.shares)
        rows = [f"{'op':<{w}} {'resource':<8} {heads}"]
        for name, op in self.ops.items():
            cells = " ".join(f"{self.solo_ms(name, whole, s):>10.3f}" for s in self.shares)
            rows.append(f"{name:<{w}} {op['resource']:<8} {cells}")
        rows.append(f"(ms on the whole batch, one stream; dispatch {self.dispatch_ms * 1e3:.0f} us a task, "
                    f"wake-up {self.wake_ms * 1e3:.0f} us, a run's fixed cost "
                    + ", ".join(f"{v:.3f} ms with {k} stream(s)" for k, v in sorted(self.overhead_ms.items())) + ")")
        for mode, own in self.interference.items():
            pairs = ", ".join(f"{a} beside {b} {beta:.0%}" for a, d in own.items() for b, beta in d.items())
            rows.append(f"interference, {mode} streams (speed lost): {pairs or 'none measured'}")
        return "\n".join(rows)


def _share_name(p: Profile, s: int) -> str:
    return "whole" if s == p.total_share else f"share {s}"


# ---- measuring
def measure_profile(bench, *, label: str = "", runs: int = 5) -> Profile:
    """Measure the profile of a Bench's model and batch on its device (see the module's text)."""
    t0 = time.perf_counter()
    mark = telemetry.busy_mark()
    graph, layout, hw = bench.executor.graph, bench.case.layout, bench.hardware
    backend = bench.executor.backend
    total = getattr(backend, "threads", None) or hw.num_sms
    issue = "per-stream" if backend.name == "cpu" else "one-issuer"
    step, groups = hw.partition_step, hw.partition_groups
    explicit = sorted({g * step for g in (groups // 4, groups // 2, 3 * groups // 4) if g >= 1} - {total})
    explicit = [s for s in explicit if s < total]
    kinds = tuple(dict.fromkeys(layout.request_kinds))
    splits = [k for k in SPLITS if k <= layout.num_requests]

    solo = [(_split(layout.num_requests, k), s) for s in (*explicit, None) for k in splits]
    # an explicit order: a one-stream schedule without one is the sequential call, not the tasks
    schedules = [Schedule(split_unit="requests", split_sizes=sizes, streams=(StreamSpec(sm_share=s),),
                          order=default_order(graph, max(1, len(sizes))), label=f"profile:{len(sizes) or 1}x:share{s}")
                 for sizes, s in solo]
    *timelines, sequential = bench.timelines([*schedules, Schedule()], runs=runs)
    points, fits, dispatch = [], {op.name: {} for op in graph.ops}, []
    overheads: dict[int, list[float]] = {}
    for (sizes, s), sched, tl in zip(solo, schedules, timelines):
        share = total if s is None else s
        ranges = layout.request_ranges("requests", sizes)
        spans = sorted(tl.spans, key=lambda x: x.start_ms)
        for sp in spans:
            r0, r1 = ranges[sp.nano]
            points.append([sp.op, share, _features(layout, r0, r1), sp.end_ms - sp.start_ms])
        if len(spans) > 1:
            gaps = sum(max(0.0, b.start_ms - a.end_ms) for a, b in zip(spans, spans[1:]))
            dispatch.append(gaps / (len(spans) - 1))
    dispatch_ms = statistics.median(dispatch) if dispatch else 0.0
    gap = dispatch_ms if issue == "per-stream" else 0.0
    for tl in timelines:
        overheads.setdefault(1, []).append(_fixed_cost(tl, gap))
    for op in graph.ops:
        for share in sorted({p[1] for p in points}):
            mine = [(p[2], p[3]) for p in points if p[0] == op.name and p[1] == share]
            fits[op.name][str(share)] = _fit(mine, kinds)
    profile = Profile(hardware=hw.key, workload=label or bench.case.name, issue=issue, total_share=total,
                      shares=(*explicit, total), kinds=kinds,
                      ops={op.name: {"resource": str(op.resource), "fits": fits[op.name]} for op in graph.ops},
                      points=points, dispatch_ms=dispatch_ms, whole=_features(layout, 0, layout.num_requests),
                      sequential_ms=statistics.median(sequential.walls_ms))
    profile = _calibrate(bench, profile, explicit, runs=runs, overheads=overheads)
    busy = telemetry.busy_since(mark, bench.device)
    return _replace(profile, busy=busy, measured_s=round(time.perf_counter() - t0, 2))


def _replace(p: Profile, **changes) -> Profile:
    return Profile(**{**asdict(p), "shares": p.shares, "kinds": p.kinds, **changes})


def _split(n: int, k: int) -> tuple[int, ...]:
    """n requests in k nano-batches as equal as whole requests allow; () for one."""
    if k <= 1:
        return ()
    return tuple(n // k + (1 if i < n % k else 0) for i in range(k))


def _features(layout, r0: int, r1: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for t, k in zip(layout.request_tokens[r0:r1], layout.request_kinds[r0:r1]):
        out[k] = out.get(k, 0) + t
    return out


def _fit(points: list[tuple[dict[str, int], float]], kinds: tuple[str, ...]) -> list[float]:
    """Least squares ms = c0 + sum(c_k * tokens of kind k), no negative per-token cost (a feature
    whose cost comes out negative is dropped and the rest fitted again); with too few distinct
    points for a feature, its cost is left at 0."""
    active = [k for k in kinds if len({f.get(k, 0) for f, _ in points}) > 1]
    while True:
        coef = _lstsq([[1.0] + [float(f.get(k, 0)) for k in active] for f, _ in points], [ms for _, ms in points])
        negative = [k for k, c in zip(active, coef[1:]) if c < 0]
        if not negative:
            break
        active = [k for k in active if k not in negative]
    by_kind = dict(zip(active, coef[1:]))
    if coef[0] < 0:  # no op costs less than nothing on an empty nano-batch: refit through the origin
        coef = [0.0] + _lstsq([[float(f.get(k, 0)) for k in active] for f, _ in points], [ms for _, ms in points])
        by_kind = dict(zip(active, (max(0.0, c) for c in coef[1:])))
    return [coef[0]] + [by_kind.get(k, 0.0) for k in kinds]


def _lstsq(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares by the normal equations (a handful of unknowns), ridge-regularised a hair."""
    n = len(rows[0]) if rows else 0
    if n == 0:
        return []
    a = [[sum(r[i] * r[j] for r in rows) + (1e-9 if i == j else 0.0) for j in range(n)] for i in range(n)]
    b = [sum(r[i] * y for r, y in zip(rows, ys)) for i in range(n)]
    for c in range(n):  # Gaussian elimination with partial pivoting
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        a[c], a[p], b[c], b[p] = a[p], a[c], b[p], b[c]
        if abs(a[c][c]) < 1e-300:
            continue
        for r in range(c + 1, n):
            f = a[r][c] / a[c][c]
            for k in range(c, n):
                a[r][k] -= f * a[c][k]
            b[r] -= f * b[c]
    x = [0.0] * n
    for c in reversed(range(n)):
        if abs(a[c][c]) < 1e-300:
            continue
        x[c] = (b[c] - sum(a[c][k] * x[k] for k in range(c + 1, n))) / a[c][c]
    return x


def _fixed_cost(tl, gap: float) -> float:
    """A run's cost outside its tasks: its whole call less the span from first start to last end
    (and the first task's dispatch, which the simulation adds itself)."""
    if not tl.spans or not tl.walls_ms:
        return 0.0
    inside = max(s.end_ms for s in tl.spans) - min(s.start_ms for s in tl.spans)
    return max(0.0, statistics.median(tl.walls_ms) - inside - gap)


def _calibrate(bench, profile: Profile, explicit: list[int], *, runs: int, overheads: dict[int, list[float]]) -> Profile:
    """Interference, wake-up and multi-stream fixed costs, from schedules that put the op classes
    beside each other: two nano-batches on two streams (op by op, and staggered by one), compute
    beside the rest, and (shared) compute, memory and copy on three."""
    graph, layout = bench.executor.graph, bench.case.layout
    if layout.num_requests < 2:
        return _replace(profile, overhead_ms={str(k): statistics.median(v) for k, v in overheads.items()})
    halves = _split(layout.num_requests, 2)
    classes = {op.name: str(op.resource) for op in graph.ops}
    present = sorted(set(classes.values()))
    by_class = {"compute": 0, "memory": 1}
    modes = [("shared", (None, None, None))]
    if explicit:
        half = max(s for s in explicit if s <= profile.total_share // 2) if any(
            s <= profile.total_share // 2 for s in explicit) else explicit[0]
        modes.append(("partitioned", (half, profile.total_share - half, None)))
    plans = []
    for mode, shares in modes:
        two = tuple(StreamSpec(sm_share=x) for x in shares[:2])
        plans += [(mode, Schedule(split_unit="requests", split_sizes=halves, streams=two, label=f"calibrate:{mode}:{st}",
                                  order=staggered_order(graph, 2, st, lambda op, b: b))) for st in (0, 1)]
        if len(present) > 1:
            plans.append((mode, Schedule(split_unit="requests", split_sizes=halves, streams=two,
                                         label=f"calibrate:{mode}:compute|rest",
                                         order=staggered_order(graph, 2, 1,
                                                               lambda op, b: 0 if classes[op] == "compute" else 1))))
        if mode == "shared" and len(present) > 2:
            three = (StreamSpec(),) * 3
            plans.append((mode, Schedule(split_unit="requests", split_sizes=halves, streams=three,
                                         label="calibrate:shared:three",
                                         order=staggered_order(graph, 2, 1, lambda op, b: by_class.get(classes[op], 2)))))
    timelines = bench.timelines([s for _, s in plans], runs=runs)
    rows: dict[tuple[str, str], list[tuple[dict[str, float], float]]] = {}
    wakes: list[float] = []
    gap = profile.dispatch_ms if profile.issue == "per-stream" else 0.0
    ranges = layout.request_ranges("requests", halves)
    for (mode, sched), tl in zip(plans, timelines):
        spans = list(tl.spans)
        overheads.setdefault(len({s.stream for s in spans}), []).append(_fixed_cost(tl, gap))
        shares = [s.sm_share for s in sched.streams]
        end_of = {(s.op, s.nano): s for s in spans}
        by_stream: dict[int, list] = {}
        for s in sorted(spans, key=lambda x: x.start_ms):
            by_stream.setdefault(s.stream, []).append(s)
        for k, mine in by_stream.items():
            prev_end = None
            for s in mine:
                deps = [end_of[(d, s.nano)] for d in graph.op(s.op).deps
                        if (d, s.nano) in end_of and end_of[(d, s.nano)].stream != s.stream]
                if deps:
                    e = max(d.end_ms for d in deps)
                    if prev_end is None or e > prev_end + gap:
                        wakes.append(s.start_ms - e)
                prev_end = s.end_ms
        for s in spans:
            d = s.end_ms - s.start_ms
            if d <= 0:
                continue
            r0, r1 = ranges[s.nano]
            t0 = profile.solo_ms(s.op, _features(layout, r0, r1), shares[s.stream])
            f: dict[str, float] = {}
            for o in spans:
                if o.stream == s.stream:
                    continue
                ov = min(s.end_ms, o.end_ms) - max(s.start_ms, o.start_ms)
                if ov > 0:
                    f[o.resource] = f.get(o.resource, 0.0) + ov / d
            rows.setdefault((mode, s.resource), []).append((f, 1 - t0 / d))
    interference: dict[str, dict[str, dict[str, float]]] = {}
    for (mode, own), data in rows.items():
        others = sorted({c for f, _ in data for c in f})
        if not others:
            continue
        coef = _lstsq([[f.get(c, 0.0) for c in others] for f, _ in data], [y for _, y in data])
        interference.setdefault(mode, {})[own] = {c: round(min(MAX_BETA, max(0.0, b)), 4) for c, b in zip(others, coef)}
    wake = max(0.0, statistics.median(wakes)) if wakes else 0.0
    return _replace(profile, interference=interference, wake_ms=wake,
                    overhead_ms={str(k): statistics.median(v) for k, v in sorted(overheads.items())})


# ---- the cache
def load_or_measure(bench, path: Path | str | None, *, renew: bool = False, label: str = "") -> tuple[Profile, str]:
    """The cached profile at `path` when it is for this device and model, else a new one (cached
    unless it was measured under contention). Returns it and a line saying which."""
    graph_ops = [op.name for op in bench.executor.graph.ops]
    path = Path(path) if path is not None else None
    why = "renewed (--renew-profile)" if renew else "none cached"
    if path is not None and path.exists() and not renew:
        try:
            import json

            cached = Profile.from_dict(json.loads(path.read_text()))
            if cached.hardware != bench.hardware.key or list(cached.ops) != graph_ops:
                why = "the cached one is for another device or model"
            elif (reason := telemetry.contention(cached.busy)) is not None:
                why = f"the cached one was measured under contention ({reason})"
            else:
                return cached, f"profile read from {path} (measured {cached.created_at}; --renew-profile measures it again)"
        except (OSError, ValueError) as e:
            why = f"the cached one is unreadable ({e})"
    profile = measure_profile(bench, label=label)
    said = f"profile measured in {profile.measured_s:.1f} s ({why})"
    if (reason := telemetry.contention(profile.busy)) is not None:
        warnings.warn(f"the profile was measured under contention ({reason}): used for this run only, not cached")
        return profile, said + ", under contention: not cached"
    if path is not None:
        try:
            write_json_atomic(path, profile.to_dict(), indent=1)
            said += f", cached in {path}"
        except OSError as e:
            warnings.warn(f"cannot cache the profile in {path}: {e.strerror or e}")
    return profile, said


def record_error(path: Path | str | None, profile: Profile, error: dict) -> Profile:
    """Keep the model's latest measured error with its profile (what `tune` trusts it by next time)."""
    profile = _replace(profile, error=error)
    if path is not None and Path(path).exists() and telemetry.contention(profile.busy) is None:
        try:
            write_json_atomic(Path(path), profile.to_dict(), indent=1)
        except OSError:
            pass  # the error still serves this run; the cache keeps the older one
    return profile


def optimism(profile: Profile, default: float = 0.15) -> float:
    """How much faster than predicted a schedule may plausibly run: the model's last measured
    median error, at least 5%; `default` before any was measured."""
    e = (profile.error or {}).get("median_abs")
    return default if e is None or not math.isfinite(e) else max(0.05, float(e))
