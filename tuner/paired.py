"""The one way two schedules are compared: paired rounds, the round being the replicate.

    r = Round.of(baseline_samples_ms, candidate_samples_ms, busy=why_or_None, first="baseline")
    c = Comparison(rounds=(r1, r2, ...))
    c.speedup, c.interval(alpha), c.evidence(accept_contention=False)

A round measures the sequential schedule and a candidate back to back, in alternating order
(A B, then B A, ...). The samples of one measurement share one state of the machine, so they
are not independent: a round gives ONE observation, the ratio of the two measurements' figures.
Each figure is the lower quartile of its samples (`round_ms`): interference only adds time, so a
low quantile is a steadier estimate of the undisturbed time than the mean or the median.

The speedup is the geometric mean of the per-round ratios; its interval is a t-interval over the
rounds' log ratios, at a level corrected (Bonferroni) for the number of candidates compared and
the number of times the rounds are looked at before deciding (`Plan`). Rounds measured while the
machine was busy (`busy` set) are no evidence unless the user accepts contention; rounds whose two
halves ran in different states (`unsteady` set: runtime/steady.py) are never evidence.
Pure Python and scipy's t quantile: nothing here times anything, so the statistics are tested
on simulated targets (tests/test_paired.py).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from enum import Enum

FAMILY_CONFIDENCE = 0.98  # one-sided: at most 1% of tunes whose candidates all equal sequential store a winner
ESTIMATOR = "lower quartile of each measurement's samples; speedup = geometric mean of per-round ratios"


def round_ms(samples_ms) -> float:
    """A measurement's figure: the lower quartile of its samples (the sample itself for one)."""
    samples = sorted(float(s) for s in samples_ms)
    if not samples:
        raise ValueError("a measurement with no samples has no figure.")
    if len(samples) < 4:
        return samples[0] if len(samples) < 3 else statistics.median(samples[:2])
    return statistics.quantiles(samples, n=4, method="inclusive")[0]


@dataclass(frozen=True, kw_only=True, slots=True)
class Round:
    """One adjacent pair: the sequential schedule's figure and the candidate's, in ms."""

    baseline_ms: float
    candidate_ms: float
    first: str = "baseline"  # which ran first: "baseline" or "candidate"
    busy: str | None = None  # why the machine counted as busy during the pair; None: quiet
    # why the two halves ran in different states (runtime/steady.py): never evidence; None: the same
    unsteady: str | None = None

    @classmethod
    def of(cls, baseline_samples_ms, candidate_samples_ms, *, first: str = "baseline",
           busy: str | None = None, unsteady: str | None = None) -> "Round":
        return cls(baseline_ms=round_ms(baseline_samples_ms), candidate_ms=round_ms(candidate_samples_ms),
                   first=first, busy=busy, unsteady=unsteady)

    @property
    def ratio(self) -> float:
        """The candidate's speedup in this round: > 1 is faster than sequential."""
        return self.baseline_ms / self.candidate_ms

    def to_dict(self) -> dict:
        return {"baseline_ms": self.baseline_ms, "candidate_ms": self.candidate_ms, "first": self.first,
                "busy": self.busy, "unsteady": self.unsteady}

    @classmethod
    def from_dict(cls, d: dict) -> "Round":
        return cls(baseline_ms=float(d["baseline_ms"]), candidate_ms=float(d["candidate_ms"]),
                   first=str(d.get("first", "baseline")), busy=d.get("busy"), unsteady=d.get("unsteady"))


class Decision(str, Enum):
    """Where a candidate stands after a look at its rounds."""

    FASTER = "faster"  # its interval lies above 1 and its speedup reaches 1 + min_effect
    EXCLUDED = "excluded"  # its interval ends below 1 + min_effect: it cannot be that much faster
    UNDECIDED = "undecided"  # neither, yet
    FAILED = "failed"  # a round of it failed (incorrect, crashed, ...): never a winner

    __str__ = str.__str__


@dataclass(frozen=True, kw_only=True, slots=True)
class Interval:
    speedup: float
    low: float
    high: float
    rounds: int  # the rounds it was computed from
    confidence: float  # the per-comparison level it was computed at (after the corrections)


