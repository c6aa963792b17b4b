"""The one tuning loop over a pool it cannot see into: results out of order, workers that die and
come back later, Ctrl-C with trials in flight. A fake pool enforces the protocol (never more
jobs than it said it had room for; a job id answered once)."""
import dataclasses
import shutil
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dynaflow import search_spaces
from dynaflow.runtime import TrialOutcome
from dynaflow.tuner.config import TuneConfig
from dynaflow.tuner.pool import Done, InlinePool, Job, measure_one, run_job
from dynaflow.tuner.records import StudyOutcome, TrialMeasurement
from dynaflow.tuner.tune import tune_workload
from fakes import FakeTarget, split_landscape, tiny_context
from test_tuner import W
from cli_output import error_lines

TESTS = Path(__file__).parent


@pytest.fixture
def faulty_space(monkeypatch, tmp_path):
    shutil.copy(TESTS / "faulty_space.py", tmp_path / "faulty.py")
    monkeypatch.setattr(search_spaces, "__path__", [*search_spaces.__path__, str(tmp_path)])


class FakePool:
    """`workers` slots; each wait() finishes the newest job first (out of submission order). A
    schedule labelled poison-* kills its worker, which comes back `down_for` waits later."""

    def __init__(self, target, workers: int = 3, down_for: int = 2, on_wait=None) -> None:
        self.target, self.workers, self.down_for, self.on_wait = target, workers, down_for, on_wait
        self.running: list[Job] = []
        self.down: list[int] = []  # waits left before each dead worker is back
        self.submitted: list[str] = []
        self.answered: set[int] = set()
        self.peak = 0

    def free(self) -> int:
        return self.workers - len(self.running) - len(self.down)

    def submit(self, job: Job) -> None:
        assert self.free() > 0, "submitted to a pool with no room"
        self.running.append(job)
        self.submitted.append(job.schedule.key())
        self.peak = max(self.peak, len(self.running))

    def wait(self, timeout_s: float) -> list[Done]:
        if self.on_wait:
            self.on_wait(self)
        self.down = [n - 1 for n in self.down if n > 1]
        if not self.running:
            return []
        job = self.running.pop()  # the newest first
        assert job.id not in self.answered
        self.answered.add(job.id)
        if job.schedule.label.startswith("poison"):
            self.down.append(self.down_for)
            m = TrialMeasurement(outcome=TrialOutcome.CRASHED, message="worker died", killed_worker=True)
        else:
            m = run_job(self.target, dataclasses.replace(job, on_sample=None))  # in another process: no pruning
        return [Done(job=job, measurement=m, worker=f"w{job.id % self.workers}")]


def config(tmp_path, **kw):
    base = dict(workloads=(W,), space="faulty", trials=12, storage=f"sqlite:///{tmp_path}/s.db",
                store_root=tmp_path, progress=False, trial_timeout_s=5.0)
    return TuneConfig(**{**base, **kw})


def trials_of(cfg) -> list[optuna.trial.FrozenTrial]:
    name = optuna.get_all_study_names(cfg.storage.url)[0]
    study = optuna.load_study(study_name=name, storage=cfg.storage.url)
    return [t for t in study.trials if not t.user_attrs.get("baseline")]


def test_out_of_order_results_reach_their_own_trials_and_dead_workers_cost_one_trial(tmp_path, faulty_space):
    cfg = config(tmp_path)
    target = FakeTarget(tiny_context(), split_landscape)
    pool = FakePool(target)
    logs = []
    [result] = tune_workload(W, [(target, pool)], cfg, log=logs.append)
    trials = trials_of(cfg)
    assert len(trials) == 12 and all(t.state.is_finished() for t in trials)
    assert pool.peak == 3  # trials ran three at a time
    for t in trials:  # each result is its own trial's: faulty proposes candidate n at trial n
        label = t.user_attrs["result"]["label"]
        assert label == {3: "poison-exit", 6: "poison-hang"}.get(t.number, f"cand{t.number}")
        assert t.user_attrs["result"]["worker"] == f"w{t.number % 3}"
    poisoned = [t for t in trials if t.user_attrs["result"]["label"].startswith("poison")]
    assert [t.user_attrs["result"]["killed_worker"] for t in poisoned] == [True, True]
    assert len(pool.submitted) == len(set(pool.submitted)) == 12  # nothing measured twice
    assert result.outcomes == {"ok": 10, "crashed": 2}
    assert any(line.startswith(target.hardware.key) and "12 trial(s) by worker" in line for line in logs)

    # the same winner as one process measuring in turn
    ref_cfg = config(tmp_path / "inline")
    ref_target = FakeTarget(tiny_context(), split_landscape)
    [ref] = tune_workload(W, [(ref_target, InlinePool(ref_target))], ref_cfg, log=lambda *a: None)
    assert result.record.schedule == ref.record.schedule and result.record.schedule.label == "cand2"


