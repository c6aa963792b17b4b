"""A performance profile of one model and batch on one device, measured once and cached.

    profile.solo_ms("qkv_proj", {"decode": 8}, share=1)   # what the simulator reads
    Profile.from_dict(json.load(f))                        # the cached file (runtime/perfmodel/profiler.py measures it)

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
import time
from dataclasses import asdict, dataclass, field
from typing import Any

VERSION = 1
SPLITS = (1, 2, 4)  # nano-batches the solo grid cuts the batch into (by requests)
MAX_BETA = 0.95
MODES = ("shared", "partitioned")


def pair_mode(share: int | None, other: int | None) -> str:
    """The interference mode two streams run beside each other in: "partitioned" when both have a
    share of the device, "shared" otherwise."""
    return "partitioned" if share is not None and other is not None else "shared"


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
    created_at: str = field(default_factory=lambda: now())  # (now() is defined below)
    whole: dict[str, int] = field(default_factory=dict)  # the whole batch's tokens per kind
    sequential_ms: float | None = None  # the sequential schedule's own call (it may not run the tasks), measured
    error: dict[str, Any] | None = None  # the model's error the last time its predictions were measured
    family: str = ""  # the model, dtype and parallelism it profiles: its batches' profiles may lend it their grid
    base: str | None = None  # transferred (profiler.transfer_profile): the profile whose grid it rescaled
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

    def replace(self, **changes) -> "Profile":
        return Profile(**{**asdict(self), "shares": self.shares, "kinds": self.kinds, **changes})

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

    def table(self, names: list[str] | None = None) -> str:
        """Each op's solo time on the whole batch, at each share profiled (ops in `names`' order)."""
        whole = self.whole
        w = max(16, *(len(n) for n in self.ops))
        heads = " ".join(f"{_share_name(self, s):>10}" for s in self.shares)
        rows = [f"{'op':<{w}} {'resource':<8} {heads}"]
        for name in names or list(self.ops):
            op = self.ops[name]
            cells = " ".join(f"{self.solo_ms(name, whole, s):>10.3f}" for s in self.shares)
            rows.append(f"{name:<{w}} {op['resource']:<8} {cells}")
        rows.append(f"(ms on the whole batch, one stream; dispatch {self.dispatch_ms * 1e3:.0f} us a task, "
                    f"wake-up {self.wake_ms * 1e3:.0f} us, a run's fixed cost "
                    + ", ".join(f"{v:.3f} ms with {k} stream(s)" for k, v in sorted(self.overhead_ms.items())) + ")")
        for mode, own in self.interference.items():
            pairs = ", ".join(f"{a} beside {b} {beta:.0%}" for a, d in own.items() for b, beta in d.items())
            rows.append(f"interference, {mode} streams (speed lost): {pairs or 'none measured'}")
        return "\n".join(rows)


def now() -> str:
    """A profile's time stamp (UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _share_name(p: Profile, s: int) -> str:
    return "whole" if s == p.total_share else f"share {s}"


# ---- helpers the profiler and tests share
def _split(n: int, k: int) -> tuple[int, ...]:
    """n requests in k nano-batches as equal as whole requests allow; () for one."""
    if k <= 1:
        return ()
    return tuple(n // k + (1 if i < n % k else 0) for i in range(k))


def _features(layout, r0: int, r1: int) -> dict[str, int]:
    """Tokens per request kind in requests [r0, r1) of a batch layout: what an op's time is fitted on."""
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


def optimism(profile: Profile, default: float = 0.15) -> float:
    """How much faster than predicted a schedule may plausibly run: the model's last measured
    median error, at least 5%; `default` before any was measured."""
    e = (profile.error or {}).get("median_abs")
    return default if e is None or not math.isfinite(e) else max(0.05, float(e))
