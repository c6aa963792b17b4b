"""Trial tables and figures for a study, shared by the notebook and `dynaflow-tune report`."""
from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: works without a display
import matplotlib.patches  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402

from dynaflow.runtime import Schedule, Workload  # noqa: E402
from dynaflow.runtime.timeline import Timeline  # noqa: E402

from .confirm import verdict_text  # noqa: E402,F401  (the notebook's verdict in words)
from .storage import open_storage  # noqa: E402
from .study import BASELINE, RESULT, counts_toward_budget, result_of  # noqa: E402

COLOURS = {"compute": "tab:blue", "memory": "tab:orange", "copy": "tab:green", "network": "tab:purple"}
MARKERS = {"PRUNED": ("v", "tab:orange", "pruned (last sample)"), "FAIL": ("x", "tab:red", "failed")}


def studies_table(storage: str) -> pd.DataFrame:
    """One row per study in the storage, newest first: name, trials, distinct schedules, verdict."""
    opened = open_storage(storage, create=False)
    rows = []
    for summary in optuna.get_all_study_summaries(opened, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=opened)
        trials = study.get_trials(deepcopy=False)
        last = max((t.datetime_complete or t.datetime_start for t in trials if t.datetime_start), default=None)
        confirmation = study.user_attrs.get("confirmation") or {}
        rows.append({"study": summary.study_name, "trials": len(trials),
                     "distinct": sum(1 for t in trials if counts_toward_budget(t) and t.state.is_finished()),
                     "verdict": confirmation.get("verdict", "not confirmed"),
                     "confirmed_speedup": confirmation.get("speedup") if confirmation.get("verdict") == "winner" else None,
                     "contended": bool(confirmation.get("contended")), "last_trial": last})
    df = pd.DataFrame(rows, columns=["study", "trials", "distinct", "verdict", "confirmed_speedup", "contended",
                                     "last_trial"])
    return df.sort_values("last_trial", ascending=False, na_position="last").reset_index(drop=True)


