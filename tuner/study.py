"""The tuning loop for one (hardware, workload, space): Optuna ask/tell in this process.

    ask -> build schedule -> measure (verify, time) -> tell -> ... -> confirm -> store

Only this driver writes the study, so SQLite is safe. A re-run of the same command loads the
study and continues; trials a killed run left RUNNING are marked failed first.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from dynaflow.runtime import Measurement, Schedule, TrialOutcome, Workload
from dynaflow.runtime.store import ScheduleStore, StoreConfig
from dynaflow.search_spaces import get_space

from .config import TuneConfig
from .measurer import Measurer
from .progress import Progress

BASELINE = "baseline"
RESULT = "result"  # one user attr per trial holding its whole record: each attr is a storage write


def result_of(trial: optuna.trial.FrozenTrial) -> dict:
    """The trial's record: outcome, message, schedule, label, latency_ms, spread, efficiency, ..."""
    return trial.user_attrs.get(RESULT, {})


@dataclass(kw_only=True)
class StudyResult:
    study: optuna.Study
    interrupted: bool = False
    outcomes: dict[str, int] = field(default_factory=dict)


def study_name(hardware_key: str, workload: Workload, space: str) -> str:
    return f"{hardware_key}/{workload.key}/{space}"


def open_study(name: str, config: TuneConfig) -> optuna.Study:
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=config.seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=config.seed),
               "qmc": lambda: optuna.samplers.QMCSampler(seed=config.seed)}[config.sampler]()
    with warnings.catch_warnings():  # WilcoxonPruner is marked experimental; it fits repeated timings
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        pruner = optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=5) if config.prune \
            else optuna.pruners.NopPruner()
    study = optuna.create_study(storage=make_storage(config.storage), study_name=name, direction="maximize",
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial = optuna.trial.Trial(study, stale._trial_id)
        trial.set_user_attr(RESULT, {"outcome": TrialOutcome.CRASHED.value, "schedule": None,
                                     "message": "the tuning process died during this trial"})
        study.tell(stale.number, state=TrialState.FAIL)
    return study


def make_storage(url: str):
    """An Optuna storage URL, or journal:PATH for Optuna's append-only journal file (one node,
    several processes, far fewer milliseconds per trial than SQLite). Local folders are created.
    A local SQLite file is put in write-ahead-log mode: a notebook or optuna-dashboard can read
    it while the tuner writes, and each write costs about half as much."""
    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix):
            Path(url.removeprefix(prefix)).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage

        from .journal import UnsyncedJournalBackend

        return JournalStorage(UnsyncedJournalBackend(url.removeprefix("journal:")))
    if url.startswith("sqlite:///") and not url.endswith(":memory:"):
        return _sqlite_wal(url)
    return url


def _sqlite_wal(url: str) -> optuna.storages.RDBStorage:
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(url)

    def on_connect(conn, _record) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # committed writes survive a killed process
        cur.execute("PRAGMA synchronous=NORMAL")  # only a power cut could lose the last commits
        cur.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened while creating the schema predate the pragmas
    return storage


def search_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Search trials asked so far (enqueued warm starts not yet asked do not count)."""
    asked = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    return [t for t in study.get_trials(deepcopy=False, states=asked) if not t.user_attrs.get(BASELINE)]


def ensure_baseline(study: optuna.Study, measurer: Measurer, config: TuneConfig) -> Measurement:
    """The sequential schedule, measured first and kept as a completed trial without params.
    Measured twice, keeping the second: the first run in a process pays one-off start-up costs."""
    measurer.measure(Schedule(), time_limit_s=config.trial_timeout_s)
    m = measurer.measure(Schedule(), time_limit_s=config.trial_timeout_s)
    if not m.ok:
        raise RuntimeError(f"the sequential baseline failed ({m.outcome.value}): {m.message}")
    if not any(t.user_attrs.get(BASELINE) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))):
        study.add_trial(optuna.trial.create_trial(
            value=m.tokens_per_s, intermediate_values=_per_sample(m, measurer),
            user_attrs={BASELINE: True, RESULT: trial_record(Schedule(), m, worker=None)}))
    return m


def enqueue_warm_starts(study: optuna.Study, config: TuneConfig, hardware_key: str, workload: Workload) -> int:
    """Winners stored for this model's other workloads on this hardware, same space."""
    store = ScheduleStore(StoreConfig(root=config.store_root))
    n = 0
    for _, rec in store.records(hardware_key):
        if isinstance(rec, ValueError) or rec.space != config.space or rec.sequential_best or not rec.params:
            continue
        if rec.workload.model == workload.model and rec.workload.key != workload.key:
            study.enqueue_trial(rec.params, skip_if_exists=True)
            n += 1
    return n


