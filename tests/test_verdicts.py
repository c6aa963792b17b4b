"""Three verdicts from the confirmation's bootstrap interval, each stored as such; an
inconclusive run never replaces a conclusive record; a failing baseline is one line."""
import json
import random

import pytest

from dynaflow.runtime import Schedule, Workload
from dynaflow.tuner.cli import main
from dynaflow.tuner.confirm import Candidate, judge, speedup_interval
from dynaflow.tuner.config import TuneConfig
from dynaflow.tuner.tune import tune
from fakes import FakeTarget, tiny_context
from cli_output import error_lines

W = Workload(model="llama-tiny", num_decode=32, context_len=16, prefill_tokens=32, prefill_chunk=16)


def samples(median: float, noise: float, n: int = 30, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [median * (1 + noise * (rng.random() - 0.5)) for _ in range(n)]


def candidate(base: list[float], cand: list[float]) -> Candidate:
    low, high = speedup_interval(base, cand)
    return Candidate(trial=None, schedule=Schedule(split_sizes=(1, 1)), samples_ms=tuple(cand),
                     speedup=sorted(base)[len(base) // 2] / sorted(cand)[len(cand) // 2], low=low, high=high, noise=0.0)


@pytest.mark.parametrize("cand_ms, noise, verdict", [
    (8.0, 0.05, "winner"),  # 25% faster, 5% noise: the interval lies above 1
    (12.0, 0.05, "sequential_best"),  # 17% slower: it cannot be 3% faster
    (10.0, 0.05, "sequential_best"),  # equal, little noise: the interval ends below 1.03
    (9.7, 0.8, "inconclusive"),  # maybe 3% faster, 80% noise: the interval spans 1 and 1.03
])
def test_three_verdicts_from_the_interval(cand_ms, noise, verdict):
    base = samples(10.0, noise, seed=1)
    v = judge((candidate(base, samples(cand_ms, noise, seed=2)),), tuple(base), None, min_effect=0.03)
    assert v.kind == verdict, (v.best.low, v.best.high)
    assert v.schedule.is_sequential == (verdict != "winner")


def test_no_candidate_is_sequential_best():
    assert judge((), (10.0, 10.1), None, 0.03).kind == "sequential_best"


def _config(tmp_path, **kw):
    return TuneConfig(**{**dict(workloads=(W,), space="dbo", trials=8, storage=f"sqlite:///{tmp_path}/s.db",
                                store_root=tmp_path, progress=False, confirm_rounds=2, seed=0), **kw})


class Noisy(FakeTarget):
    """Every sample anywhere between 0.3x and 1.7x of the landscape's latency."""

    def measure(self, schedule, **kw):
        m = super().measure(schedule, **kw)
        if m.ok:
            rng = random.Random(self.calls)
            object.__setattr__(m, "samples_ms", tuple(m.latency_ms * (0.3 + 1.4 * rng.random()) for _ in range(6)))
        return m


def test_an_inconclusive_run_never_replaces_a_conclusive_record(tmp_path):
    def landscape(s):
        return 10.0 if s.is_sequential else 8.0

    [first] = tune(_config(tmp_path), make_target=lambda w: FakeTarget(tiny_context(), landscape), log=lambda *a: None)
    assert first.record.verdict == "winner" and first.kept is None
    path = tmp_path / "schedules" / first.record.hardware.key / f"{W.key}.json"
    stored = json.loads(path.read_text())
    assert stored["verdict"] == "winner" and stored["speedup_interval"][0] > 1

    flat = Noisy(tiny_context(), lambda s: 10.0 if s.is_sequential else 9.9)
    [second] = tune(_config(tmp_path, trials=10, prune=False), make_target=lambda w: flat, log=lambda *a: None)
    assert second.verdict.kind == "inconclusive"
    assert second.record.verdict == "winner" and "conclusive" in second.kept  # the old record stays
    assert json.loads(path.read_text()) == stored


def test_an_inconclusive_verdict_is_stored_as_such_when_nothing_was(tmp_path):
    flat = Noisy(tiny_context(), lambda s: 10.0 if s.is_sequential else 9.9)
    [r] = tune(_config(tmp_path, prune=False), make_target=lambda w: flat, log=lambda *a: None)
    assert r.record.verdict == "inconclusive" and r.record.schedule.is_sequential and r.kept is None


def test_a_baseline_that_fails_verification_is_one_line_saying_what_to_do(tmp_path, capsys):
    args = ["tune", "--model", "user_models:noisy_block", "--workload", "d8x1", "--trials", "2", "--no-progress",
            "--storage", f"sqlite:///{tmp_path}/s.db", "--store", str(tmp_path)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(error_lines(err)) == 1 and "Traceback" not in err
    assert "the sequential baseline failed (incorrect" in err and "--rtol/--atol" in err
