"""The subcommands and their flags. Each command builds its config from the flags, once, and
imports optuna, pandas or matplotlib only when it runs."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dynaflow.runtime import PRESETS, MeasureConfig, Schedule, TrialOutcome
from dynaflow.runtime import devices
from dynaflow.runtime.devices import device_type

from dynaflow.runtime import detect, validate
from dynaflow.runtime.files import check_folder
from dynaflow.runtime.hardware import live_device
from dynaflow.runtime.measure import COLLECTIVE_TIMEOUT_S
from dynaflow.runtime.store import check_hardware
from dynaflow.runtime.store import StoreConfig, read_record
from dynaflow.runtime.workload import case_builders

from .config import SAMPLERS, TuneConfig
from .storage import StorageConfig
from .workloads import FORMAT, default_dtype, parse_workload

DEFAULT_WORKLOADS = ["d16x256+p64"]
DEFAULT_MODEL = "llama-small"
DEFAULT_STORAGE = "sqlite:///results/studies.db"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once, and only when there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, like every other bad input (the usage
    lines argparse prints first are in `--help`)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dynaflow-tune", description="Search intra-device schedules for LLM layers.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    m = command("measure", "verify and time one schedule on one workload, print the measurement", cmd_measure)
    _model_flags(m)
    _measure_flags(m)
    m.add_argument("--workload", required=True, help=f"the batch: {FORMAT}")
    m.add_argument("--schedule", type=Path, default=None,
                   help="schedule JSON file, or a stored schedule record (default: sequential)")
    m.add_argument("--rounds", type=int, default=None, help="compare in this many paired rounds against --against "
                   "(the schedule and the baseline back to back, order alternating) and print the speedup with its "
                   "interval over the quiet rounds (default: one measurement, no comparison)")
    m.add_argument("--against", type=Path, default=None, help="the baseline of --rounds: a schedule JSON file or a "
                   "stored record (default: sequential); alone, it implies --rounds 5")
    m.add_argument("--accept-contention", action="store_true", help="with --rounds: count rounds measured while "
                   "other processes used the machine as evidence (comparing on a shared machine on purpose; the "
                   "result says so)")
    m.add_argument("--json", action="store_true", help="print the measurement as JSON")

    o = command("ops", "print the model's op graph: ops, resource class, FLOPs, bytes, deps", cmd_ops)
    _model_flags(o)
    o.add_argument("--workload", required=True, help=f"the batch: {FORMAT}")
    o.add_argument("--remeasure-peaks", action="store_true", help="measure the device peaks again and renew the cache")

    pr = _model_command(command("profile", "measure (or read) the performance model's profile; print each op's time "
                                        "and the headroom", cmd_profile))
    pr.add_argument("--space", default="nanoflow", help="the search space whose schedules the model ranks")
    pd = _model_command(command("predict", "print each schedule's predicted time and speedup (--measure: and measured, "
                                           "with the error)", cmd_predict))
    pd.add_argument("--schedule", type=Path, nargs="+", required=True, help="schedule JSON files or store records")
    pd.add_argument("--measure", action="store_true", help="also measure each against sequential in paired rounds")
    pd.add_argument("--rounds", type=int, default=5, help="paired rounds per schedule with --measure")

    t = command("tune", "search schedules for each workload and store the winners", cmd_tune)
    _model_flags(t, shapes=True)
    _measure_flags(t)
    _tune_flags(t)

    ls = command("list", "print the stored schedules as a table", cmd_list)
    ls.add_argument("--store", type=Path, default=Path("results"), help="root of the schedule store")

    sh = command("show", "print one stored record readably: verdict, speedup, schedule, origin", cmd_show)
    sh.add_argument("record", type=Path, help="a record file (results/schedules/<hardware>/<workload>.json)")

    ex = command("export", "write one hardware type's records to one file, to import on another machine", cmd_export)
    ex.add_argument("--store", type=Path, default=Path("results"), help="root of the schedule store")
    ex.add_argument("--hardware", default=None, help="hardware key to export (default: this machine's, for --device)")
    ex.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if torch sees one, else cpu)")
    ex.add_argument("--out", type=Path, required=True, help="the file to write")

    im = command("import", "save an exported file's records in this store, after checking them all", cmd_import)
    im.add_argument("file", type=Path, help="a file written by dynaflow-tune export")
    im.add_argument("--store", type=Path, default=Path("results"), help="root of the schedule store")
    im.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if torch sees one, else cpu)")

    st = command("studies", "list the studies in a storage: name, trials, verdict", cmd_studies)
    st.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL or journal:PATH")

    r = command("report", "write a study's figures (PNG) and a Markdown summary, without Jupyter", cmd_report)
    r.add_argument("--storage", default=DEFAULT_STORAGE, help="the study's storage URL")
    r.add_argument("--study", default=None, help="study name (default: the newest; see `dynaflow-tune studies`)")
    r.add_argument("--store", type=Path, default=Path("results"), help="root of the schedule store")
    r.add_argument("--out", type=Path, default=Path("results/report"), help="folder for report.md and the PNGs")
    r.add_argument("--no-timelines", action="store_true", help="skip re-running the best schedule for its timeline")
    return parser


def _model_flags(p: argparse.ArgumentParser, *, shapes: bool = False) -> None:
    p.add_argument("--model", default=None,
                   help=f"a preset ({', '.join(sorted(PRESETS))}), a Hugging Face architecture "
                        "hf:<arch>[:<preset>[:<layers>]] (llama, qwen2, mistral, mixtral), a folder vLLM serves as vllm:<folder> "
                        "(measured inside vLLM), or module:function returning a Case "
                        f"(default: {DEFAULT_MODEL}" + (", or the model a --shapes file names)" if shapes else ")"))
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--device", default="cpu", help=devices.spellings().replace("'", ""))
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism of a preset: each trial runs on this many "
                   "rank processes (gloo on cpu, NCCL on cuda: cuda:0..N-1), their collectives scheduled as ops")
    p.add_argument("--sequence-parallel", action="store_true", help="with --tp: reduce-scatters and all-gathers "
                   "instead of all-reduces, the norms and residual adds on each rank's share of the tokens")
    p.add_argument("--store", type=Path, default=Path("results"),
                   help="root of the schedule store; its peaks/ folder caches the device peaks")


def _measure_flags(p: argparse.ArgumentParser) -> None:
    defaults = MeasureConfig()
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed runs before timing")
    p.add_argument("--repeats", type=int, default=defaults.repeats, help="timed runs; the median is reported")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance of the output check "
                   "(default: derived from the dtype and the longest reduction; see README)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance of the output check (default: derived)")
    p.add_argument("--remeasure-peaks", action="store_true", help="measure the device peaks again and renew the cache")


def _model_command(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of a command that reads the performance model of one workload (profile, predict)."""
    _model_flags(p)
    _measure_flags(p)
    p.add_argument("--workload", required=True, help=f"the batch: {FORMAT}")
    p.add_argument("--renew-profile", action="store_true", help="measure the profile again instead of reading it")
    return p


