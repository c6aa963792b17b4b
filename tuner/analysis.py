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
from .guide import MODEL_ERROR, PREDICTED  # noqa: E402
from .study import BASELINE, counts_toward_budget, result_of  # noqa: E402

COLOURS = {"compute": "tab:blue", "memory": "tab:orange", "copy": "tab:green", "network": "tab:purple"}
MIN_TRIALS_FOR_IMPORTANCES = 10  # below this many completed trials with parameters, importances are noise


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
                     "busy_rounds": int(confirmation.get("busy_rounds") or 0),
                     "accepted_contention": bool(confirmation.get("contended")), "last_trial": last})
    # busy_rounds: the confirmation's rounds left out as busy (what made a busy verdict inconclusive);
    # accepted_contention: busy rounds counted on purpose (--accept-contention)
    df = pd.DataFrame(rows, columns=["study", "trials", "distinct", "verdict", "confirmed_speedup", "busy_rounds",
                                     "accepted_contention", "last_trial"])
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
    """One row per trial: number, state, params_*, the trial record's fields, and `speedup`: the
    trial's paired speedup (over the sequential run measured right before it; a pruned trial's
    from its partial samples), the same figure the pruner and the confirmation's choice use."""
    trials = study.get_trials(deepcopy=False)
    df = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"))
    if df.empty:
        return pd.DataFrame({"number": pd.Series(dtype=int), "state": pd.Series(dtype=str),
                             "speedup": pd.Series(dtype=float), "outcome": pd.Series(dtype=str),
                             "baseline": pd.Series(dtype=bool), "duplicate": pd.Series(dtype=bool),
                             "label": pd.Series(dtype=str)})
    records = pd.json_normalize([result_of(t).to_json() for t in trials]).drop(
        columns=["samples_ms", "baseline_samples_ms", "speedup"], errors="ignore")
    df = pd.concat([df.drop(columns=[c for c in df if c.startswith("user_attrs_")] + ["value"]), records], axis=1)
    df["baseline"] = [bool(t.user_attrs.get(BASELINE)) for t in trials]
    df["duplicate"] = [result_of(t).duplicate for t in trials]
    df["speedup"] = [1.0 if t.user_attrs.get(BASELINE) else result_of(t).speedup for t in trials]
    df["speedup"] = df.speedup.astype(float)
    df["predicted"] = pd.Series([t.user_attrs.get(PREDICTED) for t in trials], dtype=float)
    return df


def plot_model(study: optuna.Study, df: pd.DataFrame, ax) -> str | None:
    """The performance model's predicted speedup of each measured search trial against its
    measured paired speedup, with the diagonal where they agree and the run's error in the title;
    why not, where no trial carries a prediction (the model was off)."""
    rows = df[~df.baseline & ~df.duplicate & df.speedup.notna() & df.predicted.notna()] if len(df) else df
    if not len(rows):
        return "model: no trial carries a prediction (tuned with --no-model, or on a target in another process)"
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        part = rows[rows.state == state]
        if len(part):
            ax.scatter(part.predicted, part.speedup, marker=marker, s=18,
                       label="completed" if state == "COMPLETE" else "pruned (partial rounds)")
    lo = min(rows.predicted.min(), rows.speedup.min()) * 0.95
    hi = max(rows.predicted.max(), rows.speedup.max(), 1.0) * 1.05
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, linestyle=":", label="predicted = measured")
    error = study.user_attrs.get(MODEL_ERROR) or {}
    rho = "n/a" if error.get("rho") is None else f"{error['rho']:.2f}"
    title = (f"model: rho {rho}, median |error| {error['median_abs']:.1%} over {error['n']}"
             if error.get("median_abs") is not None else "model: predicted vs measured")
    ax.set(xlabel="predicted speedup over sequential", ylabel="measured paired speedup", title=title,
           xlim=(lo, hi), ylim=(lo, hi))
    ax.legend(fontsize=7)
    return None


def best_search_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The search trial with the best paired speedup, pruned ones included by their partial
    result (the baseline and duplicates left out)."""
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            and not t.user_attrs.get(BASELINE) and result_of(t).speedup is not None and not result_of(t).duplicate]
    return max(done, key=lambda t: result_of(t).speedup, default=None)


def say(ax, text: str) -> None:
    """A sentence in place of a figure that has nothing to show."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10, transform=ax.transAxes)


def kind_of(row) -> str:
    """What a trial is, the one classification every figure and the report's text use: the
    baseline, a duplicate answered from the study (stored in Optuna's FAIL state, with the result
    it reused), skipped (the budget was spent by others), or its measured outcome (ok, pruned,
    incorrect, crashed, ...)."""
    if row.baseline:
        return "baseline"
    if row.duplicate:
        return "duplicate"
    return str(row.outcome) if isinstance(row.outcome, str) and row.outcome else "unknown"