def run_search(study: optuna.Study, measurer: Measurer, config: TuneConfig, progress: Progress,
               stop=()) -> StudyResult:
    """`stop`: a flag the Ctrl-C handler raises; checked between samples and between trials."""
    space, ctx = get_space(config.space), measurer.space_context()
    seen, _ = known_schedules(study)
    deadline = time.monotonic() + config.timeout_s if config.timeout_s else float("inf")
    result, asked = StudyResult(study=study), len(search_trials(study))
    while (config.trials is None or asked < config.trials) and time.monotonic() < deadline and not stop:
        trial, asked = study.ask(), asked + 1
        try:
            schedule = space(trial, ctx)
            key = schedule.to_json()
            prune = pruning_hook(trial, measurer)
            m = seen_result(seen, key) or measurer.measure(schedule, on_sample=lambda x: bool(stop) or prune(x),
                                                           time_limit_s=config.trial_timeout_s)
            if stop and not m.ok:
                m = _interrupted()
        except KeyboardInterrupt:
            finish_trial(study, trial, Schedule(), _interrupted())
            result.interrupted = True
            break
        except Exception as e:  # a bug in a space or measurer costs one trial, not the study
            schedule, m = Schedule(), Measurement(outcome=TrialOutcome.CRASHED, message=f"{type(e).__name__}: {e}")
        record_trial(study, trial, schedule, m, seen=seen, result=result)
        progress.update(study, m)
    result.interrupted = result.interrupted or bool(stop)
    return result


def record_trial(study: optuna.Study, trial, schedule: Schedule, m: Measurement, *, seen: dict,
                 result: StudyResult, worker: str | None = None) -> None:
    """Tell the study, remember an OK schedule's value, count the outcome."""
    finish_trial(study, trial, schedule, m, worker=worker)
    if m.ok:
        seen[schedule.to_json()] = m.tokens_per_s
    result.outcomes[m.outcome.value] = result.outcomes.get(m.outcome.value, 0) + 1


def known_schedules(study: optuna.Study) -> tuple[dict[str, float], set[str]]:
    """Values of schedules measured before, and schedules that killed a worker, from the study."""
    seen, poison = {}, set()
    for t in study.get_trials(deepcopy=False):
        r = result_of(t)
        if t.state == TrialState.COMPLETE:
            seen[r.get("schedule")] = t.value
        elif r.get("outcome") in ("crashed", "timeout") and "worker" in r.get("message", ""):
            poison.add(r.get("schedule"))
    return seen, poison


def seen_result(seen: dict, key: str) -> Measurement | None:
    """A schedule measured before in this study (TPE re-proposes): reuse its value, don't re-time it."""
    if key not in seen:
        return None
    return Measurement(outcome=TrialOutcome.OK, tokens_per_s=seen[key], message="duplicate schedule: value reused")


def pruning_hook(trial: optuna.Trial, measurer: Measurer):
    tokens = measurer.space_context().layout.num_tokens

    def on_sample(samples_ms: list[float]) -> bool:
        trial.report(tokens / samples_ms[-1] * 1e3, step=len(samples_ms) - 1)
        return trial.should_prune()

    return on_sample


def finish_trial(study: optuna.Study, trial: optuna.Trial, schedule: Schedule, m: Measurement, *,
                 worker: str | None = None) -> None:
    trial.set_user_attr(RESULT, trial_record(schedule, m, worker))
    if m.ok:
        study.tell(trial, m.tokens_per_s)
    else:
        study.tell(trial, state=TrialState.PRUNED if m.outcome is TrialOutcome.PRUNED else TrialState.FAIL)


def trial_record(schedule: Schedule, m: Measurement, worker: str | None) -> dict:
    record = {"outcome": m.outcome.value, "message": m.message, "schedule": schedule.to_json(),
              "label": schedule.label, "latency_ms": m.latency_ms, "spread": m.spread,
              "efficiency": m.efficiency, "peak_bytes": m.peak_bytes, "samples_ms": list(m.samples_ms),
              "worker": worker}
    if m.telemetry:
        record["telemetry"] = m.telemetry
    if m.notes:
        record["notes"] = m.notes
    return record


def _per_sample(m: Measurement, measurer: Measurer) -> dict[int, float]:
    tokens = measurer.space_context().layout.num_tokens
    return {i: tokens / s * 1e3 for i, s in enumerate(m.samples_ms)}


def _interrupted() -> Measurement:
    return Measurement(outcome=TrialOutcome.INTERRUPTED, message="stopped by the user (Ctrl-C)")
