"""No false winners: the best candidates re-measured in paired rounds against the sequential
schedule (tuner/paired.py), then one verdict, stored.

    candidates = top_candidates(study, k)         # completed AND pruned trials, by their paired speedup
    c = confirm(study, target, config)             # rounds until each candidate is decided, or the budget
    store_verdict(c, study, target, workload, config)

Each round measures the baseline and one candidate back to back, the order alternating round by
round; the round's ratio is one observation. A candidate is decided at fixed looks (`Plan`):
FASTER when its interval lies above 1, EXCLUDED when it ends below 1 + min_effect. Three verdicts:
- `winner`: the fastest FASTER candidate, on quiet rounds (or on busy ones the user accepted);
- `sequential_best`: every candidate re-measured and excluded (or failing when re-run);
- `inconclusive`: anything else: nothing to compare (no candidate ran correctly), the machine was
  busy through the rounds, the budget ran out undecided, the run was interrupted. The sequential
  schedule is stored, marked as such, and never replaces a conclusive record.
A winner whose timeline shows (almost) no overlap is said to be one (`no_overlap`), and is
stored only on quiet rounds.
"""
from __future__ import annotations

import dataclasses
import errno
import statistics
from pathlib import Path
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from dynaflow.runtime import Measurement, Schedule, Workload, steady, telemetry
from dynaflow.runtime.devices import device_type
from dynaflow.runtime.measure import relative_spread, tokens_per_s
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule
from dynaflow.runtime.store import Verdict as Kind  # the stored verdict's kind

from .config import TuneError
from .paired import (ESTIMATOR, BusySummary, Comparison, Decision, Interval, Plan, Round)
from .study import BASELINE, result_of
from .measuring import Target, explain, measure_pair
from .publish import save_unless_kept