def _tune_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument("--workload", action="append", default=None,
                   help=f"a batch bucket, repeatable: {FORMAT} (default: {DEFAULT_WORKLOADS[0]})")
    t.add_argument("--shapes", type=Path, default=None, help="tune the shapes a server recorded (ShapeLog.save): "
                   "buckets that cover them are chosen and the coverage printed; replaces --workload")
    t.add_argument("--buckets", type=int, default=None, help="how many buckets --shapes chooses (default 4)")
    t.add_argument("--space", default="nanoflow", help="search space: dbo, nanoflow, sequential")
    t.add_argument("--trials", type=int, default=30,
                   help="distinct schedules measured per workload, counted across resumed runs and processes")
    t.add_argument("--timeout-s", type=float, default=None, help="wall-time budget of the search, per workload")
    t.add_argument("--trial-timeout-s", type=float, default=60.0, help="a trial timing longer is TIMEOUT")
    t.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL (sqlite:///..., postgresql://...) "
                   "or journal:PATH (Optuna's journal file: much less driver time per trial than SQLite)")
    t.add_argument("--heartbeat-s", type=int, default=10, help="a running trial's heartbeat; a trial silent for "
                   "3 heartbeats belonged to a process that died and is failed")
    t.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="Optuna sampler")
    t.add_argument("--seed", type=int, default=None,
                   help="sampler seed (default: the run's baseline trial number: 0 in a new study, and a different "
                        "one for each tuner sharing a study)")
    t.add_argument("--no-prune", action="store_true", help="time every trial fully (no Wilcoxon pruning)")
    t.add_argument("--confirm-top", type=int, default=3, help="candidates re-measured against the baseline "
                   "(pruned trials included, by their partial result)")
    t.add_argument("--confirm-rounds", type=int, default=12, help="paired rounds per candidate at most (baseline "
                   "and candidate back to back, order alternating): the confirmation's round budget")
    t.add_argument("--confirm-min-rounds", type=int, default=5, help="quiet paired rounds a candidate needs "
                   "before any verdict on it")
    t.add_argument("--accept-contention", action="store_true", help="count rounds measured while other processes "
                   "were busy as evidence (tuning on a shared machine on purpose): the record says so and never "
                   "replaces one measured quiet")
    t.add_argument("--min-effect", type=float, default=0.03, help="the smallest speedup the confirmation must "
                   "resolve: 'sequential is best' means no candidate can be this much faster")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-model", action="store_true", help="search blind: no profile, no headroom, no screening")
    t.add_argument("--renew-profile", action="store_true", help="measure the model's profile again")
    t.add_argument("--workers", default=None, help="fan trials out over N Ray actors (or 'all'): one per GPU, "
                   "or per CPU slot on cpu; default: tune in this process without Ray")
    t.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else start "
                   "a local one); needs --workers")