def trial_counts(df: pd.DataFrame) -> dict[str, int]:
    """How many trials of each kind (`kind_of`), the baseline(s) first, then the measured outcomes
    by count, then duplicates and skipped: the numbers the report, the outcomes figure and the
    history's legend all print."""
    kinds = [kind_of(r) for r in df.itertuples()] if len(df) else []
    counts = pd.Series(kinds, dtype=str).value_counts()
    head = ["baseline"] + [k for k in counts.index if k not in ("baseline", "duplicate", "skipped")]
    return {k: int(counts[k]) for k in [*head, "duplicate", "skipped"] if k in counts.index}


def plot_history(study: optuna.Study, df: pd.DataFrame, ax) -> None:
    """Every measured search trial's paired speedup (over the sequential run measured right before
    it): ok (dots, with the best so far), pruned (at their partial result) and failed (crosses at
    the bottom), each counted in the legend as `trial_counts` counts it; duplicates answered from
    the study are not drawn (they measured nothing); the confirmed speedup, when there is one."""
    search = df[~df.baseline] if len(df) else df
    if not len(search):
        say(ax, "no search trials yet")
        return
    kinds = pd.Series([kind_of(r) for r in search.itertuples()], index=search.index)
    counts = trial_counts(df)
    ok = search[kinds == "ok"]
    ax.scatter(ok.number, ok.speedup, s=14, label=f"ok ({len(ok)})")
    if len(ok):
        ax.plot(ok.number, ok.speedup.cummax(), color="black", linewidth=1, label="best so far (one round each)")
    low = min([1.0, *search.speedup.dropna()]) * 0.95
    pruned = search[kinds == "pruned"]
    if len(pruned):
        ax.scatter(pruned.number, pruned.speedup.fillna(low), marker="v", color="tab:orange", s=22,
                   label=f"pruned ({len(pruned)}, at their partial result)")
    failed = search[~kinds.isin(["ok", "pruned", "duplicate", "skipped"])]
    if len(failed):
        ax.scatter(failed.number, [low] * len(failed), marker="x", color="tab:red", s=22,
                   label="failed (" + ", ".join(f"{k} {counts[k]}" for k in counts if k in set(kinds[failed.index])) + ")")
    ax.axhline(1.0, color="red", linestyle="--", label="sequential (each trial's own run beside it)")
    confirmed = study.user_attrs.get("confirmation") or {}
    if confirmed.get("verdict") == "winner":
        ax.axhline(confirmed["speedup"], color="green", linestyle=":", label=f"confirmed {confirmed['speedup']:.3f}x")
    title = "optimization history" + (f" ({counts['duplicate']} duplicates answered from the study, not drawn)"
                                      if counts.get("duplicate") else "")
    ax.set(xlabel="trial", ylabel="paired speedup over sequential", title=title)
    ax.legend(loc="best", fontsize=7)


def plot_outcomes(df: pd.DataFrame, ax) -> None:
    search = df[~df.baseline] if len(df) else df
    if not len(search):
        say(ax, "no search trials yet")
        return
    counts = {k: v for k, v in trial_counts(df).items() if k != "baseline"}
    colours = {"ok": "tab:green", "pruned": "tab:orange", "duplicate": "tab:grey", "skipped": "tab:grey"}
    ax.bar(list(counts), list(counts.values()), color=[colours.get(k, "tab:red") for k in counts])
    ax.set(ylabel="trials", title="trial outcomes (duplicates: answered from the study)")


