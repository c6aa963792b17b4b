"""Tables of stored schedules, and `dynaflow-tune report`: a study's figures as PNG files and a
Markdown summary, without Jupyter."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from dynaflow.runtime.store import ScheduleStore, StoreConfig


def stored_table(root: Path) -> pd.DataFrame:
    """One row per record; an unreadable one says so in a few words, its error in the `error`
    column (printed below the table by `list`, so it does not widen it); trial numbers are whole
    numbers or blank."""
    rows = []
    for path, rec in ScheduleStore(StoreConfig(root=root)).records():
        if isinstance(rec, ValueError):
            rows.append({"hardware": path.parent.name, "workload": path.stem, "schedule": "UNREADABLE (below)",
                         "error": str(rec)})
            continue
        rows.append({"hardware": rec.hardware.key, "workload": rec.workload.key, "schedule": rec.schedule.label,
                     "verdict": rec.verdict, "speedup": round(rec.speedup, 3), "noise": round(rec.speedup_spread, 3),
                     "tokens_per_s": round(rec.tokens_per_s), "efficiency": rec.efficiency and round(rec.efficiency, 3),
                     "space": rec.space, "trial": rec.trial, "created_at": rec.created_at})
    table = pd.DataFrame(rows)
    if "trial" in table:  # 16, not 16.0; blank, not NaN
        table["trial"] = ["" if pd.isna(t) else int(t) for t in table.trial]
    return table


def timelines_for(study, store_root: Path) -> tuple[list, str | None]:
    """Timelines of the sequential schedule and the confirmation's best candidate, re-run here when
    this machine is the study's hardware (warmed, runs interleaved in alternating order:
    Bench.timelines); else ([], why)."""
    from dynaflow.runtime import Bench, MeasureConfig, Schedule, detect

    from .analysis import best_schedule, study_workload, workload_from_record

    hardware, workload_key = study_workload(study)
    workload = workload_from_record(store_root, hardware, workload_key)
    if workload is None:
        return [], f"no stored record for {workload_key} under {store_root}: timelines need its workload"
    if detect(workload.device).key != hardware:
        return [], f"this machine is not {hardware}: timelines are recorded on the study's hardware"
    if workload.tp > 1:  # the winner's overlap is in its record (explain ran on the group's rank 0)
        return [], f"{workload_key} runs on {workload.tp} ranks: the report does not start a TP group for timelines"
    bench = Bench(workload, config=MeasureConfig(warmup=1, repeats=1, peaks_dir=StoreConfig(root=store_root).peaks_dir))
    return bench.timelines([Schedule(), best_schedule(study)], runs=TIMELINE_RUNS), None


TIMELINE_RUNS = 9


def timeline_ratio(timelines: list, confirmation: dict | None) -> str:
    """The timelines' own speedup, by the verdicts' estimator (tuner/paired.py: each run of the
    two schedules one paired round, order alternating), beside the stored figure for the same
    schedule; "they disagree" only when the two intervals do not meet."""
    from .paired import FAMILY_CONFIDENCE, interval

    seq, best = timelines
    ratios = [a / b for a, b in zip(seq.makespans_ms, best.makespans_ms) if a > 0 and b > 0]
    if not ratios:
        return "the timelines recorded no runs"
    iv = interval(ratios, 1 - FAMILY_CONFIDENCE)
    text = (f"timelines: sequential {seq.makespan_ms:.2f} ms, {best.label} {best.makespan_ms:.2f} ms: {iv.speedup:.3f}x "
            f"({iv.confidence:.0%} interval {iv.low:.3f}-{iv.high:.3f}x over {iv.rounds} paired runs; timing every "
            "task adds a little to each)")
    if not confirmation:
        return text + "; no stored verdict to compare"
    kind = (confirmation.get("verdict") or "?").replace("_", " ")
    figure = confirmation.get("best_speedup", confirmation.get("speedup"))
    if figure is None or best.label == "sequential":
        return text + f"; the stored verdict ({kind}) names no candidate to compare"
    low, high = confirmation.get("low"), confirmation.get("high")
    stored = f"{figure:.3f}x" + (f" ({low:.3f}-{high:.3f}x)" if low is not None else "")
    text += f"; the confirmation measured it at {stored} ({kind})"
    meets = (low <= iv.high and iv.low <= high) if low is not None else iv.low <= figure <= iv.high
    if not meets:
        text += (": they disagree beyond both intervals (the machine's load changed, or the per-task timing "
                 "weighs more on one schedule)")
    return text


def write_report(storage: str, out_dir: Path, *, store_root: Path = Path("results"),
                 study_name: str | None = None, timelines: bool = True) -> Path:
    import matplotlib.pyplot as plt
    import optuna

    from . import analysis

    study = analysis.load_study(storage, study_name)
    df = analysis.trials_table(study)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes, figures = [], {}

    def save(name: str, fig) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        figures[name] = f"{name}.png"

    fig, ax = plt.subplots(figsize=(7, 4))
    analysis.plot_history(study, df, ax)
    save("history", fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    if (why := analysis.plot_importances(study, ax)) is None:
        save("importances", fig)
    else:
        notes.append(why)
        plt.close(fig)
    if (why := analysis.pareto_note(study)) is None:
        save("pareto", optuna.visualization.matplotlib.plot_pareto_front(study).figure)
    else:
        notes.append(why)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    analysis.plot_outcomes(df, ax)
    save("outcomes", fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    analysis.plot_winner_spread(study, ax)
    save("spread", fig)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if (why := analysis.plot_model(study, df, ax)) is None:
        save("model", fig)
    else:
        notes.append(why)
        plt.close(fig)
    records = stored_table(store_root)
    fig, ax = plt.subplots(figsize=(7, 4))
    analysis.plot_buckets(records[records.speedup.notna()] if not records.empty else records, ax)
    save("buckets", fig)
    if timelines:
        tls, why = timelines_for(study, store_root)
        if tls:
            fig, axes = plt.subplots(len(tls), 1, figsize=(9, 1.6 + 1.2 * sum(len({s.stream for s in t.spans})
                                                                              for t in tls)), squeeze=False)
            ratio = timeline_ratio(tls, study.user_attrs.get("confirmation"))
            analysis.plot_timelines(tls, [a[0] for a in axes], caption=ratio)
            save("timelines", fig)
            notes.append(ratio)
            for name, tl in zip(("sequential", "best"), tls):
                tl.to_chrome_trace(out_dir / f"trace_{name}.json")
        else:
            notes.append(why)
    path = out_dir / "report.md"
    path.write_text(_markdown(study, df, figures, [n for n in notes if n], stored_for(study, store_root)))
    return path


def stored_for(study, store_root: Path):
    """The stored record this study's confirmation wrote, or None."""
    for _, rec in ScheduleStore(StoreConfig(root=store_root)).records():
        if not isinstance(rec, ValueError) and rec.study == study.study_name:
            return rec
    return None