def measure_config(args) -> MeasureConfig:
    # a hung tensor-parallel collective fails its trial within the trial's own time limit
    collective = getattr(args, "trial_timeout_s", None) or COLLECTIVE_TIMEOUT_S
    return MeasureConfig(warmup=args.warmup, repeats=args.repeats, rtol=args.rtol, atol=args.atol,
                         peaks_dir=StoreConfig(root=args.store).peaks_dir, remeasure_peaks=args.remeasure_peaks,
                         collective_timeout_s=collective)


def _workload(args, spec: str):
    return parse_workload(spec, model=args.model or DEFAULT_MODEL, dtype=default_dtype(args.dtype, args.device),
                          device=args.device, tp=args.tp, sequence_parallel=args.sequence_parallel)


def cmd_measure(args) -> int:
    rounds = args.rounds if args.rounds is not None else 5 if args.against else None
    if rounds is not None and rounds < 2:
        raise ValueError(f"--rounds must be >= 2 (an interval needs two rounds), but got {rounds}.")
    check_folder(args.store, "--store")
    w = _workload(args, args.workload)
    schedule = load_schedule_file(args.schedule, hardware=detect(w.device), store=args.store) if args.schedule \
        else Schedule()
    from .measuring import close_target
    from .targets import target_for

    baseline = load_schedule_file(args.against, hardware=detect(w.device), store=args.store) if args.against \
        else Schedule()
    target = target_for(w, measure_config(args))
    try:
        if rounds is not None:
            return _compare(target, w, schedule, baseline, rounds, as_json=args.json,
                            accept_contention=args.accept_contention)
        m = target.measure(schedule)
    finally:
        close_target(target)
    if m.outcome is TrialOutcome.INVALID and not args.json:  # a schedule breaking a rule is bad input: one line
        raise ValueError(f"{args.schedule}: {m.message}")
    if args.json:
        print(json.dumps({"workload": w.key, "hardware": target.hardware.key, "schedule": schedule.to_dict(),
                          "measurement": m.to_dict()}, indent=2))
    else:
        print(f"workload  {w.key} ({w.num_tokens} tokens)\nhardware  {target.hardware.key}\nschedule  {schedule}")
        print(f"result    {m.summary()}")
        tol = target.tolerance
        print(f"checked   against the sequential reference: rtol {tol.rtol:.2g}, atol {tol.atol:.2g}"
              + (f" (error {m.error_ratio:.2g}x of it)" if m.error_ratio is not None else ""))
        if m.state is not None:
            print(f"state     {state_words(m.state)}")
        for k, v in m.notes.items():
            print(f"note      {k}: {v}")
    # a schedule breaking a rule is bad input (2) whether the file's checks or the plan found it;
    # a schedule that ran and failed (incorrect, crashed, timeout, oom) is a failed run (1)
    return 0 if m.ok else 2 if m.outcome is TrialOutcome.INVALID else 1