def load_study(storage: str, study_name: str | None = None) -> optuna.Study:
    """The named study, or the newest one (last trial) when none is named."""
    opened = open_storage(storage, create=False)  # one storage (one engine for SQLite) for the lookup and the load
    names = optuna.get_all_study_names(opened)
    if not names:
        raise ValueError(f"no study in {storage}.")
    if study_name is None:
        study_name = names[0] if len(names) == 1 else studies_table(storage).study.iloc[0]
    if study_name not in names:
        raise ValueError(f"no study {study_name!r} in {storage}; it holds: {names}")
    return optuna.load_study(study_name=study_name, storage=opened)


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, tokens/s, params_*, the trial record's fields, and the
    speedup over the baseline (a pruned trial's from its last sample)."""
    trials = study.get_trials(deepcopy=False)
    df = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"))
    if df.empty:
        return pd.DataFrame({"number": pd.Series(dtype=int), "state": pd.Series(dtype=str),
                             "tokens_per_s": pd.Series(dtype=float), "outcome": pd.Series(dtype=str),
                             "baseline": pd.Series(dtype=bool), "duplicate": pd.Series(dtype=bool),
                             "speedup": pd.Series(dtype=float), "label": pd.Series(dtype=str)})
    records = pd.json_normalize([result_of(t) for t in trials]).drop(columns=["samples_ms"], errors="ignore")
    df = pd.concat([df.drop(columns=[c for c in df if c.startswith("user_attrs_")]), records], axis=1)
    df["baseline"] = [bool(t.user_attrs.get(BASELINE)) for t in trials]
    df["duplicate"] = [bool(result_of(t).get("duplicate")) for t in trials]
    df = df.rename(columns={"value": "tokens_per_s"})
    df["last_sample_tokens_per_s"] = [t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values
                                      else None for t in trials]
    df["baseline_tokens_per_s"] = _baseline_of_each(trials)
    df["speedup"] = df.tokens_per_s / df.baseline_tokens_per_s
    return df


def _baseline_of_each(trials: list[optuna.trial.FrozenTrial]) -> list[float]:
    """Each trial's baseline: the one measured in its own run (its record names it), else the
    latest measured before it (studies from before runs named theirs); a baseline is its own."""
    values = {t.number: t.value for t in trials if t.user_attrs.get(BASELINE) and t.value}
    out, latest = [], None
    for t in trials:
        if t.number in values:
            latest = values[t.number]
        named = result_of(t).get("baseline_trial")
        out.append(values.get(named, latest) if named is not None else latest)
    return [float("nan") if v is None else v for v in out]


def best_search_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The fastest completed search trial (the baseline and duplicates left out)."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and t.user_attrs.get(RESULT) and not t.user_attrs.get(BASELINE) and not result_of(t).get("duplicate")]
    return max(done, key=lambda t: t.value, default=None)


def say(ax, text: str) -> None:
    """A sentence in place of a figure that has nothing to show."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10, transform=ax.transAxes)


def plot_history(study: optuna.Study, df: pd.DataFrame, ax) -> None:
    """Every search trial's speedup over the baseline measured in its own run (warmed before the
    run's first trial): completed (dots, with the best so far), pruned (at their last sample)
    and failed (at the bottom), each marked; the confirmed speedup, when there is one, as a line."""
    search = df[~df.baseline] if len(df) else df
    base = df.loc[df.baseline, "tokens_per_s"] if len(df) else []
    if not len(search) or not len(base):
        say(ax, "no search trials yet" if len(base) else "no baseline measured yet: nothing to compare")
        return
    ok = search[search.state == "COMPLETE"]
    ax.scatter(ok.number, ok.speedup, s=14, label="completed")
    if len(ok):
        ax.plot(ok.number, ok.speedup.cummax(), color="black", linewidth=1, label="best so far (unconfirmed)")
    low = min([1.0, *ok.speedup.dropna()]) * 0.95
    for state, (marker, colour, label) in MARKERS.items():
        rows = search[search.state == state]
        if len(rows):
            y = rows.last_sample_tokens_per_s / rows.baseline_tokens_per_s if state == "PRUNED" else [low] * len(rows)
            ax.scatter(rows.number, y, marker=marker, color=colour, s=22, label=label)
    ax.axhline(1.0, color="red", linestyle="--", label="sequential baseline (each run's own)")
    confirmed = study.user_attrs.get("confirmation") or {}
    if confirmed.get("verdict") == "winner":
        ax.axhline(confirmed["speedup"], color="green", linestyle=":", label=f"confirmed {confirmed['speedup']:.3f}x")
    ax.set(xlabel="trial", ylabel="speedup over its run's baseline", title="optimization history")
    ax.legend(loc="best", fontsize=7)


def plot_outcomes(df: pd.DataFrame, ax) -> None:
    search = df[~df.baseline] if len(df) else df
    if not len(search):
        say(ax, "no search trials yet")
        return
    counts = search["outcome"].value_counts()
    ax.bar(counts.index, counts.values, color=["tab:green" if o == "ok" else "tab:red" for o in counts.index])
    ax.set(ylabel="trials", title="trial outcomes")


def plot_importances(study: optuna.Study, ax) -> str | None:
    """Parameter importances (Optuna's default evaluator); returns why not, when it cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as e:
        say(ax, f"no parameter importances: {e}")
        return f"no importances: {e}"
    if not imp:
        say(ax, "no parameter importances: no completed trial with parameters")
        return "no importances: no completed trial with parameters"
    ax.barh(list(imp)[::-1], list(imp.values())[::-1])
    ax.set(xlabel="importance", title="parameter importances")
    return None


def pareto_note(study: optuna.Study) -> str | None:
    """Why there is no Pareto figure (one objective), or None when there is a front to plot."""
    if len(study.directions) < 2:
        return "one objective (tokens/s) was searched: no Pareto front to plot"
    return None


def plot_winner_spread(study: optuna.Study, ax) -> None:
    """The confirmation's pooled samples: the baseline's beside the best candidate's, the same
    samples the verdict was computed from."""
    v = study.user_attrs.get("confirmation") or {}
    base, best = v.get("baseline_samples_ms") or [], v.get("best_samples_ms") or []
    if not base:
        say(ax, "no confirmation yet: the spread is drawn from the confirmation rounds")
        return
    if not best:
        say(ax, "no candidate reached the confirmation (every trial was pruned or failed)")
        return
    ax.boxplot([base, best], tick_labels=["sequential", f"trial {v.get('best_trial')}"])
    ax.set(ylabel="latency (ms)", title=f"confirmation: {v.get('verdict', '').replace('_', ' ')}")


def plot_buckets(records: pd.DataFrame, ax) -> None:
    """Speedup over sequential and roofline efficiency per stored workload bucket."""
    if records.empty:
        say(ax, "no stored winner in the store yet")
        return
    x = range(len(records))
    ax.bar([i - 0.2 for i in x], records.speedup, width=0.4, label="speedup")
    ax.bar([i + 0.2 for i in x], records.efficiency.fillna(0), width=0.4, label="roofline efficiency")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), records.workload, rotation=20, ha="right", fontsize=7)
    ax.set(title="per workload bucket")
    ax.legend(fontsize=8)


