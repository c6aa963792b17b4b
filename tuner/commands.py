"""The tuner's commands: `tune` and `list`. Their bodies import optuna/pandas when they run."""
from __future__ import annotations

from pathlib import Path

from .config import SAMPLERS, TuneConfig
from .workloads import FORMAT, parse_workload

DEFAULT_WORKLOADS = ["d16x256+p64"]


def add_tuner_commands(sub, common, measure_flags, formatter) -> None:
    t = sub.add_parser("tune", help="search schedules for each workload and store the winners",
                       formatter_class=formatter)
    common(t)
    measure_flags(t)
    t.add_argument("--workload", action="append", default=None,
                   help=f"a batch bucket, repeatable: {FORMAT} (default: {DEFAULT_WORKLOADS[0]})")
    t.add_argument("--space", default="nanoflow", help="search space: dbo, nanoflow, sequential")
    t.add_argument("--trials", type=int, default=30, help="search trials per workload, counted across resumed runs")
    t.add_argument("--timeout-s", type=float, default=None, help="wall-time budget of the search, per workload")
    t.add_argument("--trial-timeout-s", type=float, default=60.0, help="a trial timing longer is TIMEOUT")
    t.add_argument("--storage", default="sqlite:///results/studies.db", help="Optuna storage URL (sqlite:///..., postgresql://...) or journal:PATH "
                   "(Optuna's journal file: much less driver time per trial than SQLite)")
    t.add_argument("--store", type=Path, default=Path("results"), help="root of the schedule store")
    t.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="Optuna sampler")
    t.add_argument("--seed", type=int, default=0, help="sampler seed")
    t.add_argument("--no-prune", action="store_true", help="time every trial fully (no Wilcoxon pruning)")
    t.add_argument("--confirm-top", type=int, default=3, help="candidates re-measured against the baseline")
    t.add_argument("--confirm-rounds", type=int, default=3, help="interleaved re-measurement rounds")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--workers", default=None, help="fan trials out over N Ray actors (or 'all'): one per GPU, "
                   "or per CPU slot on cpu; default: tune in this process without Ray")
    t.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else start "
                   "a local one); needs --workers")
    t.set_defaults(func=cmd_tune)

    r = sub.add_parser("report", help="write a study's figures (PNG) and a Markdown summary, without Jupyter",
                       formatter_class=formatter)
    r.add_argument("--storage", default="sqlite:///results/studies.db", help="the study's storage URL")
    r.add_argument("--study", default=None, help="study name (needed when the storage holds several)")
    r.add_argument("--store", type=Path, default=Path("results"), help="root of the schedule store")
    r.add_argument("--out", type=Path, default=Path("results/report"), help="folder for report.md and the PNGs")
    r.add_argument("--no-timelines", action="store_true", help="skip re-running the best schedule for its timeline")
    r.set_defaults(func=cmd_report)

    ls = sub.add_parser("list", help="print the stored schedules as a table", formatter_class=formatter)
    ls.add_argument("--store", type=Path, default=Path("results"), help="root of the schedule store")
    ls.set_defaults(func=cmd_list)


def cmd_tune(args) -> int:
    from .cli import default_dtype
    from .tune import tune

    dtype = default_dtype(args)
    workloads = tuple(parse_workload(w, model=args.model, dtype=dtype, device=args.device)
                      for w in (args.workload or DEFAULT_WORKLOADS))
    config = TuneConfig(workloads=workloads, space=args.space, trials=args.trials, timeout_s=args.timeout_s,
                        trial_timeout_s=args.trial_timeout_s, storage=args.storage, store_root=args.store,
                        sampler=args.sampler, seed=args.seed, warmup=args.warmup, repeats=args.repeats,
                        prune=not args.no_prune, confirm_top=args.confirm_top,
                        confirm_rounds=args.confirm_rounds, progress=not args.no_progress)
    _check_space(config.space)
    results = tune(config, pool=pool_config(args))
    for r in results:
        rec = r.record
        verdict = "sequential is best" if rec.sequential_best else f"{rec.speedup:.3f}x over sequential"
        fails = ", ".join(f"{k} {v}" for k, v in sorted(r.outcomes.items()) if k != "ok") or "none"
        kept = f" (kept: the {rec.space} space's stored winner is better)" if rec.space != config.space else ""
        print(f"{r.workload.key}: {verdict} (noise {rec.speedup_spread:.1%}), {rec.tokens_per_s:,.0f} tokens/s; "
              f"failed/pruned trials: {fails}\n  stored {r.path}{kept}\n  schedule {rec.schedule}")
    return 130 if any(r.interrupted for r in results) else 0


def pool_config(args):
    if args.workers is None:
        if args.ray_address:
            raise ValueError("--ray-address needs --workers N (or all).")
        return None
    from .pool import PoolConfig

    workers = args.workers if args.workers == "all" else _count(args.workers)
    return PoolConfig(workers=workers, address=args.ray_address, use_gpus=args.device.startswith("cuda"))


def _count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--workers must be a positive count or 'all', but got {text!r}.") from None


def cmd_report(args) -> int:
    from .report import write_report

    path = write_report(args.storage, args.out, store_root=args.store, study_name=args.study,
                        timelines=not args.no_timelines)
    print(f"wrote {path} and its figures")
    return 0


def cmd_list(args) -> int:
    from .report import stored_table

    table = stored_table(args.store)
    print("no stored schedules under " + str(args.store / "schedules") if table.empty else table.to_string(index=False))
    return 0


def _check_space(name: str) -> None:
    from dynaflow.search_spaces import get_space

    get_space(name)
