"""Measure a profile (runtime/perfmodel/profile.py) on a Bench's device, and cache it.

    profile, said = load_or_measure(bench, path)    # read the cached one, or measure (~1-10 s on a CPU)

The solo grid and the dispatch costs come from timelines of one-stream schedules; interference,
wake-up and multi-stream costs from calibration schedules that put the op classes beside each
other. Interference is first estimated from the spans (how much longer each ran while another
class ran), then adjusted so that the simulator reproduces the calibration schedules' measured
times (coordinate descent over each class pair's beta): two kernels that serialise on one unit
show one span unslowed and one doubled, which a per-span fit averages to a quarter where the
fluid model needs a half.
"""
from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from pathlib import Path

from .. import telemetry
from ..files import write_json_atomic
from ..plan import default_order, staggered_order
from ..schedule import Schedule, StreamSpec
from .profile import MAX_BETA, MODES, SPLITS, Profile, _features, _fit, _lstsq, _split, now, pair_mode
from .simulate import Simulator

BETA_STEPS = [i / 20 for i in range(20)]  # 0 .. 0.95


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
    pair = ((groups // 2) * step, (groups - groups // 2) * step) if groups > 1 else None  # two streams, whole steps
    profile = _calibrate(bench, profile, pair, runs=runs, overheads=overheads)
    busy = telemetry.busy_since(mark, bench.device)
    return profile.replace(busy=busy, measured_s=round(time.perf_counter() - t0, 2))


def _fixed_cost(tl, gap: float) -> float:
    """A run's cost outside its tasks: its whole call less the span from first start to last end
    (and the first task's dispatch, which the simulation adds itself)."""
    if not tl.spans or not tl.walls_ms:
        return 0.0
    inside = max(s.end_ms for s in tl.spans) - min(s.start_ms for s in tl.spans)
    return max(0.0, statistics.median(tl.walls_ms) - inside - gap)


def _calibrate(bench, profile: Profile, pair: tuple[int, int] | None, *, runs: int,
               overheads: dict[int, list[float]]) -> Profile:
    """Interference, wake-up and multi-stream fixed costs, from schedules that put the op classes
    beside each other: two nano-batches on two streams (op by op, and staggered by one), compute
    beside the rest, and (shared) compute, memory and copy on three."""
    graph, layout = bench.executor.graph, bench.case.layout
    if layout.num_requests < 2:
        return profile.replace(overhead_ms={str(k): statistics.median(v) for k, v in overheads.items()})
    halves = _split(layout.num_requests, 2)
    classes = {op.name: str(op.resource) for op in graph.ops}
    present = sorted(set(classes.values()))
    by_class = {"compute": 0, "memory": 1}
    modes = [("shared", (None, None, None))]
    if pair is not None:
        modes.append(("partitioned", (*pair, None)))
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
        if mode == "shared" and layout.num_requests >= 4:  # four streams: slowdowns beside several
            plans.append((mode, Schedule(split_unit="requests", split_sizes=_split(layout.num_requests, 4),
                                         streams=(StreamSpec(),) * 4, label="calibrate:shared:four",
                                         order=staggered_order(graph, 4, 0, lambda op, b: b))))
        if mode == "shared" and len(present) > 2:
            three = (StreamSpec(),) * 3
            plans.append((mode, Schedule(split_unit="requests", split_sizes=halves, streams=three,
                                         label="calibrate:shared:three",
                                         order=staggered_order(graph, 2, 1, lambda op, b: by_class.get(classes[op], 2)))))
    timelines = bench.timelines([s for _, s in plans], runs=runs)
    rows: dict[tuple[str, str], list[tuple[dict[str, float], float]]] = {}
    wakes: list[float] = []
    gap = profile.dispatch_ms if profile.issue == "per-stream" else 0.0
    for (mode, sched), tl in zip(plans, timelines):
        ranges = layout.request_ranges("requests", sched.split_sizes)
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
    profile = profile.replace(interference=interference, wake_ms=wake,
                              overhead_ms={str(k): statistics.median(v) for k, v in sorted(overheads.items())})
    return _fit_to_walls(profile, graph, layout, [(s, statistics.median(tl.walls_ms)) for (_, s), tl in
                                                  zip(plans, timelines) if tl.walls_ms])


def _fit_to_walls(profile: Profile, graph, layout, measured: list[tuple[Schedule, float]], sweeps: int = 3) -> Profile:
    """Each measured class pair's beta, moved (coordinate descent over BETA_STEPS) to where the
    simulator best reproduces the calibration schedules' measured times (squared log error)."""
    keys = [(m, a, b) for m, own in profile.interference.items() for a, d in own.items() for b in d]
    if not keys or not measured:
        return profile
    beta = {m: {a: dict(d) for a, d in own.items()} for m, own in profile.interference.items()}
    sim = Simulator(profile.replace(interference=beta), graph, layout)  # reads `beta`, moved below in place

    def term(i: int) -> float:
        s, ms = measured[i]
        return (math.log(sim.predict(s).ms) - math.log(ms)) ** 2

    terms = [term(i) for i in range(len(measured))]
    # a beta of one mode moves only the schedules with a pair of streams in that mode (the simulator's rule)
    touched = {mode: [i for i, (s, _) in enumerate(measured) if mode in _modes(s)] for mode in MODES}
    best = sum(terms)
    for _ in range(sweeps):
        moved = False
        for m, a, b in keys:
            keep, mine = beta[m][a][b], touched.get(m, [])
            kept = {i: terms[i] for i in mine}
            for value in BETA_STEPS:
                if value == keep:
                    continue  # its loss is `best`
                beta[m][a][b] = value
                tried = {i: term(i) for i in mine}
                if (now := best - sum(kept.values()) + sum(tried.values())) < best - 1e-12:
                    best, keep, kept, moved = now, value, tried, True
            beta[m][a][b] = keep
            for i, v in kept.items():
                terms[i] = v
        if not moved:
            break
    return profile.replace(interference=beta)


def _modes(schedule: Schedule) -> set[str]:
    """The interference modes a schedule's pairs of streams meet in (`pair_mode`)."""
    shares = [s.sm_share for s in schedule.streams]
    return {pair_mode(x, y) for i, x in enumerate(shares) for y in shares[i + 1:]}


def transfer_profile(bench, base: Profile, *, label: str = "", runs: int = 5) -> Profile:
    """This batch's profile from `base`, one measured in full on another batch of the same model on
    this device: its shares and interference are the device's and kept; the dispatch gap and the
    one-stream run cost are this batch's (the costs of more streams moved by as much); each op's
    lines are rescaled to what this batch measures, the op alone on the whole batch and on two
    halves (one stream, the whole device), as ms = a * intercept + b * per-token part of the base's
    line (a, b >= 0, least squares; the same a and b at every share). The base's measured error
    is this one's until its own is measured. About a sixth of a full profile's runs: what lets
    many buckets of one model each have a model (`tune --shapes`)."""
    t0 = time.perf_counter()
    mark = telemetry.busy_mark()
    graph, layout = bench.executor.graph, bench.case.layout
    cuts = [()] + ([_split(layout.num_requests, 2)] if layout.num_requests >= 2 else [])
    schedules = [Schedule(split_unit="requests", split_sizes=sizes, streams=(StreamSpec(),),
                          order=default_order(graph, max(1, len(sizes))), label=f"transfer:{len(sizes) or 1}x")
                 for sizes in cuts]
    *timelines, sequential = bench.timelines([*schedules, Schedule()], runs=runs)
    points, whole, gaps = [], str(base.total_share), []
    for sizes, tl in zip(cuts, timelines):
        ranges = layout.request_ranges("requests", sizes)
        spans = sorted(tl.spans, key=lambda x: x.start_ms)
        for sp in spans:
            r0, r1 = ranges[sp.nano]
            points.append([sp.op, base.total_share, _features(layout, r0, r1), sp.end_ms - sp.start_ms])
        if len(spans) > 1:
            gaps.append(sum(max(0.0, b.start_ms - a.end_ms) for a, b in zip(spans, spans[1:])) / (len(spans) - 1))
    ops = {}
    for op in graph.ops:
        mine = [(f, ms) for name, _, f, ms in points if name == op.name]
        a, b = _rescale(base.ops[op.name]["fits"][whole], base.kinds, mine)
        ops[op.name] = {"resource": str(op.resource),  # this batch's class (a GEMM of a few tokens is memory-bound)
                        "fits": {k: [a * c[0]] + [b * x for x in c[1:]] for k, c in base.ops[op.name]["fits"].items()}}
    # this batch's dispatch and one-stream run cost; the costs of more streams moved by as much
    dispatch = statistics.median(gaps) if gaps else base.dispatch_ms
    one = statistics.median(_fixed_cost(tl, dispatch if base.issue == "per-stream" else 0.0) for tl in timelines)
    shift = one - base.run_overhead_ms(1)
    overhead = {k: max(0.0, v + shift) for k, v in base.overhead_ms.items()} if base.overhead_ms else {"1": one}
    profile = base.replace(workload=label or bench.case.name, ops=ops, points=points, base=base.workload,
                           whole=_features(layout, 0, layout.num_requests), created_at=now(), dispatch_ms=dispatch,
                           overhead_ms=overhead, sequential_ms=statistics.median(sequential.walls_ms))
    return profile.replace(busy=telemetry.busy_since(mark, bench.device), measured_s=round(time.perf_counter() - t0, 2))


def _rescale(line: list[float], kinds: tuple[str, ...], measured: list[tuple[dict[str, int], float]]) -> tuple[float, float]:
    """(a, b): measured ms ~ a * line's intercept + b * its per-token part, both >= 0 (one common
    factor where the points cannot tell the two apart)."""
    rows = [(line[0], sum(c * f.get(k, 0) for c, k in zip(line[1:], kinds)), ms) for f, ms in measured]
    if not rows:
        return 1.0, 1.0
    if len({(round(i, 12), round(t, 12)) for i, t, _ in rows}) > 1 and all(t > 0 for _, t, _ in rows) and rows[0][0] > 0:
        a, b = _lstsq([[i, t] for i, t, _ in rows], [ms for *_, ms in rows])
        if a >= 0 and b >= 0:
            return a, b
    predicted = sum(i + t for i, t, _ in rows)
    k = sum(ms for *_, ms in rows) / predicted if predicted > 0 else 1.0
    return k, k


# ---- the cache
def load_or_measure(bench, path: Path | str | None, *, renew: bool = False, label: str = "",
                    family: str = "") -> tuple[Profile, str]:
    """The cached profile at `path` when it is for this device and model, else a new one (cached
    unless it was measured under contention). With `family` (the model, dtype and parallelism), a
    profile measured in full for another batch of the family beside `path` (family_base) lends its
    grid: the new one is transferred from it (transfer_profile), not measured in full. Returns it
    and a line saying which."""
    graph_ops = [op.name for op in bench.executor.graph.ops]
    path = Path(path) if path is not None else None
    why = "renewed (--renew-profile)" if renew else "none cached"
    if path is not None and path.exists() and not renew:
        try:
            cached = Profile.from_dict(json.loads(path.read_text()))
            if cached.hardware != bench.hardware.key or sorted(cached.ops) != sorted(graph_ops):
                why = "the cached one is for another device or model"
            elif (reason := telemetry.contention(cached.busy)) is not None:
                why = f"the cached one was measured under contention ({reason})"
            else:
                return cached, f"profile read from {path} (measured {cached.created_at}" + \
                    (f", transferred from {cached.base}" if cached.base else "") + "; --renew-profile measures it again)"
        except (OSError, ValueError) as e:
            why = f"the cached one is unreadable ({e})"
    base = None if renew or path is None or not family else family_base(path, bench, family)
    if base is not None:
        profile = transfer_profile(bench, base, label=label)
        said = f"profile transferred from {base.workload}'s in {profile.measured_s:.1f} s ({why})"
    else:
        profile = measure_profile(bench, label=label)
        said = f"profile measured in {profile.measured_s:.1f} s ({why})"
    profile = profile.replace(family=family)
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
    profile = profile.replace(error=error)
    if path is not None and Path(path).exists() and telemetry.contention(profile.busy) is None:
        try:
            write_json_atomic(Path(path), profile.to_dict(), indent=1)
        except OSError:
            pass  # the error still serves this run; the cache keeps the older one
    return profile


def family_base(path: Path, bench, family: str) -> Profile | None:
    """The profile measured in full, beside `path`, of this device and family, with this batch's
    ops and (at least) its kinds of request, nearest to it in tokens (log scale), one of the same
    kinds first; None when there is none."""
    layout, ops = bench.case.layout, sorted(op.name for op in bench.executor.graph.ops)
    kinds, tokens = set(layout.request_kinds), sum(layout.request_tokens)
    best, best_d = None, (True, math.inf)
    for other in sorted(path.parent.glob("*.json")) if path.parent.is_dir() else ():
        if other == path:
            continue
        try:
            p = Profile.from_dict(json.loads(other.read_text()))
        except (OSError, ValueError, RecursionError):  # not a profile of ours: never a lender
            continue
        if p.family != family or p.base or p.hardware != bench.hardware.key or sorted(p.ops) != ops \
                or not kinds <= set(p.kinds) or telemetry.contention(p.busy) is not None:
            continue
        d = (set(p.kinds) != kinds, abs(math.log2(max(1, sum(p.whole.values())) / max(1, tokens))))
        if d < best_d:
            best, best_d = p, d
    return best