def state_words(state) -> str:
    """A measurement's RunState in one line (runtime/steady.py)."""
    threads = f"threads per stream {list(state.threads)}" + (f" of the device's {state.full_threads}"
                                                             if state.full_threads else "") if state.threads else ""
    faults = f"{state.faults_per_run:,.0f} page faults per run"
    return ", ".join(p for p in (threads, faults, f"allocator {state.allocator}" if state.allocator else "") if p)


def _compare(target, w, schedule: Schedule, baseline: Schedule, rounds: int, *, as_json: bool,
             accept_contention: bool = False) -> int:
    """`measure --rounds N`: the verdicts' rule on two schedules (tuner/paired.py)."""
    from .confirm import paired_round
    from .paired import ESTIMATOR, Comparison, Plan

    plan = Plan(min_rounds=2, max_rounds=rounds, candidates=1, accept_contention=accept_contention)
    comparison, failed = Comparison(), None
    if not as_json:
        print(f"workload  {w.key} ({w.num_tokens} tokens)\nhardware  {target.hardware.key}\nschedule  {schedule}\n"
              f"against   {baseline}")
    for i in range(rounds):
        r, m = paired_round(target, schedule, i, baseline=baseline)
        if r is None:
            failed = f"round {i + 1}: {m.outcome.value}: {m.message}"
            break
        comparison = Comparison(rounds=comparison.rounds + (r,))
        if not as_json:
            print(f"round {i + 1:>3}  {r.first} first  against {r.baseline_ms:.3f} ms  schedule {r.candidate_ms:.3f} ms  "
                  f"{r.ratio:.3f}x" + (f"  different states (no evidence): {r.unsteady}" if r.unsteady
                                       else f"  busy (no evidence): {r.busy}" if r.busy else ""))
    iv = plan.final(comparison)
    said = _compared(iv, comparison, failed, accept_contention)
    if as_json:
        print(json.dumps({"workload": w.key, "hardware": target.hardware.key, "schedule": schedule.to_dict(),
                          "against": baseline.to_dict(), "comparison": comparison.to_dict(), "failed": failed,
                          "speedup": iv.speedup, "low": iv.low, "high": iv.high, "confidence": iv.confidence,
                          "rounds": iv.rounds, "estimator": ESTIMATOR, "result": said}, indent=2))
    else:
        print(f"result    {said}\nestimator {ESTIMATOR}")
    return 1 if failed else 0


def _compared(iv, comparison, failed: str | None, accept_contention: bool = False) -> str:
    busy, unsteady = len(comparison.busy_rounds), len(comparison.unsteady_rounds)
    left_out = (f"; {busy} busy round(s) {'counted (--accept-contention)' if accept_contention else 'left out'}"
                if busy else "") + (f"; {unsteady} round(s) in different states left out" if unsteady else "")
    if failed:
        return f"no comparison: {failed}"
    quiet = "" if accept_contention else "quiet "
    if iv.rounds < 2:
        return (f"no interval: {iv.rounds} {quiet}round(s) of {len(comparison.rounds)}{left_out}; run it on a quieter "
                "machine" + ("" if accept_contention else ", or count busy rounds on purpose (--accept-contention)"))
    word = "faster" if iv.low > 1 else "slower" if iv.high < 1 else "no difference shown"
    return (f"{iv.speedup:.3f}x: {word} ({iv.confidence:.0%} interval {iv.low:.3f}-{iv.high:.3f}x over {iv.rounds} "
            f"{quiet}paired rounds{left_out})")


