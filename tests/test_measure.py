"""measure(): verified first, then timed; every failure is a typed result, not an exception."""
import json

import pytest
import torch

from dynaflow.runtime import Bench, MeasureConfig, Schedule, StreamSpec, TrialOutcome, Workload, detect
from dynaflow.runtime.measure import measure
from dynaflow.runtime.graph import trace
from dynaflow.tuner.cli import main
from cli_output import error_lines

W = Workload(model="llama-tiny", num_decode=4, context_len=16, prefill_tokens=16, prefill_chunk=8)
FAST = MeasureConfig(warmup=1, repeats=5)


@pytest.fixture(scope="module")
def bench():
    return Bench(W, config=FAST)


def test_ok_measurement_has_consistent_numbers(bench):
    m = bench.measure(Schedule(split_sizes=(3, 3)))
    assert m.outcome is TrialOutcome.OK and m.error_ratio <= 1
    assert len(m.samples_ms) == 5 and m.latency_p10_ms <= m.latency_ms <= m.latency_p90_ms
    assert m.tokens_per_s == pytest.approx(W.num_tokens / m.latency_ms * 1e3)
    assert m.bound_ms == pytest.approx(1e3 * max(m.flops / bench.peaks.flops_per_s, m.bytes / bench.peaks.bytes_per_s))
    assert m.efficiency == pytest.approx(m.bound_ms / m.latency_ms) and 0 < m.efficiency < 1
    assert m.peak_bytes > 0
    assert json.loads(json.dumps(m.to_dict()))["outcome"] == "ok"


def test_roofline_counts_match_the_model(bench):
    weights = sum(p.numel() for p in bench.case.model.parameters() if p.dim() == 2)
    assert bench.flops >= 2 * weights * W.num_tokens  # every token through every weight matrix
    assert bench.bytes >= 4 * weights  # every weight read at least once (fp32)


def test_invalid_schedule_is_a_result(bench):
    m = bench.measure(Schedule(split_sizes=(1, 1)))
    assert m.outcome is TrialOutcome.INVALID and "split_sizes must sum" in m.message


def test_sm_share_over_the_cores_is_invalid(bench):
    too_many = bench.hardware.num_sms + 1
    m = bench.measure(Schedule(streams=(StreamSpec(sm_share=too_many),)))
    assert m.outcome is TrialOutcome.INVALID and "sm_share" in m.message


def test_crashing_model_is_a_result():
    class Boom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return x + self.lin(x)

    from dynaflow.runtime import BatchLayout, Case

    case = Case(model=Boom(), inputs=(torch.randn(4, 4),), layout=BatchLayout.uniform(4, 1))
    bench = Bench(case=case, config=FAST)
    bench.executor.graph.module.submod_1.forward = lambda *a: (_ for _ in ()).throw(RuntimeError("kernel fault"))
    m = bench.measure(Schedule(split_sizes=(2, 2)))
    assert m.outcome is TrialOutcome.CRASHED and "kernel fault" in m.message


def test_measure_function_end_to_end():
    m = measure(W, Schedule(), config=FAST)
    assert m.ok and m.notes == {}


def test_untraceable_model_error_names_the_model():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="Branchy cannot be traced by torch.fx"):
        trace(Branchy())


def test_cpu_fingerprint_is_stable():
    a, b = detect("cpu"), detect("cpu")
    assert a.key == b.key and a.kind == "cpu" and a.num_sms >= 1
    assert a.mismatch(b) == [] and a.drift(b) == []
    other = type(a)(**{**a.to_dict(), "num_sms": a.num_sms + 8, "software": {"torch": "0.1"}})
    assert any("num_sms" in m for m in a.mismatch(other))
    assert any("torch" in d for d in a.drift(other))