def plot_timelines(timelines: list[Timeline], axes, *, caption: str | None = None) -> None:
    """Gantt charts, one per schedule, on a shared time axis: where the overlap is; `caption`
    (report.timeline_ratio) says how their ratio compares with the stored verdict."""
    end = max(t.makespan_ms for t in timelines)
    for tl, ax in zip(timelines, axes):
        for s in tl.spans:
            ax.broken_barh([(s.start_ms, s.end_ms - s.start_ms)], (s.stream - 0.4, 0.8),
                           facecolors=COLOURS.get(s.resource, "grey"), edgecolor="white", linewidth=0.3)
            if s.end_ms - s.start_ms > end * 0.03:  # a label where it fits
                ax.text((s.start_ms + s.end_ms) / 2, s.stream, f"{s.op}/{s.nano}", ha="center", va="center",
                        fontsize=5, rotation=90 if s.end_ms - s.start_ms < end * 0.08 else 0)
        ax.set(xlim=(0, end * 1.02), yticks=sorted({s.stream for s in tl.spans}), ylabel="stream",
               title=f"{tl.label}: {tl.makespan_ms:.2f} ms")
    axes[-1].set_xlabel("ms")
    if caption:
        import textwrap

        axes[0].figure.suptitle(textwrap.fill(caption, 130), fontsize=7)
    handles = [matplotlib.patches.Patch(color=c, label=r) for r, c in COLOURS.items()]
    axes[0].legend(handles=handles, fontsize=7, loc="upper right")


def study_workload(study: optuna.Study) -> tuple[str, str]:
    """(hardware key, workload key) from a study name `<hardware>/<workload>/<space>`."""
    hardware, workload, _ = study.study_name.split("/")
    return hardware, workload


def best_schedule(study: optuna.Study) -> Schedule:
    """The confirmed winner's schedule, else the fastest search trial's (unconfirmed)."""
    winner = (study.user_attrs.get("confirmation") or {}).get("winner_trial")
    if winner is not None:
        return Schedule.from_json(result_of(study.get_trials(deepcopy=False)[winner])["schedule"])
    best = best_search_trial(study)
    return Schedule() if best is None else Schedule.from_json(best.user_attrs[RESULT]["schedule"])


def workload_from_record(store_root: Path, hardware: str, workload: str) -> Workload | None:
    from dynaflow.runtime.store import ScheduleStore, StoreConfig

    store = ScheduleStore(StoreConfig(root=Path(store_root)))
    path = store.path(hardware, workload)
    if not path.exists():
        return None
    return store.read(path).workload  # validated like every record the product reads