AGAIN = """
from dynaflow.runtime import Schedule

name = "again"


def suggest(trial, ctx):
    n = ctx.layout.num_requests
    if trial.number in (3, 9):  # the same poison split twice
        return Schedule(split_sizes=(n - 1, 1), label="poison-exit")
    return Schedule(split_sizes=(trial.number + 1, n - trial.number - 1), label=f"cand{trial.number}")
"""


def test_a_schedule_that_killed_a_worker_is_never_submitted_again(tmp_path, monkeypatch):
    (tmp_path / "again.py").write_text(AGAIN)
    monkeypatch.setattr(search_spaces, "__path__", [*search_spaces.__path__, str(tmp_path)])
    cfg = config(tmp_path, space="again")
    target = FakeTarget(tiny_context(), split_landscape)
    pool = FakePool(target, workers=1)  # trial 3 has died before trial 9 is asked
    tune_workload(W, [(target, pool)], cfg, log=lambda *a: None)
    trials = {t.number: t.user_attrs["result"] for t in trials_of(cfg)}
    assert trials[3]["killed_worker"] and trials[3]["worker"] == "w0"
    assert trials[9]["label"] == "poison-exit" and trials[9]["worker"] is None
    assert trials[9]["message"] == "this schedule killed a worker before; not re-run"
    assert len(pool.submitted) == len(set(pool.submitted)) == 11


def test_ctrl_c_with_trials_in_flight_records_them_interrupted(tmp_path, faulty_space):
    from dynaflow.tuner.interrupt import StopFlag

    stop = StopFlag()

    def press_ctrl_c(pool):
        if len(pool.answered) == 4:
            stop.requested = True

    cfg = config(tmp_path)
    target = FakeTarget(tiny_context(), split_landscape)
    pool = FakePool(target, on_wait=press_ctrl_c)
    [result] = tune_workload(W, [(target, pool)], cfg, log=lambda *a: None, stop=stop)
    assert result.interrupted
    trials = trials_of(cfg)
    assert all(t.state is not TrialState.RUNNING for t in trials)
    outcomes = [t.user_attrs["result"]["outcome"] for t in trials]
    assert outcomes.count("interrupted") == len(pool.running) >= 1  # in flight when the loop stopped
    assert len(trials) == len(pool.answered) + len(pool.running) < 12  # nothing proposed after the flag
    # every count printed means what it says: measured, crashed and interrupted apart
    from dynaflow.tuner.commands import result_lines

    measured = sum(o not in ("crashed", "interrupted") for o in outcomes)
    rest = ", ".join(f"{outcomes.count(k)} {k}" for k in ("crashed", "interrupted") if outcomes.count(k))
    assert f"  {measured} distinct schedule(s) measured (and {rest}) in the study" in result_lines(result)
    assert f"interrupted {outcomes.count('interrupted')}" in result_lines(result)  # this run's tally too
    # resumed, the run measures the whole budget: an interrupted trial is not a measured one
    [again] = tune_workload(W, [(target, FakePool(target))], cfg, log=lambda *a: None)
    trials = trials_of(cfg)
    counted = [t for t in trials if t.user_attrs["result"]["outcome"] != "interrupted"
               and not t.user_attrs["result"].get("duplicate")]
    assert len(counted) == cfg.trials and again.distinct == cfg.trials


def test_a_second_ctrl_c_inside_a_wait_leaves_no_trial_running(tmp_path, faulty_space):
    def second_ctrl_c(pool):
        if len(pool.answered) == 5:
            raise KeyboardInterrupt

    cfg = config(tmp_path)
    target = FakeTarget(tiny_context(), split_landscape)
    [result] = tune_workload(W, [(target, FakePool(target, on_wait=second_ctrl_c))], cfg, log=lambda *a: None)
    assert result.interrupted
    states = [t.state for t in trials_of(cfg)]
    assert TrialState.RUNNING not in states and len(states) >= 6


def test_inline_pool_turns_a_raising_target_into_one_crashed_trial():
    target = FakeTarget(tiny_context(), split_landscape, failures={1: RuntimeError})
    pool = InlinePool(target)
    from dynaflow.runtime import Schedule

    m = measure_one(pool, Schedule())
    assert m.outcome is TrialOutcome.CRASHED and m.message == "RuntimeError: injected at call 1"
    assert measure_one(pool, Schedule()).ok  # the pool lives on
    pool.submit(Job(id=1, schedule=Schedule()))
    with pytest.raises(RuntimeError, match="one job at a time"):
        pool.submit(Job(id=2, schedule=Schedule()))


