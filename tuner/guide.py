"""Model-guided tuning: the performance model (runtime/perfmodel) orders and bounds the search;
only paired measurements decide a verdict.

    guide = make_guide(target, workload, config, log)   # the profile (cached), the headroom, the model's ranking
    guide.enqueue(study, k)                             # the model's best predicted schedules are tried first
    guide.screens(min_effect)                           # nothing could gain, even optimistically: measure a few, stop
    guide.contradicted(study)                           # a measurement beat the model by more than its error
    run_error(study, since)                             # the model's error over what this run measured

A target without a profile (measured in another process: a tensor-parallel group, vLLM's worker,
a Ray pool) tunes as before, and the run says so.
"""
from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import optuna

from dynaflow.runtime import Schedule, Workload, telemetry
from dynaflow.runtime.perfmodel import (Headroom, ModelError, Profile, Simulator, load_or_measure, model_error,
                                        optimism, record_error)
from dynaflow.search_spaces import SpaceContext, get_space

from .study import BASELINE, SCHEDULE_KEY, result_of

PREDICTED = "predicted_speedup"  # each trial's prediction, kept with it
MODEL_ERROR = "model_error"  # the study's: this run's error, with its date
DRAWS = 400  # schedules drawn from the space to rank by the model (distinct ones are fewer)
SCREEN_TOP = 3  # what a screened workload measures: the model's top few
SCREEN_CONFIRM = 1  # ... and what its confirmation re-measures: the best of them (paired rounds, the usual rule)
RECHECK_ROUNDS = 2  # more paired rounds of a screened schedule that seems to beat the model, before the full search