def interval(ratios, alpha: float) -> Interval:
    """Geometric mean of `ratios` and its two-sided (1 - alpha) t-interval over their logs."""
    from scipy import stats

    logs = [math.log(r) for r in ratios]
    n = len(logs)
    if n == 0:
        return Interval(speedup=float("nan"), low=0.0, high=float("inf"), rounds=0, confidence=1 - alpha)
    mean = statistics.fmean(logs)
    if n < 2:
        return Interval(speedup=math.exp(mean), low=0.0, high=float("inf"), rounds=1, confidence=1 - alpha)
    half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * statistics.stdev(logs) / math.sqrt(n)
    return Interval(speedup=math.exp(mean), low=math.exp(mean - half), high=math.exp(mean + half), rounds=n,
                    confidence=1 - alpha)


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """How rounds are spent: decide at the looks (counts of evidence rounds), at most
    `max_rounds` rounds per candidate, `candidates` compared with one baseline. The per-look
    level is FAMILY_CONFIDENCE corrected for both (Bonferroni)."""

    min_rounds: int = 5  # evidence rounds (quiet ones, unless contention is accepted) before any decision
    max_rounds: int = 12  # rounds per candidate, busy ones included: the round budget
    candidates: int = 1
    min_effect: float = 0.03
    accept_contention: bool = False
    family_confidence: float = FAMILY_CONFIDENCE

    def __post_init__(self) -> None:
        if self.min_rounds < 2:
            raise ValueError(f"min_rounds must be >= 2 (an interval needs two rounds), but got {self.min_rounds}.")
        if self.max_rounds < 1 or self.candidates < 1:
            raise ValueError(f"max_rounds and candidates must be >= 1, but got {self.max_rounds} and "
                             f"{self.candidates}.")

    @property
    def looks(self) -> tuple[int, ...]:
        """The evidence-round counts at which rounds are judged: the minimum, midway, the budget."""
        if self.max_rounds < self.min_rounds:
            return ()
        return tuple(sorted({self.min_rounds, (self.min_rounds + self.max_rounds) // 2, self.max_rounds}))

    @property
    def alpha(self) -> float:
        """The two-sided error of one look at one candidate."""
        return (1 - self.family_confidence) / (self.candidates * max(len(self.looks), 1))

    def decide(self, comparison: "Comparison", *, last: bool = False) -> Decision:
        """The decision at a look; UNDECIDED between looks or below the minimum of evidence.
        `last`: the candidate's round budget is spent, so its evidence is looked at one final time
        (still at most len(looks) looks in all: the budget ends before the last planned one)."""
        if comparison.failed:
            return Decision.FAILED
        evidence = comparison.evidence(self.accept_contention)
        if len(evidence) < self.min_rounds or (len(evidence) not in self.looks and not last):
            return Decision.UNDECIDED
        iv = interval([r.ratio for r in evidence], self.alpha)
        if iv.low > 1.0 and iv.speedup >= 1.0 + self.min_effect:
            return Decision.FASTER
        if iv.high < 1.0 + self.min_effect:
            return Decision.EXCLUDED
        return Decision.UNDECIDED

    def final(self, comparison: "Comparison") -> Interval:
        """The interval reported for a comparison: over its evidence rounds, at the per-look level."""
        return interval([r.ratio for r in comparison.evidence(self.accept_contention)], self.alpha)


@dataclass(frozen=True, kw_only=True, slots=True)
class Comparison:
    """A candidate's rounds against the baseline; `failed` says why a round of it failed."""

    rounds: tuple[Round, ...] = ()
    failed: str | None = None
    decision: Decision = Decision.UNDECIDED

    def evidence(self, accept_contention: bool = False) -> tuple[Round, ...]:
        """The rounds a decision rests on: never one whose halves ran in different states; a busy one
        only where contention is accepted."""
        return tuple(r for r in self.rounds if r.unsteady is None and (accept_contention or r.busy is None))

    @property
    def busy_rounds(self) -> tuple[Round, ...]:
        return tuple(r for r in self.rounds if r.busy is not None and r.unsteady is None)

    @property
    def unsteady_rounds(self) -> tuple[Round, ...]:
        return tuple(r for r in self.rounds if r.unsteady is not None)

    def to_dict(self) -> dict:
        return {"rounds": [r.to_dict() for r in self.rounds], "failed": self.failed, "decision": self.decision.value}

    @classmethod
    def from_dict(cls, d: dict) -> "Comparison":
        return cls(rounds=tuple(Round.from_dict(r) for r in d.get("rounds") or ()), failed=d.get("failed"),
                   decision=Decision(d.get("decision", "undecided")))


@dataclass(frozen=True, kw_only=True, slots=True)
class BusySummary:
    """Why rounds were busy, counted: what `inconclusive: the machine was busy (...)` says."""

    busy: int
    total: int
    reasons: tuple[str, ...] = field(default=())

    @classmethod
    def of(cls, comparisons) -> "BusySummary":
        rounds = [r for c in comparisons for r in c.rounds]
        reasons = tuple(dict.fromkeys(r.busy for r in rounds if r.busy))
        return cls(busy=sum(1 for r in rounds if r.busy), total=len(rounds), reasons=reasons)

    def text(self) -> str:
        why = f": {self.reasons[0]}" if self.reasons else ""
        return f"{self.busy} of {self.total} paired rounds ran while the machine was busy{why}"