def plot_importances(study: optuna.Study, ax) -> str | None:
    """Parameter importances (Optuna's default evaluator); returns why not, when it cannot or
    when too few trials completed for them to mean anything."""
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if t.params]
    if len(done) < MIN_TRIALS_FOR_IMPORTANCES:
        why = (f"no parameter importances: {len(done)} completed trial(s) with parameters, and below "
               f"{MIN_TRIALS_FOR_IMPORTANCES} they would show noise, not what matters")
        say(ax, why)
        return why
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
    """The confirmation's per-round speedups of each re-measured candidate: the observations the
    verdict was computed from (busy rounds drawn apart, grey)."""
    v = study.user_attrs.get("confirmation") or {}
    candidates = v.get("candidates")
    if candidates is None:
        say(ax, "no confirmation in paired rounds yet" if not v else "confirmed by an older dynaflow-tune "
            "(pooled samples): re-tune to see its paired rounds")
        return
    if not candidates:
        say(ax, "no candidate reached the confirmation: nothing concluded")
        return
    for i, c in enumerate(candidates):
        rounds = c["comparison"]["rounds"]
        quiet = [r["baseline_ms"] / r["candidate_ms"] for r in rounds if not r.get("busy")]
        busy = [r["baseline_ms"] / r["candidate_ms"] for r in rounds if r.get("busy")]
        ax.scatter([i] * len(quiet), quiet, s=14, color="tab:blue", label="quiet round" if i == 0 else None)
        ax.scatter([i + 0.15] * len(busy), busy, s=14, color="grey",
                   label="busy round (no evidence)" if i == 0 and busy else None)
        if c.get("rounds", 0) >= 2:
            ax.errorbar([i - 0.15], [c["speedup"]], yerr=[[c["speedup"] - c["low"]], [c["high"] - c["speedup"]]],
                        fmt="o", color="black", capsize=3, label="speedup and interval" if i == 0 else None)
    ax.axhline(1.0, color="red", linestyle="--", linewidth=0.8)
    ax.axhline(1.0 + (v.get("min_effect") or 0.03), color="grey", linestyle=":", linewidth=0.8)
    seen = [r["baseline_ms"] / r["candidate_ms"] for c in candidates for r in c["comparison"]["rounds"]] + [1.0]
    lo, hi = min(seen), max(seen)  # the axis spans the rounds: a 2-round interval may span 10^-9 to 10^7
    ax.set_ylim(lo - 0.25 * (hi - lo) - 0.05, hi + 0.25 * (hi - lo) + 0.05)
    ax.set_xticks(range(len(candidates)), [f"trial {c['trial']}" for c in candidates], fontsize=7)
    ax.set(ylabel="speedup per paired round", title=f"confirmation: {v.get('verdict', '').replace('_', ' ')}")
    ax.legend(fontsize=6, loc="best")


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
    (report.timeline_ratio) says how their ratio compares with the stored verdict. A label is
    written inside its bar, clipped to what fits, never rotated across the rows of other streams."""
    end = max(t.makespan_ms for t in timelines) or 1.0
    for tl, ax in zip(timelines, axes):
        for s in tl.spans:
            ax.broken_barh([(s.start_ms, s.end_ms - s.start_ms)], (s.stream - 0.4, 0.8),
                           facecolors=COLOURS.get(s.resource, "grey"), edgecolor="white", linewidth=0.3)
            fits, label = int((s.end_ms - s.start_ms) / end * LABEL_CHARS), f"{s.op}/{s.nano}"
            if fits >= 3:
                ax.text((s.start_ms + s.end_ms) / 2, s.stream, label if len(label) <= fits else label[:fits - 1] + "~",
                        ha="center", va="center", fontsize=6, clip_on=True)
        streams = sorted({s.stream for s in tl.spans})
        ax.set(xlim=(0, end * 1.02), ylim=(min(streams, default=0) - 0.6, max(streams, default=0) + 0.6),
               yticks=streams, ylabel="stream", title=f"{tl.label}: {tl.makespan_ms:.2f} ms")
    axes[-1].set_xlabel("ms")
    if caption:
        import textwrap

        axes[0].figure.suptitle(textwrap.fill(caption, 130), fontsize=7)
    handles = [matplotlib.patches.Patch(color=c, label=r) for r, c in COLOURS.items()]
    axes[0].legend(handles=handles, fontsize=7, loc="upper right")


LABEL_CHARS = 150  # characters of 6-point text across the figure's width


def study_workload(study: optuna.Study) -> tuple[str, str]:
    """(hardware key, workload key) from a study name `<hardware>/<workload>/<space>`."""
    hardware, workload, _ = study.study_name.split("/")
    return hardware, workload


def best_schedule(study: optuna.Study) -> Schedule:
    """The confirmation's best candidate (the winner, or the one it measured fastest: the one
    whose interval the record keeps), else the best search trial's (unconfirmed)."""
    v = study.user_attrs.get("confirmation") or {}
    if v.get("candidates") and v.get("best") is not None:
        return Schedule.from_json(v["candidates"][v["best"]]["schedule"])
    if v.get("winner_trial") is not None:  # a confirmation by an older dynaflow-tune
        return result_of(study.get_trials(deepcopy=False)[v["winner_trial"]]).schedule_obj() or Schedule()
    best = best_search_trial(study)
    return Schedule() if best is None else result_of(best).schedule_obj()


def workload_from_record(store_root: Path, hardware: str, workload: str) -> Workload | None:
    from dynaflow.runtime.store import ScheduleStore, StoreConfig

    store = ScheduleStore(StoreConfig(root=Path(store_root)))
    path = store.path(hardware, workload)
    if not path.exists():
        return None
    return store.read(path).workload  # validated like every record the product reads