def cmd_ops(args) -> int:
    check_folder(args.store, "--store")  # where the peaks are cached: a folder, before anything is measured
    w = _workload(args, args.workload)
    from .measuring import close_target
    from .targets import target_for

    target = target_for(w, MeasureConfig(warmup=0, repeats=1, peaks_dir=StoreConfig(root=args.store).peaks_dir,
                                         remeasure_peaks=args.remeasure_peaks))
    close_target(target)  # what ops prints came back with the target
    peaks = target.peaks
    print(f"{w.key} on {target.hardware.key}: machine balance {peaks.balance:.1f} FLOP/byte "
          f"({peaks.flops_per_s / 1e9:,.0f} GFLOP/s, {peaks.bytes_per_s / 1e9:,.1f} GB/s, measured once and cached "
          f"under {args.store / 'peaks'}; --remeasure-peaks renews it)")
    if peaks.bus_bytes_per_s:
        network = [op for op in target.graph.ops if op.resource == "network"]
        print(f"all-reduce bus bandwidth {peaks.bus_bytes_per_s / 1e9:,.2f} GB/s over {peaks.world_size} ranks "
              f"(measured as the group started); network ops' MB are the bytes each rank moves over its link, "
              f"bound {sum(op.bytes for op in network) / peaks.bus_bytes_per_s * 1e3:.3f} ms for all "
              f"{len(network)} of them")
    print(target.graph.describe())
    return 0


def _guided(args, w):
    """The target of one workload and its model (tuner/guide.py); one line where it has none."""
    from .guide import make_guide
    from .targets import target_for

    check_folder(args.store, "--store")
    target = target_for(w, measure_config(args))
    guide, why = make_guide(target, w, getattr(args, "space", "nanoflow"), StoreConfig(root=args.store).profiles_dir,
                            renew=args.renew_profile)
    if guide is None:
        from .measuring import close_target

        close_target(target)
        raise ValueError(f"{w.key}: {why.removeprefix('model: ')}")
    return target, guide


def cmd_profile(args) -> int:
    from dynaflow.search_spaces import get_space

    from .measuring import close_target

    get_space(args.space)
    w = _workload(args, args.workload)
    target, guide = _guided(args, w)
    close_target(target)
    print(f"{w.key} on {target.hardware.key}")
    print(guide.said)
    print(guide.profile.table(list(guide.simulator.graph.names)))
    h = guide.headroom
    print(f"headroom  {h.text()}")
    print(f"best      {guide.best[0]:.3f}x predicted: {guide.best[2]}")
    for speedup, _, schedule in guide.ranked[1:5]:
        print(f"          {speedup:.3f}x predicted: {schedule}")
    print(f"ranked    {len(guide.ranked)} distinct schedules of the {args.space} space, "
          + (f"the model's last measured error: median {guide.profile.error['median_abs']:.1%}, Spearman rho "
             f"{guide.profile.error['rho'] if guide.profile.error['rho'] is None else round(guide.profile.error['rho'], 2)}"
             f" over {guide.profile.error['n']} schedules" if guide.profile.error else
             "no error measured yet (a tune measures it, or predict --measure)"))
    return 0


def cmd_predict(args) -> int:
    from dynaflow.runtime.perfmodel import model_error

    from .measuring import close_target

    if args.measure and args.rounds < 2:
        raise ValueError(f"--rounds must be >= 2 (an interval needs two rounds), but got {args.rounds}.")
    w = _workload(args, args.workload)
    hardware = detect(w.device)
    schedules = [(path, load_schedule_file(path, hardware=hardware, store=args.store)) for path in args.schedule]
    target, guide = _guided(args, w)
    seq_ms, pairs, failed = guide.headroom.sequential_ms, [], 0
    try:
        print(f"{w.key} on {target.hardware.key}: sequential predicted {seq_ms:.3f} ms ({guide.said})")
        for path, schedule in schedules:
            predicted = guide.predict(schedule)
            if predicted is None:
                print(f"{path}: the model cannot run it on this model and batch (its ops or splits do not fit)")
                failed += 1
                continue
            line = f"{path}: predicted {seq_ms / predicted:.3f} ms, {predicted:.3f}x"
            if args.measure:
                measured, why = _measured_speedup(target, schedule, args.rounds)
                if measured is None:
                    line += f"; measured: {why}"
                    failed += 1
                else:
                    pairs.append((predicted, measured))
                    line += f"; measured {measured:.3f}x over {args.rounds} paired rounds ({why}), error {predicted / measured - 1:+.1%}"
            print(line)
    finally:
        close_target(target)
    if args.measure:
        print(model_error(pairs).text().replace("this run", "over these schedules"))
    return 1 if failed else 0