def test_a_schedule_running_in_another_process_is_not_measured_again(tmp_path):
    """Another tuner's running trial names its schedule as soon as it is built; a proposal of the
    same schedule here is a duplicate (not counted, not measured), and one finished there since
    this tuner started is reused."""
    from dynaflow.runtime import Schedule
    from dynaflow.tuner.search import propose
    from dynaflow.tuner.storage import Heartbeat
    from dynaflow.tuner.session import search_config, study_config
    from dynaflow.tuner.study import SCHEDULE_KEY, Known, open_study

    cfg = config(tmp_path)
    study = open_study("s", study_config(cfg))
    split = Schedule(split_sizes=(20, 12), label="split")
    known = Known(study)
    with warnings.catch_warnings():  # "Heartbeat of storage is supposed to be used with Study.optimize"
        warnings.simplefilter("ignore")
        other = study.ask()  # another process's trial, still running
    other.set_user_attr(SCHEDULE_KEY, split.key())
    heartbeat = Heartbeat(study)
    try:
        p = propose(study, lambda trial, ctx: split, tiny_context(), known, search_config(cfg), heartbeat)
        assert p.answer is not None and p.answer.duplicate and p.answer.outcome is StudyOutcome.SKIPPED
        assert p.answer.message == f"duplicate schedule: being measured now in trial {other.number} (this or another process)"
        study.tell(p.trial, state=TrialState.FAIL)
        fresh = Schedule(split_sizes=(16, 16), label="fresh")
        assert propose(study, lambda trial, ctx: fresh, tiny_context(), known, search_config(cfg), heartbeat).answer is None
    finally:
        heartbeat.close()


def test_a_storage_that_fails_mid_run_is_one_line_and_the_trial_is_failed(tmp_path, faulty_space, monkeypatch):
    from dynaflow.tuner import search
    from dynaflow.tuner.config import TuneError

    honest, calls = search.record_trial, []

    def full_disk(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.\nmore")
        return honest(*args, **kw)

    monkeypatch.setattr(search, "record_trial", full_disk)
    cfg = config(tmp_path)
    target = FakeTarget(tiny_context(), split_landscape)
    with pytest.raises(TuneError) as info:
        tune_workload(W, [(target, InlinePool(target))], cfg, log=lambda *a: None)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"the study storage {cfg.storage.url} failed to record trial 3 "
                                                      "(StorageInternalError: An exception is raised during the commit.)")
    assert "trial 3 is failed, the trials recorded before it are kept" in message
    states = {t.number: t.state for t in trials_of(cfg)}
    assert states == {1: TrialState.COMPLETE, 2: TrialState.COMPLETE, 3: TrialState.FAIL}  # none left RUNNING


@pytest.mark.parametrize("code, said, fix", [("ENOSPC", "No space left on device", "free space"),
                                             ("EACCES", "Permission denied", "make .* writable")])
def test_a_full_disk_at_the_record_write_is_one_line_and_nothing_half_written(tmp_path, faulty_space, monkeypatch,
                                                                              code, said, fix):
    import errno
    import os

    from dynaflow.runtime import files
    from dynaflow.tuner.config import TuneError

    def fails(src, dst):
        raise OSError(getattr(errno, code), said)

    monkeypatch.setattr(files.os, "replace", fails)
    cfg = config(tmp_path)
    target = FakeTarget(tiny_context(), split_landscape)
    with pytest.raises(TuneError, match=rf"cannot write the record .*\.json: {said}; nothing was "
                                        rf"half-written .* keeps every trial and the verdict: {fix} and run tune again"):
        tune_workload(W, [(target, InlinePool(target))], cfg, log=lambda *a: None)
    monkeypatch.setattr(files.os, "replace", os.replace)
    leftovers = [p for p in (tmp_path / "schedules").rglob("*") if p.is_file()]
    assert leftovers == []  # no temp file, no partial record
    assert len(trials_of(cfg)) == 12  # the search was kept


@pytest.mark.parametrize("flag, value, said", [
    ("store", "a-file", "--store {tmp}/a-file is a file, not a folder"),
    ("store", "/proc/dynaflow", "--store /proc/dynaflow is under /proc, a kernel interface"),
    ("storage", "sqlite:///{tmp}/a-file/s.db", "--storage 'sqlite:///{tmp}/a-file/s.db': its folder {tmp}/a-file is a file"),
    ("storage", "journal:{tmp}", "--storage 'journal:{tmp}' names a folder, {tmp}; give a file path in it"),
])
def test_store_and_storage_are_checked_before_anything_runs(tmp_path, flag, value, said, capsys):
    from dynaflow.tuner.cli import main

    (tmp_path / "a-file").write_text("x")
    value = value.format(tmp=tmp_path)
    args = ["tune", "--model", "definitely_missing_module:case", "--trials", "1", "--no-progress",
            "--store", str(tmp_path / "store"), "--storage", f"sqlite:///{tmp_path}/s.db"]
    args[args.index(f"--{flag}") + 1] = value if flag == "storage" or value.startswith("/") else str(tmp_path / value)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and said.format(tmp=tmp_path) in err, err  # before the model was even imported