def test_cli_measures_a_schedule_file(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(Schedule(split_sizes=(2, 4), label="by-hand").to_json())
    assert main(["measure", "--model", "llama-tiny", "--workload", "d4x16+p16c8", "--schedule", str(path), "--repeats", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["workload"] == W.key and out["measurement"]["outcome"] == "ok"
    assert out["schedule"]["label"] == "by-hand"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["measure", "--workload", "d4"]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "workload 'd4' must look like" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["measure", "--workload", "d4x16", "--schedule", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_a_multi_stream_run_leaves_no_stream_threads_behind():
    """Threads that ran torch ops keep an OpenMP team each, which slows the next (sequential)
    measurement in the process: a runner's stream threads end when it is closed (Bench.measure
    closes every schedule it compiled), and when it is dropped unclosed."""
    import gc
    import threading

    from dynaflow.runtime import Executor, StreamSpec

    def streams() -> int:
        return sum(t.name.startswith("dynaflow-stream") for t in threading.enumerate())

    ex = Executor(Workload(model="llama-tiny", num_decode=6, context_len=8).build())
    three = Schedule(split_sizes=(2, 2, 2), streams=(StreamSpec(), StreamSpec(), StreamSpec()), label="three")
    before = streams()
    compiled = ex.compile(three)
    compiled()
    assert streams() > before
    compiled.close()
    assert streams() == before
    dropped = ex.compile(three)
    dropped()
    del dropped
    gc.collect()
    for _ in range(100):  # the finalizer shuts the pool down without waiting
        if streams() == before:
            break
        threading.Event().wait(0.01)
    assert streams() == before


def test_measure_compares_two_schedules_in_paired_rounds(tmp_path, capsys):
    """`measure --rounds N`: N rounds, order alternating, each one ratio; the result is the
    verdicts' interval over the quiet rounds (or says there were too few)."""
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"schema_version": 1, "split_sizes": [5, 4], "streams": [{}, {}], "label": "two"}))
    args = ["measure", "--model", "llama-tiny", "--workload", "d8x32+p16", "--schedule", str(two), "--store",
            str(tmp_path), "--warmup", "1", "--repeats", "3"]
    assert main(args + ["--rounds", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    rounds = [line for line in out if line.startswith("round")]
    assert len(rounds) == 3 and "baseline first" in rounds[0] and "candidate first" in rounds[1]
    assert [line for line in out if line.startswith("result")][0].startswith(("result    no interval", "result    "))
    assert main(args + ["--rounds", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["comparison"]["rounds"]) == 2 and data["against"]["label"] == "sequential"
    quiet = [r for r in data["comparison"]["rounds"] if r["busy"] is None]
    assert data["rounds"] == len(quiet)
    assert main(args + ["--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == ["dynaflow-tune measure: error: --rounds must be >= 2 (an interval needs two rounds), "
                                "but got 1."]


def test_measure_rounds_on_a_busy_machine_counts_busy_rounds_only_when_asked(tmp_path, capsys, monkeypatch):
    """Every round busy: no interval, and the line says how to get one on purpose; with
    --accept-contention the busy rounds are the evidence and the result says so."""
    from dynaflow.runtime import telemetry

    monkeypatch.setattr(telemetry, "contention", lambda busy: "other processes used 90% of the 2 CPU(s)")
    args = ["measure", "--model", "llama-tiny", "--workload", "d8x32", "--schedule", "", "--store", str(tmp_path),
            "--warmup", "0", "--repeats", "3", "--rounds", "3", "--json"]
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"schema_version": 1, "split_sizes": [4, 4], "label": "two"}))
    args[args.index("--schedule") + 1] = str(two)
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rounds"] == 0 and "(--accept-contention)" in data["result"], data["result"]
    assert main(args + ["--accept-contention"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rounds"] == 3 and "3 busy round(s) counted (--accept-contention)" in data["result"], data["result"]


def test_a_run_faster_than_the_roofline_renews_the_peaks_once():
    """Peaks measured in a slow moment (the host's bandwidth dipped, another process was busy) make
    a bound the run beats: the Bench measures them again, keeps the higher of each, and reports an
    efficiency that is a share of the bound again."""
    import dataclasses

    b = Bench(W, config=FAST)
    low = dataclasses.replace(b.peaks, flops_per_s=b.peaks.flops_per_s / 1e4, bytes_per_s=b.peaks.bytes_per_s / 1e4)
    b.peaks = low
    m = b.measure(Schedule())
    assert m.ok and 0 < m.efficiency <= 1, m.efficiency
    assert b.peaks.bytes_per_s > 100 * low.bytes_per_s and b._renew_peaks is None  # renewed, and only once
