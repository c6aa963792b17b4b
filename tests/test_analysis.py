"""The analysis notebook runs top to bottom on a study made here; the report writes real PNGs;
timelines record where each op ran and export to the Chrome trace format."""
import json
from pathlib import Path

import optuna
import pytest

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
    nbformat = pytest.importorskip("nbformat")  # the dev extra has them; the lent GPU machine does not
    NotebookClient = pytest.importorskip("nbclient").NotebookClient
    storage, root = tuned
    monkeypatch.setenv("DYNAFLOW_STORAGE", storage)
    monkeypatch.setenv("DYNAFLOW_STORE", str(root))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # history, importances, outcomes, spread, buckets, timelines
    assert (root / "report" / "trace_best.json").exists()  # beside the report's, not in the notebook's folder
    assert not (tmp_path / "trace_best.json").exists()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "timelines: sequential" in text and "98% interval" in text  # the timelines' speedup, by the estimator
    confirmation = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage) \
        .user_attrs["confirmation"]
    if confirmation["best"] is not None:  # else no candidate had a quiet round (a busy machine)
        assert "the confirmation measured it at" in text  # beside the confirmation's figure for the same schedule
    assert "machine    " in text  # each stored record of the study, with how busy the machine was


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
    assert "- sequential: " in md and "tokens/s" in md and "![history](history.png)" in md
    verdict = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage) \
        .user_attrs["confirmation"]
    assert f"- confirmation: {verdict_text(verdict)}" in md and "{" not in md  # the verdict in words, not a dict


def test_the_verdict_reads_in_words():
    from dynaflow.tuner.confirm import Candidate, judge
    from dynaflow.tuner.paired import Comparison, Decision, Plan, Round

    assert verdict_text(None) == "not run yet"
    plan = Plan(candidates=1)

    def confirmation(ratios, decision):
        c = Comparison(rounds=tuple(Round(baseline_ms=10.0, candidate_ms=10.0 / r) for r in ratios), decision=decision)
        return judge((Candidate(trial=4, schedule=Schedule(split_sizes=(1, 1)), comparison=c, interval=plan.final(c)),),
                     plan)

    slower = confirmation([0.96, 0.97, 0.98, 0.97, 0.96], Decision.EXCLUDED)
    assert verdict_text(slower) == ("sequential is best: no candidate can be faster by 3% or more (best candidate "
                                    "0.968x, 99.3% interval 0.95-0.99x over 5 paired rounds)")
    assert verdict_text(slower.to_dict()) == verdict_text(slower)  # as the study keeps it
    faster = confirmation([1.3, 1.32, 1.31, 1.29, 1.3], Decision.FASTER)
    assert verdict_text(faster) == "1.304x over sequential, confirmed (99.3% interval 1.28-1.33x over 5 paired " \
                                   "rounds; trial 4)"
    said = verdict_text(confirmation([0.9, 1.2, 1.0, 1.1, 0.95], Decision.UNDECIDED))
    assert said.startswith("inconclusive: trial 4 (1.024x, 99.3% interval 0.78-1.34x over 5 paired rounds) could be "
                           "3% faster or not")
    assert "--confirm-rounds 24" in said and "quieter machine" in said  # what to do
    old = {"verdict": "winner", "speedup": 1.31, "low": 1.2, "high": 1.4, "winner_trial": 7}  # before paired rounds
    assert verdict_text(old).startswith("winner (confirmed by an older dynaflow-tune from pooled samples")


