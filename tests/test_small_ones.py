"""Issue 25's small ones, each as a user met it: echoes cut short, duplicate JSON keys refused,
ASCII digits only, one exit status for a broken schedule, readers that create nothing, help and
README that agree with the flags."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dynaflow.runtime import Executor, Schedule, Step, Workload
from dynaflow.tuner.cli import main
from dynaflow.tuner.workloads import parse_workload
from cli_output import error_lines

ROOT = Path(__file__).parent.parent


def test_a_huge_op_name_or_label_is_echoed_cut_short(tmp_path):
    ex = Executor(Workload(model="llama-tiny", num_decode=4, context_len=16).build())
    with pytest.raises(ValueError) as info:
        ex.compile(Schedule(order=(Step(op="x" * 10_000, nano=0, stream=0),)))
    assert len(str(info.value)) < 300 and "which the graph lacks" in str(info.value)
    label = "y" * 50_000_000
    assert len(str(Schedule(label=label))) < 250 and "(50,000,000 characters)" in str(Schedule(label=label))


@pytest.mark.parametrize("what, text, key", [
    ("schedule", '{"label": "a", "label": "b"}', "'label'"),
    ("record", '{"record_schema": 3, "schedule": {}, "schedule": {"split_sizes": [1, 1]}}', "'schedule'"),
    ("shapes", '{"shapes_schema": 1, "model": "a", "model": "b", "shapes": []}', "'model'"),
])
def test_a_key_twice_in_any_json_read_is_one_error_naming_it(tmp_path, what, text, key):
    from dynaflow.runtime.shapes import ShapeLog
    from dynaflow.runtime.store import read_record

    path = tmp_path / f"{what}.json"
    path.write_text(text)
    read = {"schedule": lambda: Schedule.from_json(text), "record": lambda: read_record(path),
            "shapes": lambda: ShapeLog.load(path)}[what]
    with pytest.raises(ValueError, match=f"the key {key} appears twice in one object"):
        read()


@pytest.mark.parametrize("spec", ["d\u0661\u0666x256", "d16x\uff12\uff15\uff16", "p\u0665\u0661\u0662"])
def test_workloads_take_ascii_digits_only(spec):
    with pytest.raises(ValueError, match="must look like"):
        parse_workload(spec, model="llama-tiny", dtype="float32", device="cpu")


@pytest.mark.parametrize("spec, words", [
    ("d16x256p64", "a prefill part after the decode part needs '+' ('d16x256+p64')"),  # not read as d16x256+p64
    ("d0x0", "holds no tokens"),
    ("p0", "holds no tokens"),
])
def test_workloads_that_would_be_misread_or_empty_are_refused(spec, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_workload(spec, model="user_models:paced_block", dtype="float32", device="cpu")
    ok = parse_workload("d16x256+p64", model="llama-tiny", dtype="float32", device="cpu")
    assert (ok.num_decode, ok.context_len, ok.prefill_tokens) == (16, 256, 64)
    assert parse_workload("p512c128", model="llama-tiny", dtype="float32", device="cpu").prefill_chunk == 128


@pytest.mark.parametrize("device", ["cuda:\u0661", "cuda:\uff10"])
def test_devices_take_ascii_digits_only(device):
    with pytest.raises(ValueError, match="device"):
        Workload(model="llama-tiny", num_decode=4, context_len=16, device=device)


def test_a_broken_schedule_exits_2_whichever_stage_finds_it(tmp_path, capsys):
    load_time = tmp_path / "bad_field.json"
    load_time.write_text(json.dumps({"schema_version": 1, "split_sizes": [2, 2], "streams": "one"}))
    plan_time = tmp_path / "bad_op.json"
    plan_time.write_text(json.dumps({"schema_version": 1, "order": [["no_such_op", 0, 0]]}))
    common = ["measure", "--model", "llama-tiny", "--workload", "d4x16", "--repeats", "1", "--warmup", "0",
              "--store", str(tmp_path)]
    assert main([*common, "--schedule", str(load_time)]) == 2
    assert "streams must be a list" in capsys.readouterr().err
    assert main([*common, "--schedule", str(plan_time)]) == 2
    out, err = capsys.readouterr()
    assert error_lines(err) == [err.strip()] and out == ""  # one line on stderr, as a bad field at load time
    assert f"dynaflow-tune measure: error: {plan_time}: order names op 'no_such_op', which the graph lacks" in err


@pytest.mark.parametrize("command", ["studies", "report"])
def test_commands_that_read_never_create_a_storage(tmp_path, command, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [command, "--storage", "sqlite:///nowhere/studies.db"] + (["--out", "out"] if command == "report" else [])
    assert main(args) == 2
    assert "names no storage: nowhere/studies.db does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_model_help_and_errors_name_the_hf_form(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    assert "hf:<arch>" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(ValueError, match=r"a Hugging Face architecture 'hf:<arch>\[:<preset>\[:<layers>\]\]'"):
        Workload(model="nonsense", num_decode=4, context_len=16)


@pytest.mark.parametrize("command", ["ops", "measure"])
def test_help_of_commands_without_shapes_does_not_mention_it(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--shapes" not in capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")
                                          if '__name__ == "__main__"' in p.read_text()))
def test_every_benchmark_answers_help_without_running(script):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-500:]


def test_the_readme_installs_what_it_runs():
    text = (ROOT / "README.md").read_text()
    for line in text.splitlines():
        if "jupyter lab" in line:
            assert "pip install jupyterlab" in line, line


def test_setup_refuses_an_unknown_option_before_installing_anything(tmp_path):
    import os
    calls = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    fake.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(["sh", str(root / "scripts" / "setup.sh"), "--dev", "--bogus"], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(fake)}, cwd=root)
    assert run.returncode == 2 and "unknown option --bogus (known: --dev, --vllm)" in run.stderr
    assert not calls.exists()  # the Python was never asked to do anything


def test_what_the_tool_writes_by_default_stays_out_of_git():
    root = Path(__file__).parent.parent
    if subprocess.run(["git", "-C", str(root), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    written = ["results/studies.db", "results/studies.db-journal", "results/peaks/cpu.json",
               "results/schedules/cpu-x/llama-small_d16x256_p64_fp32.json", "results/schedules/cpu-x.pack.json",
               "results/shapes/serve.json", "results/report/report.md", "results/report/history.png"]
    ignored = subprocess.run(["git", "-C", str(root), "check-ignore", *written], capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == sorted(written)
    kept = subprocess.run(["git", "-C", str(root), "check-ignore", "results/benchmarks/x.txt", "results/gpu/x.txt"],
                          capture_output=True, text=True)
    assert kept.stdout == ""  # committed results are not ignored


@pytest.mark.parametrize("command", ["ops", "measure", "tune"])
def test_an_hf_model_without_transformers_names_the_install_command(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    args = [command, "--model", "hf:llama", "--workload", "d16x256", "--store", str(tmp_path)]
    if command == "tune":
        args += ["--trials", "1", "--no-progress", "--storage", f"sqlite:///{tmp_path}/s.db"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [err.strip()] and "Traceback" not in err
    assert "needs transformers, which is not installed: pip install \"dynaflow-tune[hf]\"" in err


@pytest.mark.parametrize("doc", ["README.md", "docs/tuning.md"])
def test_the_flag_tables_and_the_parser_agree(doc):
    """Every flag the README's table (and the one in docs/tuning.md) names exists in the parser,
    and every flag of `tune` is in each table (or in --help only, listed here with why)."""
    from dynaflow.tuner.commands import build_parser

    text = (ROOT / doc).read_text()
    table = text[text.index("| flag | meaning (default) |"):]
    table = table[:table.index("\n\n")]
    named = set(re.findall(r"`(--[a-z-]+)", table))
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    known = {opt for sub in subs.values() for a in sub._actions for opt in a.option_strings if opt.startswith("--")}
    assert named - known == set(), named - known
    tune = {opt for a in subs["tune"]._actions for opt in a.option_strings if opt.startswith("--")}
    help_only = {"--help"}
    assert tune - named - help_only == set(), tune - named - help_only


def test_qmc_is_not_offered_for_define_by_run_spaces(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tune", "--sampler", "qmc", "--trials", "1"])
    assert e.value.code == 2 and "argument --sampler: invalid choice: 'qmc' (choose from" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["ops", "measure"])
def test_a_store_that_is_a_file_is_one_line_before_anything_is_measured(command, tmp_path, capsys):
    store = tmp_path / "a_file"
    store.write_text("")
    assert main([command, "--model", "llama-tiny", "--workload", "d4x16", "--store", str(store)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and error_lines(err) == [err.strip()]
    assert f"--store {store} is a file, not a folder" in err and "cache" not in err