def _measured_speedup(target, schedule: Schedule, rounds: int) -> tuple[float | None, str]:
    """The median of `rounds` paired rounds' ratios (sequential time / the schedule's), or None and why."""
    import statistics

    from .confirm import paired_round

    ratios, busy = [], 0
    for i in range(rounds):
        r, m = paired_round(target, schedule, i)
        if r is None:
            return None, f"{m.outcome.value}: {m.message}"
        ratios.append(r.ratio)
        busy += bool(r.busy or r.unsteady)
    return statistics.median(ratios), f"{busy} busy or unsteady" if busy else "all quiet"


def load_schedule_file(path: Path, *, hardware=None, store: Path | None = None) -> Schedule:
    """A bare schedule JSON, or a store record holding one under "schedule". A record gets the
    loader's checks: validated whole (a newer record schema is refused), refused when tuned on
    other hardware than `hardware`, a warning when the software drifted since; a path inside
    `store` that resolves outside it (a symbolic link) is refused, as the server's loading does."""
    from dynaflow.runtime.store import ScheduleStore

    if store is not None and Path(path).absolute().is_relative_to(Path(store).absolute()):
        ScheduleStore(StoreConfig(root=store)).inside(path)
    data = validate.read_json(path, "schedule file")
    if isinstance(data, dict) and ("schedule" in data or "record_schema" in data):
        record = read_record(path)
        if hardware is not None:
            check_hardware(record, hardware, str(path))
        return record.schedule
    try:
        return Schedule.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _shape_workloads(args) -> tuple:
    """The buckets that cover a --shapes file, printed with the coverage they give."""
    from dynaflow.runtime import ShapeLog

    from .buckets import choose_buckets, coverage_text, workload_of

    if args.workload:
        raise ValueError("give --shapes or --workload, not both: --shapes chooses the workloads.")
    log = ShapeLog.load(args.shapes)
    if not log.calls:
        raise ValueError(f"shapes file {args.shapes} records no calls: serve with the map first, then save its shapes.")
    args.model = args.model or log.model
    buckets = choose_buckets(log, 4 if args.buckets is None else args.buckets)
    dtype = default_dtype(args.dtype, args.device)
    workloads = [workload_of(b, model=args.model or DEFAULT_MODEL, dtype=dtype, device=args.device, tp=args.tp,
                             sequence_parallel=args.sequence_parallel) for b in buckets]
    print(coverage_text(log, buckets, workloads, str(args.shapes)), flush=True)
    return tuple(workloads)


def cmd_tune(args) -> int:
    from dynaflow.search_spaces import get_space

    from .tune import tune

    if args.shapes is not None:
        workloads = _shape_workloads(args)
    else:
        if args.buckets is not None:
            raise ValueError("--buckets needs --shapes FILE (the recorded shapes to cover).")
        workloads = tuple(_workload(args, w) for w in (args.workload or DEFAULT_WORKLOADS))
    config = TuneConfig(workloads=workloads, space=args.space, trials=args.trials, timeout_s=args.timeout_s,
                        trial_timeout_s=args.trial_timeout_s, store_root=args.store,
                        storage=StorageConfig(url=args.storage, heartbeat_s=args.heartbeat_s),
                        sampler=args.sampler, seed=args.seed, measure=measure_config(args),
                        prune=not args.no_prune, confirm_top=args.confirm_top, confirm_rounds=args.confirm_rounds,
                        confirm_min_rounds=args.confirm_min_rounds, accept_contention=args.accept_contention,
                        min_effect=args.min_effect, progress=not args.no_progress, model=not args.no_model,
                        renew_profile=args.renew_profile)
    get_space(config.space)  # an unknown space is a usage error before anything runs
    results = tune(config, pool=pool_config(args))
    for r in results:
        print(result_lines(r))
    return 130 if any(r.interrupted for r in results) else 0