class RandomTrial:
    """An optuna-like trial that draws each parameter at random and remembers it: how the model
    sees the space without a study (the params then enqueue the schedule in the real one)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.params = rng, {}

    def suggest_int(self, name: str, low: int, high: int) -> int:
        self.params[name] = v = self.params.get(name, self.rng.randint(low, high))
        return v

    def suggest_categorical(self, name: str, choices):
        self.params[name] = v = self.params.get(name, self.rng.choice(list(choices)))
        return v


def draw(space_name: str, ctx: SpaceContext, n: int = DRAWS, seed: int = 0) -> list[tuple[dict, Schedule]]:
    """Distinct schedules of a space, with the params that make each (draws that fail are skipped)."""
    space, rng, seen, out = get_space(space_name), random.Random(seed), set(), []
    for _ in range(n):
        trial = RandomTrial(rng)
        try:
            schedule = space(trial, ctx)
        except Exception:  # noqa: BLE001 - a space's bug costs a trial in the search, nothing here
            continue
        if schedule.key() not in seen:
            seen.add(schedule.key())
            out.append((trial.params, schedule))
    return out


@dataclass(kw_only=True)
class Guide:
    profile: Profile
    simulator: Simulator
    headroom: Headroom
    ranked: list[tuple[float, dict, Schedule]]  # (predicted speedup, params, schedule), best first
    path: Path | None
    said: str  # where the profile came from
    error: float = 0.15  # how much faster than predicted a schedule may plausibly run

    def predict(self, schedule: Schedule) -> float | None:
        """The predicted speedup over the sequential schedule; None where the model cannot say."""
        try:
            return self.headroom.sequential_ms / self.simulator.predict(schedule).ms
        except (ValueError, KeyError):
            return None

    @property
    def best(self) -> tuple[float, dict, Schedule]:
        return self.ranked[0] if self.ranked else (1.0, {}, Schedule())

    def optimistic(self) -> float:
        return self.best[0] * (1 + self.error)

    def screens(self, min_effect: float) -> bool:
        """Even optimistically (its best prediction plus the model's error), no schedule reaches
        1 + min_effect: the search measures the model's top few, and stops if they agree."""
        return self.optimistic() < 1 + min_effect

    def lines(self) -> list[str]:
        speedup, _, schedule = self.best
        return [f"model: {self.said}",
                f"model: {self.headroom.text()}",
                f"model: best predicted {speedup:.3f}x ({schedule.label}) of {len(self.ranked)} distinct schedules ranked; "
                f"its error so far {self.error:.0%} "
                + ("(measured last run)" if self.profile.error else "(none measured yet: assumed)")]

    def enqueue(self, study: optuna.Study, k: int) -> int:
        """The model's k best predicted schedules, first in the study's queue (skipped when the
        study measured them already)."""
        known = {t.user_attrs.get(SCHEDULE_KEY) for t in study.get_trials(deepcopy=False)}
        n = 0
        for _, params, schedule in self.ranked:
            if n >= k:
                break
            if schedule.key() in known or not params:
                continue
            study.enqueue_trial(params, skip_if_exists=True)
            n += 1
        return n

    def contradicted(self, study: optuna.Study, since: int, recheck=None) -> str | None:
        """A trial of this run measured faster than its prediction by more than the model's error,
        and fast enough to matter: the model is not to be trusted here (why, or None). With
        `recheck(schedule) -> [speedup, ...]` (more paired rounds, busy ones left out), a trial that
        looks so is measured again (RECHECK_ROUNDS more) and contradicts only by the median of its
        rounds: one round on a noisy host may read 1.03x where five read 0.89x."""
        for t in study.get_trials(deepcopy=False):
            if t.number < since or BASELINE in t.user_attrs:
                continue
            r, predicted = result_of(t), t.user_attrs.get(PREDICTED)
            if r.speedup is None or predicted is None or r.duplicate or busy(r):  # a busy round is no evidence
                continue
            if not self._beyond(r.speedup, predicted):
                continue
            schedule = r.schedule_obj()
            if recheck is None or schedule is None:
                return (f"trial {t.number} measured {r.speedup:.3f}x where the model predicted {predicted:.3f}x "
                        f"(beyond its error of {self.error:.0%})")
            rounds = [r.speedup, *recheck(schedule)]
            median = statistics.median(rounds)
            if self._beyond(median, predicted):
                return (f"trial {t.number} measured {median:.3f}x (the median of {len(rounds)} paired rounds) where the "
                        f"model predicted {predicted:.3f}x (beyond its error of {self.error:.0%})")
        return None

    def _beyond(self, measured: float, predicted: float) -> bool:
        return measured > predicted * (1 + self.error) and measured > 1

    def measured_error(self, error: ModelError) -> bool:
        """Take this run's error on a few schedules in place of the one assumed, once measured on at
        least 3: the worst of them (not the median a run of many gives `optimism`), at least 5%;
        whether it was taken."""
        if error.n < 3 or error.worst is None or not math.isfinite(error.worst):
            return False
        self.error = max(0.05, float(error.worst))
        return True

    def keep_error(self, error: ModelError) -> None:
        if error.n >= 3 and error.median_abs is not None:
            self.profile = record_error(self.path, self.profile, error.to_dict())


def make_guide(target, workload: Workload, space: str, profiles_dir: Path | None, *, renew: bool = False,
               seed: int = 0) -> tuple[Guide | None, str]:
    """The model for a target that can profile (this process's device), or None and why not."""
    profile_of = getattr(target, "profile", None)
    if profile_of is None:
        return None, ("model: off (this target measures in another process: its profile is not built there yet); "
                      "the search runs blind, as before")
    path = Path(profiles_dir) / target.hardware.key / f"{workload.key}.json" if profiles_dir is not None else None
    profile, said = profile_of(path, renew=renew, label=workload.key, family=workload.family)
    ctx = target.space_context()
    sim = Simulator(profile, ctx.graph, ctx.layout)
    headroom = sim.headroom()
    ranked = []
    for params, schedule in draw(space, ctx, seed=seed):
        if schedule.is_sequential:  # the baseline itself: not a candidate
            continue
        try:
            ranked.append((headroom.sequential_ms / sim.predict(schedule).ms, params, schedule))
        except (ValueError, KeyError):
            continue
    ranked.sort(key=lambda x: -x[0])
    return Guide(profile=profile, simulator=sim, headroom=headroom, ranked=ranked, path=path, said=said,
                 error=optimism(profile)), ""


def busy(record) -> bool:
    """The trial's paired round ran while the machine was busy: no evidence, for or against the model."""
    return telemetry.contention((record.telemetry or {}).get("busy")) is not None


def run_error(study: optuna.Study, since: int = 0) -> ModelError:
    """The model's error over the trials numbered `since` on that carry a prediction and a
    measured paired speedup (OK or pruned; duplicates answered from the study and busy rounds excluded)."""
    pairs = []
    for t in study.get_trials(deepcopy=False):
        if t.number < since or BASELINE in t.user_attrs or PREDICTED not in t.user_attrs:
            continue
        r = result_of(t)
        if r.speedup is not None and not r.duplicate and not busy(r):
            pairs.append((t.user_attrs[PREDICTED], r.speedup))
    return model_error(pairs)