def _markdown(study, df: pd.DataFrame, figures: dict[str, str], notes: list[str], record=None) -> str:
    from dynaflow.runtime.timeline import overlap_text

    from . import analysis
    from .confirm import verdict_text
    from .guide import MODEL_ERROR
    from .show import machine_text

    search = df[~df.baseline] if len(df) else df
    kinds = [analysis.kind_of(r) for r in search.itertuples()] if len(search) else []
    measured = search[[k not in ("duplicate", "skipped") for k in kinds]] if len(search) else search
    counts = analysis.trial_counts(df)
    outcomes = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("baseline", "duplicate", "skipped")) or "none"
    v = study.user_attrs.get("confirmation") or {}
    lines = [f"# {study.study_name}", "",
             f"- trials: {len(df)} in the study: {counts.get('baseline', 0)} baseline(s), {len(measured)} distinct "
             f"schedules measured ({outcomes}), {counts.get('duplicate', 0)} duplicates and {counts.get('skipped', 0)} "
             "skipped answered from the study without measuring",
             f"- sequential: {_tokens(study, v.get('baseline_ms'))} (the confirmation's paired rounds)"
             if v.get("baseline_ms") else "- sequential: not confirmed yet"]
    ranked = measured[measured.speedup.notna()] if len(measured) else measured
    if len(ranked):
        best = ranked.loc[ranked.speedup.idxmax()]
        lines.append(f"- best search trial: {best.speedup:.3f}x over the sequential run beside it (trial "
                     f"{best.number}, {best.outcome}; one paired round, unconfirmed: the confirmation below decides)")
    else:
        lines.append("- best search trial: none (no search trial ran correctly)")
    lines += [f"- confirmation: {verdict_text(v)}"]
    if (error := study.user_attrs.get(MODEL_ERROR)) and error.get("n"):
        rho = "n/a" if error.get("rho") is None else f"{error['rho']:.2f}"
        lines.append(f"- model error (the run of {error.get('at', '?')}): Spearman rho {rho} over {error['n']} "
                     f"schedule(s), median |error| {error['median_abs']:.1%} (worst {error['worst']:.1%})")
    if record is not None:
        if record.verdict == "winner":
            lines.append(f"- why the winner won: {overlap_text(record.overlap)}")
            if record.no_overlap:
                lines.append(f"- {record.no_overlap}")
        lines.append(f"- machine during the confirmation: {machine_text(record)}")
    lines.append("")
    top = ranked.nlargest(5, "speedup")[["number", "speedup", "outcome", "label"]] if len(ranked) else ranked
    lines += ["## Best trials (paired speedup in the search)", "", _table(top) if len(top) else "none measured", ""]
    lines += [f"![{name}]({file})" for name, file in figures.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _tokens(study, ms: float) -> str:
    tokens = study.user_attrs.get("num_tokens")
    return f"{tokens / ms * 1e3:,.0f} tokens/s ({ms:.3f} ms)" if tokens else f"{ms:.3f} ms"


def _table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        rows.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return re.sub(r"\|", "/", str(v))