def result_lines(r) -> str:
    from .confirm import verdict_text

    rec = r.record
    fails = ", ".join(f"{k} {v}" for k, v in sorted(r.outcomes.items()) if k != "ok") or "none"
    converged = "; the search converged (proposals kept repeating measured schedules)" if r.exhausted else \
        "; the search stopped at --timeout-s" if r.timed_out else ""
    return (f"{r.workload.key}: {verdict_text(r.verdict)}\n"
            f"  {_tried(r.tally)} in the study, {r.duplicates} duplicate proposal(s) "
            f"answered from it this run{converged}; failed/pruned this run: {fails}\n"
            f"  stored {r.path}: {rec.verdict.replace('_', ' ')}, {rec.tokens_per_s:,.0f} tokens/s"
            + (f" (sequential {rec.baseline_tokens_per_s:,.0f})" if rec.verdict == "winner" else "")
            + (f" ({r.kept})" if r.kept else "") + f"\n  schedule {rec.schedule}")


def _tried(tally: dict[str, int]) -> str:
    """Distinct schedules by what became of them: '30 distinct schedule(s) measured' when all
    were, else with the crashed, interrupted and running ones apart."""
    rest = ", ".join(f"{n} {kind}" for kind, n in tally.items() if kind != "measured" and n)
    return f"{tally['measured']} distinct schedule(s) measured" + (f" (and {rest})" if rest else "")


def pool_config(args):
    if args.workers is None:
        if args.ray_address:
            raise ValueError("--ray-address needs --workers N (or all).")
        return None
    from .ray_fanout import PoolConfig, check_address

    for address, given_as in ((args.ray_address, "--ray-address"), (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")):
        if address:
            check_address(address, given_as)
            break
    workers = args.workers if args.workers == "all" else _count(args.workers)
    return PoolConfig(workers=workers, address=args.ray_address, use_gpus=device_type(args.device).accelerator,
                      ship=_model_files(args.model), group_size=args.tp)


def _model_files(model: str | None) -> tuple[str, ...]:
    """The local file of a `module:function` model (its top-level module's .py file, or its package's
    folder) that a joined Ray cluster's workers need: none when it is installed (a site-packages
    path: the nodes install it as they install dynaflow-tune) or not a module spec."""
    import importlib.util
    import sysconfig

    if not model or ":" not in model or any(model.startswith(p) for p in case_builders()):
        return ()
    top = model.split(":", 1)[0].split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return ()
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return ()
    origin = Path(spec.origin)
    path = origin.parent if spec.submodule_search_locations else origin
    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    if any(path.resolve().is_relative_to(p) for p in installed):
        return ()
    return (str(path),)


def _count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--workers must be a positive count or 'all', but got {text!r}.") from None


def cmd_studies(args) -> int:
    from .analysis import studies_table

    table = studies_table(args.storage)
    print(f"no study in {args.storage}" if table.empty else table.to_string(index=False))
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    path = write_report(args.storage, args.out, store_root=args.store, study_name=args.study,
                        timelines=not args.no_timelines)
    print(f"wrote {path} and its figures")
    return 0


def cmd_show(args) -> int:
    from .show import describe

    print(describe(read_record(args.record), args.record))
    return 0


def cmd_export(args) -> int:
    from dynaflow.runtime.files import check_file, write_json_atomic
    from dynaflow.runtime.store import ScheduleStore

    from .publish import export

    check_file(args.out, "--out")  # a folder, a kernel interface, an unwritable place: one line, before anything
    key = args.hardware or detect(live_device(args.device)).key
    bundle = export(ScheduleStore(StoreConfig(root=args.store)), key)
    write_json_atomic(args.out, bundle, indent=1)
    print(f"exported {len(bundle['records'])} record(s) of {key} to {args.out}")
    return 0


def cmd_import(args) -> int:
    from dynaflow.runtime.store import ScheduleStore

    from .publish import import_bundle

    live = detect(live_device(args.device))
    bundle = validate.read_json(args.file, "export file")
    saved, kept = import_bundle(ScheduleStore(StoreConfig(root=args.store)), bundle, live, str(args.file))
    print(f"imported {len(saved)} record(s) of {live.key} into {args.store / 'schedules'}")
    for note in kept:
        print(f"  {note}")
    return 0


def cmd_list(args) -> int:
    from .report import stored_table

    table = stored_table(args.store)
    if table.empty:
        print("no stored schedules under " + str(args.store / "schedules"))
        return 0
    errors = table.pop("error").dropna() if "error" in table else []
    print(table.to_string(index=False, na_rep=""))
    for error in errors:
        print(f"unreadable: {error}")
    return 0