NO_OVERLAP = 0.05  # a winner's timeline with two streams busy for less than this share of it: won without overlap


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """One re-measured candidate: its rounds against the baseline and what they decided."""

    trial: int | None
    schedule: Schedule
    comparison: Comparison
    interval: Interval
    search_speedup: float | None = None  # what its search trial measured (one round; a pruned one's partial)
    pruned: bool = False

    @property
    def speedup(self) -> float:
        return self.interval.speedup

    def to_dict(self) -> dict:
        iv = self.interval
        return {"trial": self.trial, "schedule": self.schedule.to_json(), "label": self.schedule.label,
                "speedup": iv.speedup, "low": iv.low, "high": iv.high, "rounds": iv.rounds,
                "confidence": iv.confidence, "search_speedup": self.search_speedup, "pruned": self.pruned,
                "comparison": self.comparison.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        iv = Interval(speedup=d["speedup"], low=d["low"], high=d["high"], rounds=d.get("rounds", 0),
                      confidence=d.get("confidence", 0.0))
        return cls(trial=d.get("trial"), schedule=Schedule.from_json(d["schedule"]),
                   comparison=Comparison.from_dict(d.get("comparison") or {}), interval=iv,
                   search_speedup=d.get("search_speedup"), pruned=bool(d.get("pruned")))


@dataclass(frozen=True, kw_only=True)
class Confirmation:
    """The verdict of one study: what the study keeps (`to_dict`) and the record is made from."""

    kind: Kind
    reason: str  # in words: why this kind (what `verdict_text` says after the kind)
    candidates: tuple[Candidate, ...] = ()
    best: int | None = None  # index in candidates of the winner, or of the fastest candidate
    min_effect: float = 0.03
    family_confidence: float = 0.98
    looks: tuple[int, ...] = ()
    max_rounds: int = 0
    accept_contention: bool = False
    busy: dict = field(default_factory=dict)  # telemetry over every round (busy ones included)
    busy_rounds: int = 0  # rounds left out of the evidence: the machine was busy
    unsteady_rounds: int = 0  # rounds left out of the evidence: their halves ran in different states
    contended: str | None = None  # the evidence itself ran under contention (accepted), in words
    no_overlap: str | None = None  # a winner that won without overlap: what differs from sequential
    bound_ms: float | None = None

    @property
    def wins(self) -> bool:
        return self.kind is Kind.WINNER

    @property
    def winner(self) -> Candidate | None:
        return self.candidates[self.best] if self.wins else None

    @property
    def best_candidate(self) -> Candidate | None:
        return self.candidates[self.best] if self.best is not None else None

    @property
    def schedule(self) -> Schedule:
        return self.winner.schedule if self.wins else Schedule()

    @property
    def baseline_ms(self) -> float | None:
        """The sequential figure: the median baseline figure over the evidence rounds of the best
        candidate (of every candidate when there is none)."""
        pool = [self.best_candidate] if self.best_candidate else self.candidates
        rounds = [r for c in pool for r in c.comparison.evidence(self.accept_contention)] or \
            [r for c in self.candidates for r in c.comparison.rounds]
        return statistics.median(r.baseline_ms for r in rounds) if rounds else None

    @property
    def speedup(self) -> float:
        return self.winner.speedup if self.wins else 1.0

    @property
    def noise(self) -> float:
        """The relative p10-p90 spread of the best candidate's per-round ratios."""
        best = self.best_candidate
        return relative_spread([r.ratio for r in best.comparison.rounds]) if best else 0.0

    def to_dict(self) -> dict:
        best = self.best_candidate
        return {"verdict": self.kind.value, "reason": self.reason, "estimator": ESTIMATOR,
                "winner_trial": self.winner.trial if self.wins else None,
                "best_trial": best.trial if best else None, "speedup": self.speedup,
                "best_speedup": best.speedup if best else None,
                "low": best.interval.low if best else None, "high": best.interval.high if best else None,
                "confidence": best.interval.confidence if best else None, "rounds": best.interval.rounds if best else 0,
                "baseline_ms": self.baseline_ms, "noise": self.noise, "min_effect": self.min_effect,
                "family_confidence": self.family_confidence, "looks": list(self.looks), "max_rounds": self.max_rounds,
                "accept_contention": self.accept_contention, "busy": self.busy, "busy_rounds": self.busy_rounds,
                "unsteady_rounds": self.unsteady_rounds,
                "contended": self.contended, "no_overlap": self.no_overlap, "bound_ms": self.bound_ms,
                "best": self.best, "candidates": [c.to_dict() for c in self.candidates],
                "sequential_best": not self.wins}

    @classmethod
    def from_dict(cls, d: dict) -> "Confirmation":
        return cls(kind=Kind(d["verdict"]), reason=d.get("reason", ""),
                   candidates=tuple(Candidate.from_dict(c) for c in d.get("candidates") or ()), best=d.get("best"),
                   min_effect=d.get("min_effect", 0.03), family_confidence=d.get("family_confidence", 0.98),
                   looks=tuple(d.get("looks") or ()), max_rounds=d.get("max_rounds", 0),
                   accept_contention=bool(d.get("accept_contention")), busy=d.get("busy") or {},
                   busy_rounds=d.get("busy_rounds", 0), unsteady_rounds=d.get("unsteady_rounds", 0), contended=d.get("contended"), no_overlap=d.get("no_overlap"),
                   bound_ms=d.get("bound_ms"))


# --- which candidates --------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class Entry:
    """A search trial offered to the confirmation."""

    trial: int
    schedule: Schedule
    speedup: float  # its paired speedup in the search (a pruned trial's from its partial samples)
    pruned: bool


def search_entries(study: optuna.Study) -> list[Entry]:
    """Every measured search trial with a paired speedup, completed or pruned, duplicates left out."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        r = result_of(t)
        if t.user_attrs.get(BASELINE) or r.duplicate or r.speedup is None or not r.schedule:
            continue
        out.append(Entry(trial=t.number, schedule=r.schedule_obj(), speedup=r.speedup,
                         pruned=t.state == TrialState.PRUNED))
    return out


def top_candidates(study: optuna.Study, k: int) -> list[Entry]:
    """The k best distinct non-sequential schedules, pruned trials included by their partial result."""
    best, seen = [], set()
    for e in sorted(search_entries(study), key=lambda e: -e.speedup):
        if e.schedule.key() not in seen and not e.schedule.is_sequential:
            seen.add(e.schedule.key())
            best.append(e)
    return best[:k]


# --- the rounds ---------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class ConfirmConfig:
    """The confirmation's budget and rule: the best `top` search trials, at most `rounds` paired
    rounds each, `min_rounds` quiet ones before any verdict, the smallest speedup it must resolve,
    whether busy rounds count, each measurement's time limit."""

    top: int
    rounds: int
    min_rounds: int
    min_effect: float
    accept_contention: bool
    time_limit_s: float | None


@dataclass(frozen=True, kw_only=True, slots=True)
class RecordConfig:
    """Where a verdict is stored, and the provenance the record carries: the search space and the
    study's storage."""

    store_root: Path
    space: str
    storage_url: str


INTERRUPTED = "interrupted {when}; sequential kept, nothing concluded (run tune again to go on)"


def confirm(study: optuna.Study, target: Target, config: ConfirmConfig, *, interrupted: bool = False,
            stop=()) -> Confirmation:
    """Re-measure the study's best candidates in paired rounds and judge them; `interrupted`: the
    search was stopped, so nothing is measured and nothing concluded; `stop` (truthy once Ctrl-C was
    pressed) ends the rounds at the next one, concluding nothing either."""
    if interrupted:
        return Confirmation(kind=Kind.INCONCLUSIVE, reason=INTERRUPTED.format(when="before the confirmation"),
                            min_effect=config.min_effect)
    entries = top_candidates(study, config.top)
    if not entries:
        return Confirmation(kind=Kind.INCONCLUSIVE, reason=nothing_to_compare(study), min_effect=config.min_effect)
    return compare(target, entries, plan_for(config, len(entries)), time_limit_s=config.time_limit_s, stop=stop)


def plan_for(config: ConfirmConfig, candidates: int) -> Plan:
    return Plan(min_rounds=config.min_rounds, max_rounds=config.rounds, candidates=candidates,
                min_effect=config.min_effect, accept_contention=config.accept_contention)


def compare(target: Target, entries: list[Entry], plan: Plan, *, time_limit_s: float | None = None,
            stop=()) -> Confirmation:
    """Paired rounds of each entry against the baseline until each is decided or has spent
    `plan.max_rounds`; then the verdict (`judge`), or nothing concluded once `stop` is truthy (Ctrl-C).
    Optuna-free: the statistics' tests drive it."""
    comparisons = [Comparison() for _ in entries]
    readings, bound, spent = [], None, set()  # spent: candidates whose budget cannot decide them any more
    for _ in range(plan.max_rounds):
        active = [i for i, c in enumerate(comparisons) if c.decision is Decision.UNDECIDED and i not in spent]
        if not active:
            break
        for i in active:
            if stop:
                break
            c = comparisons[i]
            r, m = paired_round(target, entries[i].schedule, len(c.rounds), time_limit_s=time_limit_s)
            readings.append(m.telemetry.get("busy") or {})
            if r is not None:
                bound = m.bound_ms if m.bound_ms is not None else bound
                c = dataclasses.replace(c, rounds=c.rounds + (r,))
            else:
                c = dataclasses.replace(c, failed=f"{m.outcome.value}: {m.message}")
            left = plan.max_rounds - len(c.rounds)
            last = left <= 0 or len(c.evidence(plan.accept_contention)) + left < plan.min_rounds
            comparisons[i] = dataclasses.replace(c, decision=plan.decide(c, last=last))
            if last:  # a busy machine: the quiet rounds a verdict needs can no longer come within the budget
                spent.add(i)
        if stop:
            break
    candidates = tuple(Candidate(trial=e.trial, schedule=e.schedule, comparison=c, interval=plan.final(c),
                                 search_speedup=e.speedup, pruned=e.pruned) for e, c in zip(entries, comparisons))
    verdict = judge(candidates, plan)
    if stop:  # the rounds so far are kept in the study, and judged by nobody
        verdict = dataclasses.replace(verdict, kind=Kind.INCONCLUSIVE,
                                      reason=INTERRUPTED.format(when="during the confirmation"))
    return dataclasses.replace(verdict, busy=telemetry.merge_busy(readings), bound_ms=bound)


def paired_round(target: Target, schedule: Schedule, k: int, *, baseline: Schedule = Schedule(),
                 time_limit_s: float | None = None) -> tuple[Round | None, Measurement]:
    """Round `k` of `schedule` against `baseline`, the order alternating with k (A B, B A, ...):
    the round (busy or quiet, by the pair's own reading; unsteady when its halves ran in different
    states), or None when it failed, and the measurement it came from."""
    first = "baseline" if k % 2 == 0 else "candidate"
    m = measure_pair(target, schedule, first=first, baseline=baseline, time_limit_s=time_limit_s)
    if not (m.ok and m.baseline_samples_ms):
        return None, m
    return Round.of(m.baseline_samples_ms, m.samples_ms, first=first,
                    busy=telemetry.contention(m.telemetry.get("busy")),
                    unsteady=steady.differs(m.baseline_state, m.state)), m


def judge(candidates: tuple[Candidate, ...], plan: Plan) -> Confirmation:
    """The verdict from the candidates' decisions."""
    common = dict(candidates=candidates, min_effect=plan.min_effect, family_confidence=plan.family_confidence,
                  looks=plan.looks, max_rounds=plan.max_rounds, accept_contention=plan.accept_contention,
                  busy_rounds=0 if plan.accept_contention else sum(len(c.comparison.busy_rounds) for c in candidates),
                  unsteady_rounds=sum(len(c.comparison.unsteady_rounds) for c in candidates))
    decided = {c.comparison.decision for c in candidates}
    faster = [i for i, c in enumerate(candidates) if c.comparison.decision is Decision.FASTER]
    measured = [i for i, c in enumerate(candidates) if c.interval.rounds]
    fastest = max(measured, key=lambda i: candidates[i].speedup, default=None)
    if faster:
        best = max(faster, key=lambda i: candidates[i].speedup)
        busy = candidates[best].comparison.busy_rounds if plan.accept_contention else ()
        contended = BusySummary.of([candidates[best].comparison]).text() if busy else None
        return Confirmation(kind=Kind.WINNER, reason="", best=best, contended=contended, **common)
    if decided <= {Decision.EXCLUDED, Decision.FAILED} and Decision.EXCLUDED in decided:
        return Confirmation(kind=Kind.SEQUENTIAL_BEST, reason="", best=fastest, **common)
    return Confirmation(kind=Kind.INCONCLUSIVE, reason=undecided_reason(candidates, plan), best=fastest, **common)


def undecided_reason(candidates: tuple[Candidate, ...], plan: Plan) -> str:
    if all(c.comparison.decision is Decision.FAILED for c in candidates):
        return "every candidate failed when re-measured (" + "; ".join(
            f"trial {c.trial}: {c.comparison.failed}" for c in candidates)[:300] + "); sequential kept"
    short = [c for c in candidates if c.comparison.decision is Decision.UNDECIDED
             and len(c.comparison.evidence(plan.accept_contention)) < plan.min_rounds]
    unsteady = [r.unsteady for c in short for r in c.comparison.unsteady_rounds]
    if unsteady:
        return (f"{len(unsteady)} paired round(s) ran the sequential schedule and the candidate in different states "
                f"(no evidence: {unsteady[0]}); a verdict needs {plan.min_rounds} rounds in one state per candidate "
                f"within {plan.max_rounds}. Sequential kept (docs/verdicts.md, 'a known state')")
    if short and not plan.accept_contention:
        busy = BusySummary.of([c.comparison for c in candidates])
        if busy.busy:
            return (f"the machine was busy ({busy.text()}); a verdict needs {plan.min_rounds} quiet rounds per "
                    f"candidate within {plan.max_rounds}. Sequential kept, and any stored conclusive record stays. "
                    "Tune on a quiet machine, or accept contention on purpose (--accept-contention: such a record "
                    "says so and never replaces one measured quiet)")
    if plan.max_rounds < plan.min_rounds:
        return (f"--confirm-rounds {plan.max_rounds} is below the {plan.min_rounds} rounds a verdict needs; "
                "sequential kept")
    if short:  # whatever its interval says, too few rounds count for a verdict
        c = max(short, key=lambda c: c.speedup if c.interval.rounds else 0.0)
        counted = len(c.comparison.evidence(plan.accept_contention))
        left = len(c.comparison.rounds) - counted
        said = interval_words(c.interval) if c.interval.rounds >= 2 and c.interval.confidence else "no interval yet"
        return (f"trial {c.trial}'s {counted} {'' if plan.accept_contention else 'quiet '}paired round(s) are fewer "
                f"than the {plan.min_rounds} a verdict needs ({said}, not yet a verdict"
                + (f"; {left} round(s) left out or failed" if left else "") + f") within {plan.max_rounds}; "
                "sequential kept. To decide: more rounds (--confirm-rounds), or a quieter machine")
    # the candidate that kept the verdict open: its interval reaches 1 + min_effect (not the fastest one,
    # whose interval may lie wholly below it while another's does not)
    open_ = [c for c in candidates if c.comparison.decision is Decision.UNDECIDED and c.interval.rounds >= 2
             and c.interval.confidence]
    best = max(open_ or [c for c in candidates if c.interval.rounds >= 2 and c.interval.confidence],
               key=lambda c: c.interval.high, default=None)
    about = (f"trial {best.trial} ({best.speedup:.3f}x, {interval_words(best.interval)}) could be "
             f"{plan.min_effect:.0%} faster or not" if best else "no candidate completed a round")
    return (f"{about} after {plan.max_rounds} paired rounds; sequential kept. To decide: more rounds "
            f"(--confirm-rounds {2 * plan.max_rounds}), pinned threads (taskset, OMP_NUM_THREADS), or a quieter machine")


def nothing_to_compare(study: optuna.Study) -> str:
    """Why no candidate reached the confirmation, with the outcomes of the search trials."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        r = result_of(t)
        if t.user_attrs.get(BASELINE) or r.duplicate or not r.schedule or r.schedule_obj().is_sequential:
            continue
        counts[r.outcome or "?"] = counts.get(r.outcome or "?", 0) + 1
    if not counts:
        return ("nothing to compare: the search proposed no schedule other than the sequential one; sequential "
                "kept, nothing concluded")
    said = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return f"nothing to compare: no candidate ran correctly ({said}); sequential kept, nothing concluded"


def interval_words(iv: Interval) -> str:
    return f"{iv.confidence:.1%} interval {iv.low:.2f}-{iv.high:.2f}x over {iv.rounds} paired rounds"


# --- the explanation and the record -------------------------------------------------------------

def differences(schedule: Schedule, hardware) -> str:
    """What a schedule changes against sequential, in words (for a winner that did not overlap)."""
    unit = device_type(hardware.kind).unit
    said = []
    if len(schedule.split_sizes) > 1:
        said.append(f"{len(schedule.split_sizes)} nano-batches {list(schedule.split_sizes)}")
    caps = [f"stream {i} capped at {st.sm_share} of {hardware.num_sms} {unit}" for i, st in enumerate(schedule.streams)
            if st.sm_share is not None]
    said += caps
    if len(schedule.streams) > 1:
        said.append(f"{len(schedule.streams)} streams")
    if schedule.cuda_graph:
        said.append("a CUDA graph")
    return ", ".join(said) or "nothing visible in the schedule"


def explained(confirmation: Confirmation, target: Target) -> tuple[Confirmation, dict | None]:
    """A winner with its timeline's overlap; one that won without overlap says so, and is kept
    a winner only on quiet rounds."""
    if not confirmation.wins:
        return confirmation, None
    schedule = confirmation.schedule
    overlap = explain(target, schedule)
    if overlap is None or not overlap.get("makespan_ms"):
        return confirmation, overlap
    share = overlap.get("overlapped_ms", 0.0) / overlap["makespan_ms"]
    if share >= NO_OVERLAP:
        return confirmation, overlap
    said = (f"won without overlap: {overlap.get('overlapped_ms', 0.0):.2f} of {overlap['makespan_ms']:.2f} ms with two "
            f"or more streams busy; it differs from sequential in {differences(schedule, target.hardware)}")
    if confirmation.contended:
        return dataclasses.replace(confirmation, kind=Kind.INCONCLUSIVE, no_overlap=said, reason=(
            f"{said}, and its rounds ran under contention: such a winner is stored only on quiet rounds; sequential "
            "kept")), overlap
    return dataclasses.replace(confirmation, no_overlap=said), overlap


def store_verdict(confirmation: Confirmation, study: optuna.Study, target: Target, workload: Workload,
                  config: RecordConfig, *, warm_baseline_ms: float | None = None, model: dict | None = None
                  ) -> tuple[StoredSchedule, str, str | None, Confirmation]:
    """Store the verdict; returns the record in the store, its path, why an older record was kept
    instead (None when this one was stored), and the confirmation as stored (with its why).
    `warm_baseline_ms`: the sequential figure when the confirmation measured no round; `model`: what
    the performance model said (tuner/guide.py), kept with the record."""
    confirmation, overlap = explained(confirmation, target)
    tokens = workload.num_tokens if workload.num_tokens else target.space_context().layout.num_tokens
    best, base_ms = confirmation.best_candidate, confirmation.baseline_ms or warm_baseline_ms
    median_ms = base_ms / confirmation.speedup if base_ms else None
    record = StoredSchedule(
        hardware=target.hardware, workload=workload, schedule=confirmation.schedule, verdict=confirmation.kind,
        tokens_per_s=tokens_per_s(tokens, median_ms) if median_ms else 1.0,
        baseline_tokens_per_s=tokens_per_s(tokens, base_ms) if base_ms else 1.0,
        speedup=confirmation.speedup, speedup_spread=confirmation.noise,
        speedup_interval=(best.interval.low, best.interval.high) if best and best.interval.rounds >= 2 else None,
        candidate_speedup=best.speedup if best and best.interval.rounds else None,
        confidence=best.interval.confidence if best and best.interval.rounds >= 2 else None,
        rounds=best.interval.rounds if best else None, busy_rounds=confirmation.busy_rounds,
        efficiency=confirmation.bound_ms / median_ms if confirmation.bound_ms and median_ms else None,
        space=config.space, params=_params(study, confirmation.winner) if confirmation.wins else {},
        study=study.study_name, storage=config.storage_url, trial=confirmation.winner.trial if confirmation.wins else None,
        busy=confirmation.busy, contended=confirmation.contended, overlap=overlap if confirmation.wins else None,
        no_overlap=confirmation.no_overlap, model=model,
    )
    study.set_user_attr("confirmation", confirmation.to_dict())
    store = ScheduleStore(StoreConfig(root=config.store_root))
    try:
        kept, path, why = save_unless_kept(store, record)
    except OSError as e:  # a full disk, a folder made read-only mid-run: the write left nothing half-done
        where = store.path(record.hardware.key, record.workload.key)
        fix = "free space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else \
            f"make {where.parent} writable" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "fix that"
        raise TuneError(f"cannot write the record {where}: {e.strerror or e}; nothing was half-written (any older "
                        f"record there is unchanged) and study {study.study_name} in {config.storage_url} keeps every "
                        f"trial and the verdict: {fix} and run tune again to store it") from None
    return kept, str(path), why, confirmation


def _params(study: optuna.Study, winner: Candidate) -> dict:
    return dict(study.get_trials(deepcopy=False)[winner.trial].params) if winner.trial is not None else {}


# --- in words -----------------------------------------------------------------------------------

def verdict_text(v: Confirmation | dict | None) -> str:
    """A confirmation in words, with what to do when it is inconclusive, and whether its evidence
    ran under contention. A dict is a study's "confirmation" attribute (`Confirmation.to_dict`),
    read back typed; one stored by an older dynaflow-tune (no reason) is said as it was."""
    if not v:
        return "not run yet"
    if isinstance(v, dict):
        if "reason" not in v:
            return _legacy_words(v)
        v = Confirmation.from_dict(v)
    text = _words(v)
    if v.no_overlap and v.wins:
        text += f"; {v.no_overlap}"
    if v.contended:
        text += f"; measured under contention (accepted): {v.contended}"
    return text


def _words(c: Confirmation) -> str:
    best = c.best_candidate
    iv = best.interval if best else None
    said = (f"{iv.confidence:.1%} interval {iv.low:.2f}-{iv.high:.2f}x over {iv.rounds} paired rounds"
            if iv is not None and iv.low is not None and iv.confidence and iv.rounds >= 2 else "no interval")
    if c.wins:
        return f"{c.speedup:.3f}x over sequential, confirmed ({said}; trial {c.winner.trial})"
    if c.kind is Kind.SEQUENTIAL_BEST:
        return (f"sequential is best: no candidate can be faster by {c.min_effect or 0.03:.0%} or more "
                f"(best candidate {best.speedup:.3f}x, {said})")
    return f"inconclusive: {c.reason}"


def _legacy_words(v: dict) -> str:
    """A confirmation stored by an older dynaflow-tune (pooled samples, before paired rounds)."""
    kind = v.get("verdict") or ("sequential_best" if v.get("sequential_best") else "winner")
    return f"{kind.replace('_', ' ')} (confirmed by an older dynaflow-tune from pooled samples; re-tune to confirm " \
           "in paired rounds)"
