"""Tables of stored schedules, and `dynaflow-tune report`: a study's figures as PNG files and a
Markdown summary, without Jupyter."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pandas as pd

from dynaflow.runtime.store import ScheduleStore, StoreConfig


def stored_table(root: Path) -> pd.DataFrame:
    rows = []
    for path, rec in ScheduleStore(StoreConfig(root=root)).records():
        if isinstance(rec, ValueError):
            rows.append({"hardware": path.parent.name, "workload": path.stem, "schedule": f"UNREADABLE: {rec}"})
            continue
        rows.append({"hardware": rec.hardware.key, "workload": rec.workload.key, "schedule": rec.schedule.label,
                     "verdict": rec.verdict, "speedup": round(rec.speedup, 3), "noise": round(rec.speedup_spread, 3),
                     "tokens_per_s": round(rec.tokens_per_s), "efficiency": rec.efficiency and round(rec.efficiency, 3),
                     "space": rec.space, "trial": rec.trial, "created_at": rec.created_at})
    return pd.DataFrame(rows)


def timelines_for(study, store_root: Path) -> tuple[list, str | None]:
    """Timelines of the sequential and the best schedule, re-run here when this machine is the
    study's hardware (warmed, interleaved, medians: Bench.timelines); else ([], why)."""
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
    """The timelines' own ratio (median makespans, sequential over best, with the spread of the
    per-run ratios) beside the stored verdict's speedup, saying so when they disagree."""
    import statistics

    seq, best = timelines
    ratios = sorted(a / b for a, b in zip(seq.makespans_ms, best.makespans_ms) if b > 0)
    if not ratios:
        return "the timelines recorded no runs"
    ratio = statistics.median(seq.makespans_ms) / statistics.median(best.makespans_ms)
    low, high = ratios[len(ratios) // 10], ratios[-1 - len(ratios) // 10]
    text = f"timelines: sequential {seq.makespan_ms:.2f} ms, best {best.makespan_ms:.2f} ms: {ratio:.3f}x " \
           f"(per-run ratios {low:.3f}-{high:.3f}x; timing every task adds a little to each)"
    if not confirmation:
        return text + "; no stored verdict to compare"
    verdict = confirmation.get("speedup", 1.0) if confirmation.get("verdict") == "winner" else 1.0
    text += f"; the stored verdict: {verdict:.3f}x ({confirmation.get('verdict', '?').replace('_', ' ')})"
    if not (low <= verdict <= high):
        text += ": they disagree beyond the timelines' spread (the machine's load changed, or the per-task " \
                "timing weighs more on one schedule)"
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

    from .confirm import verdict_text
    from .show import machine_text

    search = df[~df.baseline] if len(df) else df
    base = df.loc[df.baseline, "tokens_per_s"]
    done = search[(search.state == "COMPLETE") & ~search.duplicate] if len(search) else search
    distinct = search[~search.duplicate & (search.outcome != "skipped")] if len(search) else search
    outcomes = ", ".join(f"{k} {v}" for k, v in distinct.outcome.value_counts().items()) if len(distinct) else "none"
    lines = [f"# {study.study_name}", "",
             f"- trials: {len(search)}: {len(distinct)} distinct schedules ({outcomes}), "
             f"{len(search) - len(distinct)} duplicates or skipped, answered from the study without measuring",
             f"- sequential baseline: {base.iloc[-1]:,.0f} tokens/s (the latest run's, warmed until stable"
             + (f"; {len(base)} runs, from {base.min():,.0f} to {base.max():,.0f}" if len(base) > 1 else "") + ")"
             if len(base) else "- no baseline"]
    if len(done) and len(base):
        best = done.loc[done.tokens_per_s.idxmax()]
        lines.append(f"- best search trial: {best.tokens_per_s:,.0f} tokens/s ({best.speedup:.3f}x the baseline "
                     f"measured in its run; unconfirmed: the confirmation below re-measures it interleaved)")
    elif not len(search):
        lines.append("- best search trial: none (no search trial was measured)")
    else:
        lines.append("- best search trial: none completed (every trial was pruned or failed)")
    lines += [f"- confirmation: {verdict_text(study.user_attrs.get('confirmation'))}"]
    if record is not None:
        if record.verdict == "winner":
            lines.append(f"- why the winner won: {overlap_text(record.overlap)}")
        lines.append(f"- machine during the confirmation: {machine_text(record)}")
    lines.append("")
    top = done.nlargest(5, "tokens_per_s")[["number", "tokens_per_s", "speedup", "label"]]
    lines += ["## Best trials", "", _table(top) if len(top) else "none completed", ""]
    lines += [f"![{name}]({file})" for name, file in figures.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


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