def test_an_empty_study_draws_sentences_not_empty_axes(tmp_path):
    """A study with no trial at all: every figure says why it is empty; no Pareto figure is drawn."""
    storage = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(storage=storage, study_name="hw/w/nanoflow")
    assert main(["report", "--storage", storage, "--store", str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    pngs = {p.name for p in (tmp_path / "r").glob("*.png")}
    assert "pareto.png" not in pngs and "history.png" in pngs
    md = (tmp_path / "r" / "report.md").read_text()
    assert "no Pareto front" in md and "confirmation: not run yet" in md


def test_several_studies_are_listed_and_the_newest_opens(tuned, capsys):
    storage, _ = tuned
    newer = optuna.create_study(storage=storage, study_name="other/w/dbo")
    newer.add_trial(optuna.trial.create_trial(value=1.0))
    from dynaflow.tuner import analysis

    table = analysis.studies_table(storage)
    assert list(table.study) == ["other/w/dbo", optuna.get_all_study_names(storage)[0]]
    assert analysis.load_study(storage).study_name == "other/w/dbo"
    assert main(["studies", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert "other/w/dbo" in out and "nanoflow" in out and "verdict" in out
    optuna.delete_study(study_name="other/w/dbo", storage=storage)


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


def test_timeline_labels_stay_inside_their_bars_with_four_streams():
    """Each label fits its bar (clipped, never rotated across the rows of other streams)."""
    import matplotlib.pyplot as plt

    from dynaflow.runtime.timeline import Span, Timeline
    from dynaflow.tuner.analysis import plot_timelines

    spans = tuple(Span(op=f"gate_up_proj_{k}", nano=s, stream=s, start_ms=k * 1.0 + s * 0.3,
                       end_ms=k * 1.0 + s * 0.3 + (0.9 if k % 2 else 0.4)) for s in range(4) for k in range(6))
    fig, axes = plt.subplots(2, 1, figsize=(9, 7), squeeze=False)
    seq = Timeline(label="sequential", spans=tuple(Span(op="all", nano=0, stream=0, start_ms=0.0, end_ms=7.0)
                                                   for _ in range(1)))
    plot_timelines([seq, Timeline(label="4 streams", spans=spans)], [a[0] for a in axes])
    fig.canvas.draw()
    ax = axes[1][0]
    renderer = fig.canvas.get_renderer()
    assert ax.texts  # the long bars are labelled
    for text in ax.texts:
        box = text.get_window_extent(renderer)
        x, y = text.get_position()
        [span] = [s for s in spans if s.stream == round(y) and s.start_ms <= x <= s.end_ms]
        (x0, y0), (x1, y1) = ax.transData.transform([(span.start_ms, y - 0.4), (span.end_ms, y + 0.4)])
        assert text.get_rotation() == 0 and x0 - 1 <= box.x0 and box.x1 <= x1 + 1 and y0 <= box.y0 and box.y1 <= y1
    plt.close(fig)


# ---- issue 47, point 2: the figures and the text of one study agree
def test_the_reports_figures_and_text_count_the_same_trials(tmp_path):
    """One study with completed, pruned, failed and duplicate trials (a fake target): the history's
    legend, the outcomes' bars, report.md and `studies` count each kind alike, and duplicates (kept
    in Optuna's FAIL state) are never drawn or counted as failures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dynaflow.runtime import TrialOutcome
    from dynaflow.tuner import analysis
    from dynaflow.tuner.config import TuneConfig
    from dynaflow.tuner.report import write_report
    from dynaflow.tuner.tune import tune
    from fakes import FakeTarget, tiny_context

    w = Workload(model="llama-tiny", num_decode=32, context_len=16, prefill_tokens=32, prefill_chunk=16)
    failures = {4: TrialOutcome.INCORRECT, 9: TrialOutcome.CRASHED, 14: TrialOutcome.INCORRECT}
    target = FakeTarget(tiny_context(), lambda s: 10.0 if s.is_sequential else 9.0 + 0.1 * len(s.order) % 3,
                        failures=failures, fail_candidates=True)
    storage = f"sqlite:///{tmp_path}/s.db"
    cfg = TuneConfig(workloads=(w,), space="dbo", trials=30, storage=storage, store_root=tmp_path, progress=False,
                     seed=0, confirm_rounds=5, prune=False)
    tune(cfg, make_target=lambda _: target, log=lambda *a: None)
    study = analysis.load_study(storage)
    df = analysis.trials_table(study)
    counts = analysis.trial_counts(df)
    assert counts["baseline"] == 1 and counts["incorrect"] == 2 and counts["crashed"] == 1 and counts["duplicate"] > 0
    assert sum(counts.values()) == len(study.trials)

    fig, (h, o) = plt.subplots(1, 2)
    analysis.plot_history(study, df, h)
    analysis.plot_outcomes(df, o)
    bars = {t.get_text(): p.get_height() for t, p in zip(o.get_xticklabels(), o.patches)}
    assert bars == {k: v for k, v in counts.items() if k != "baseline"}
    labels = [t.get_text() for t in h.get_legend().get_texts()]
    assert f"ok ({counts['ok']})" in labels
    assert f"failed (incorrect {counts['incorrect']}, crashed {counts['crashed']})" in labels
    assert f"({counts['duplicate']} duplicates answered from the study, not drawn)" in h.get_title()
    drawn = sum(len(c.get_offsets()) for c in h.collections)
    assert drawn == len(study.trials) - counts["baseline"] - counts["duplicate"] - counts.get("skipped", 0)
    plt.close(fig)

    md = write_report(storage, tmp_path / "r", store_root=tmp_path, timelines=False).read_text()
    outcomes = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("baseline", "duplicate", "skipped"))
    assert (f"- trials: {len(study.trials)} in the study: 1 baseline(s), "
            f"{len(study.trials) - 1 - counts['duplicate'] - counts.get('skipped', 0)} distinct schedules measured "
            f"({outcomes}), {counts['duplicate']} duplicates") in md
    assert analysis.studies_table(storage).iloc[0].trials == len(study.trials)


def test_the_spread_figure_keeps_its_axis_on_the_rounds():
    """A candidate with two quiet rounds has an interval of 3e-9 to 8e6: the axis stays on the rounds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dynaflow.tuner import analysis

    rounds = [{"baseline_ms": 10.0, "candidate_ms": 10.0 / r} for r in (0.5, 2.0)]
    study = optuna.create_study()
    study.set_user_attr("confirmation", {"verdict": "inconclusive", "min_effect": 0.03, "candidates": [
        {"trial": 3, "speedup": 1.0, "low": 3.2e-9, "high": 8_343_806.0, "rounds": 2, "comparison": {"rounds": rounds}}]})
    fig, ax = plt.subplots()
    analysis.plot_winner_spread(study, ax)
    low, high = ax.get_ylim()
    assert 0 < low < 0.5 and 2.0 < high < 3.0
    plt.close(fig)
