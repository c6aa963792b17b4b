"""Trial tables and figures for a study, shared by the notebook and `dynaflow-tune report`."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: works without a display
import matplotlib.patches  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402

from dynaflow.runtime import Schedule, Workload  # noqa: E402
from dynaflow.runtime.timeline import Timeline  # noqa: E402

from .study import BASELINE, RESULT, make_storage  # noqa: E402

COLOURS = {"compute": "tab:blue", "memory": "tab:orange", "copy": "tab:green"}


def load_study(storage: str, study_name: str | None = None) -> optuna.Study:
    opened = make_storage(storage)  # one storage (one engine for SQLite) for the lookup and the load
    names = optuna.get_all_study_names(opened)
    if not names:
        raise ValueError(f"no study in {storage}.")
    if study_name is None:
        if len(names) > 1:
            raise ValueError(f"{storage} holds {len(names)} studies; name one of: {names}")
        study_name = names[0]
    if study_name not in names:
        raise ValueError(f"no study {study_name!r} in {storage}; it holds: {names}")
    return optuna.load_study(study_name=study_name, storage=opened)


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, tokens/s, params_*, and the trial record's fields."""
    df = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"))
    records = pd.json_normalize([t.user_attrs.get(RESULT, {}) for t in study.trials]).drop(
        columns=["samples_ms"], errors="ignore")
    df = pd.concat([df.drop(columns=[c for c in df if c.startswith("user_attrs_")]), records], axis=1)
    df["baseline"] = [bool(t.user_attrs.get(BASELINE)) for t in study.trials]
    df = df.rename(columns={"value": "tokens_per_s"})
    base = df.loc[df.baseline, "tokens_per_s"]
    df["speedup"] = df.tokens_per_s / base.iloc[0] if len(base) else float("nan")
    return df


def best_search_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The fastest completed search trial (the baseline left out); the first of equals, so a
    re-proposed duplicate never stands in for the trial that was timed."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and t.user_attrs.get(RESULT) and not t.user_attrs.get(BASELINE)]
    return max(done, key=lambda t: t.value, default=None)


def winner_samples(study: optuna.Study) -> tuple[list[float], list[float]]:
    """Latency samples of the best search trial (none: empty) and of the baseline."""
    best = best_search_trial(study)
    base = next((t for t in study.trials if t.user_attrs.get(BASELINE)), None)
    samples = [] if best is None else best.user_attrs[RESULT].get("samples_ms", [])
    return samples, [] if base is None else base.user_attrs[RESULT].get("samples_ms", [])


def verdict_text(v: dict | None) -> str:
    """The interleaved re-measurement's answer (a study's "confirmation" attribute), in words."""
    if not v:
        return "not run yet"
    if v["sequential_best"]:
        return (f"sequential is best: no candidate beat the baseline by more than the noise "
                f"(best candidate {v['speedup']:.3f}x, noise {v['noise']:.1%})")
    return f"trial {v['winner_trial']} stored: {v['speedup']:.3f}x over the baseline (noise {v['noise']:.1%})"


def plot_history(study: optuna.Study, df: pd.DataFrame, ax) -> None:
    ok = df[df.state == "COMPLETE"]
    ax.scatter(ok.number, ok.tokens_per_s, s=12, label="trial")
    ax.plot(ok.number, ok.tokens_per_s.cummax(), color="black", label="best so far")
    base = df.loc[df.baseline, "tokens_per_s"]
    if len(base):
        ax.axhline(base.iloc[0], color="red", linestyle="--", label="sequential baseline")
    ax.set(xlabel="trial", ylabel="tokens/s", title="optimization history")
    ax.legend(loc="lower right", fontsize=8)


def plot_outcomes(df: pd.DataFrame, ax) -> None:
    counts = df[~df.baseline]["outcome"].value_counts()
    ax.bar(counts.index, counts.values, color=["tab:green" if o == "ok" else "tab:red" for o in counts.index])
    ax.set(ylabel="trials", title="trial outcomes")


def plot_importances(study: optuna.Study, ax) -> str | None:
    """Parameter importances (Optuna's default evaluator); returns why not, when it cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as e:
        ax.set_axis_off()
        return f"no importances: {e}"
    ax.barh(list(imp)[::-1], list(imp.values())[::-1])
    ax.set(xlabel="importance", title="parameter importances")
    return None


def plot_pareto(study: optuna.Study, ax) -> str | None:
    if len(study.directions) < 2:
        ax.set_axis_off()
        return "one objective (tokens/s) was searched: no Pareto front"
    optuna.visualization.matplotlib.plot_pareto_front(study)
    return None


def plot_winner_spread(study: optuna.Study, ax) -> None:
    best, base = winner_samples(study)
    ax.boxplot([base, best], tick_labels=["sequential", "best trial"])
    ax.set(ylabel="latency (ms)", title="repeated measurements")


def plot_buckets(records: pd.DataFrame, ax) -> None:
    """Speedup over sequential and roofline efficiency per stored workload bucket."""
    if records.empty:
        ax.set_axis_off()
        return
    x = range(len(records))
    ax.bar([i - 0.2 for i in x], records.speedup, width=0.4, label="speedup")
    ax.bar([i + 0.2 for i in x], records.efficiency.fillna(0), width=0.4, label="roofline efficiency")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), records.workload, rotation=20, ha="right", fontsize=7)
    ax.set(title="per workload bucket")
    ax.legend(fontsize=8)


def plot_timelines(timelines: list[Timeline], axes) -> None:
    """Gantt charts, one per schedule, on a shared time axis: where the overlap is."""
    end = max(t.makespan_ms for t in timelines)
    for tl, ax in zip(timelines, axes):
        for s in tl.spans:
            ax.broken_barh([(s.start_ms, s.end_ms - s.start_ms)], (s.stream - 0.4, 0.8),
                           facecolors=COLOURS.get(s.resource, "grey"), edgecolor="white", linewidth=0.3)
        ax.set(xlim=(0, end * 1.02), yticks=sorted({s.stream for s in tl.spans}), ylabel="stream",
               title=f"{tl.label}: {tl.makespan_ms:.2f} ms")
    axes[-1].set_xlabel("ms")
    handles = [matplotlib.patches.Patch(color=c, label=r) for r, c in COLOURS.items()]
    axes[0].legend(handles=handles, fontsize=7, loc="upper right")


def study_workload(study: optuna.Study) -> tuple[str, str]:
    """(hardware key, workload key) from a study name `<hardware>/<workload>/<space>`."""
    hardware, workload, _ = study.study_name.split("/")
    return hardware, workload


def best_schedule(study: optuna.Study) -> Schedule:
    best = best_search_trial(study)
    return Schedule() if best is None else Schedule.from_json(best.user_attrs[RESULT]["schedule"])


def workload_from_record(store_root: Path, hardware: str, workload: str) -> Workload | None:
    path = Path(store_root) / "schedules" / hardware / f"{workload}.json"
    if not path.exists():
        return None
    return Workload(**json.loads(path.read_text())["workload"])
