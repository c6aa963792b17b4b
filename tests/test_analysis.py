"""The analysis notebook runs top to bottom on a study made here; the report writes real PNGs;
timelines record where each op ran and export to the Chrome trace format."""
import json
from pathlib import Path

import nbformat
import optuna
import pytest
from nbclient import NotebookClient

from dynaflow.runtime import Executor, Schedule, StreamSpec, Step, Workload
from dynaflow.runtime.timeline import record_timeline
from dynaflow.tuner.cli import main
from dynaflow.tuner.analysis import verdict_text

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "analyze_trials.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    storage = f"sqlite:///{root}/s.db"
    args = ["tune", "--model", "llama-tiny", "--workload", "d8x32+p16", "--space", "nanoflow", "--trials", "8",
            "--repeats", "4", "--no-prune", "--no-progress", "--storage", storage, "--store", str(root)]
    assert main(args) == 0
    return storage, root


def test_notebook_runs_top_to_bottom(tuned, tmp_path, monkeypatch):
    storage, root = tuned
    monkeypatch.setenv("DYNAFLOW_STORAGE", storage)
    monkeypatch.setenv("DYNAFLOW_STORE", str(root))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # history, importances, outcomes, spread, buckets, timelines
    assert (tmp_path / "trace_best.json").exists()


def test_report_writes_decodable_pngs(tuned, tmp_path):
    storage, root = tuned
    assert main(["report", "--storage", storage, "--store", str(root), "--out", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert {"history.png", "outcomes.png", "spread.png", "buckets.png", "timelines.png"} <= set(pngs)
    import matplotlib.image

    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(p).shape[0] > 100  # decodes to a real image
    md = (tmp_path / "report.md").read_text()
    assert "sequential baseline" in md and "![history](history.png)" in md
    verdict = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage) \
        .user_attrs["confirmation"]
    said = "- confirmation: sequential is best" if verdict["sequential_best"] else \
        f"- confirmation: trial {verdict['winner_trial']} stored"
    assert said in md and "{" not in md  # the verdict in words, not a dict


def test_the_verdict_reads_in_words():
    assert verdict_text(None) == "not run yet"
    assert verdict_text({"sequential_best": True, "speedup": 0.97, "noise": 0.2, "winner_trial": None}) == \
        "sequential is best: no candidate beat the baseline by more than the noise (best candidate 0.970x, noise 20.0%)"
    assert verdict_text({"sequential_best": False, "speedup": 1.31, "noise": 0.04, "winner_trial": 7}) == \
        "trial 7 stored: 1.310x over the baseline (noise 4.0%)"


def test_report_on_a_missing_study_names_it(tuned, capsys):
    storage, _ = tuned
    assert main(["report", "--storage", storage, "--study", "nope"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_timeline_records_every_step_on_its_stream(tmp_path):
    ex = Executor(Workload(model="llama-tiny", num_decode=6, context_len=16, prefill_tokens=16, prefill_chunk=8).build())
    order = tuple(Step(op=o, nano=b, stream=b) for o in ex.graph.names for b in (0, 1))
    compiled = ex.compile(Schedule(split_sizes=(4, 4), streams=(StreamSpec(), StreamSpec()), order=order, label="2x2"))
    tl = record_timeline(compiled)
    assert {(s.op, s.nano, s.stream) for s in tl.spans} == {(s.op, s.nano, s.stream) for s in order}
    assert all(0 <= s.start_ms <= s.end_ms <= tl.makespan_ms for s in tl.spans)
    trace = tl.to_chrome_trace(tmp_path / "t.json")
    loaded = json.loads((tmp_path / "t.json").read_text())
    assert loaded == trace and len([e for e in loaded["traceEvents"] if e["ph"] == "X"]) == len(order)
    with pytest.raises(ValueError, match="compile it with cuda_graph=False"):
        record_timeline(ex.compile(Schedule(cuda_graph=True)))
