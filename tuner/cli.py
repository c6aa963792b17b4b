"""The `dynaflow-tune` command. Flags are read here, once, and passed down as configs.

Subcommands: tune (the default job), measure (one schedule by hand), ops (the op graph),
list (the stored schedules). optuna is imported only by the commands that search.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dynaflow.runtime import PRESETS, Bench, MeasureConfig, Schedule

from .workloads import FORMAT, parse_workload


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once, and only when there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-small",
                   help=f"a preset ({', '.join(sorted(PRESETS))}) or module:callable returning a Case")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def _measure_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    p.add_argument("--repeats", type=int, default=15, help="timed runs; the median is reported")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynaflow-tune", description="Search intra-device schedules for LLM layers.")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("measure", help="verify and time one schedule on one workload, print the measurement",
                       formatter_class=HelpFormatter)
    _common(m)
    _measure_flags(m)
    m.add_argument("--workload", required=True, help=f"the batch: {FORMAT}")
    m.add_argument("--schedule", type=Path, default=None,
                   help="schedule JSON file, or a stored schedule record (default: sequential)")
    m.add_argument("--json", action="store_true", help="print the measurement as JSON")

    o = sub.add_parser("ops", help="print the model's op graph: ops, resource class, FLOPs, bytes, deps",
                       formatter_class=HelpFormatter)
    _common(o)
    o.add_argument("--workload", required=True, help=f"the batch: {FORMAT}")

    from .commands import add_tuner_commands  # tune, list: flags only, optuna is imported on use

    add_tuner_commands(sub, _common, _measure_flags, HelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) if hasattr(args, "func") else COMMANDS[args.command](args)
    except ValueError as e:
        print(f"dynaflow-tune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def default_dtype(args) -> str:
    return args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")


def cmd_measure(args) -> int:
    w = parse_workload(args.workload, model=args.model, dtype=default_dtype(args), device=args.device)
    schedule = load_schedule_file(args.schedule) if args.schedule else Schedule()
    bench = Bench(w, config=MeasureConfig(warmup=args.warmup, repeats=args.repeats))
    m = bench.measure(schedule)
    if args.json:
        print(json.dumps({"workload": w.key, "hardware": bench.hardware.key, "schedule": schedule.to_dict(),
                          "measurement": m.to_dict()}, indent=2))
    else:
        print(f"workload  {w.key} ({w.num_tokens} tokens)\nhardware  {bench.hardware.key}\nschedule  {schedule}")
        print(f"result    {m.summary()}")
        for k, v in m.notes.items():
            print(f"note      {k}: {v}")
    return 0 if m.ok else 1


def cmd_ops(args) -> int:
    w = parse_workload(args.workload, model=args.model, dtype=default_dtype(args), device=args.device)
    bench = Bench(w, config=MeasureConfig(warmup=0, repeats=1))
    print(f"{w.key} on {bench.hardware.key}: machine balance {bench.peaks.balance:.1f} FLOP/byte")
    print(bench.executor.graph.describe())
    return 0


def load_schedule_file(path: Path) -> Schedule:
    """A bare schedule JSON, or a store record holding one under "schedule"."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read schedule file {path}: {e}") from None
    if isinstance(data, dict) and "schedule" in data:
        data = data["schedule"]
    try:
        return Schedule.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


COMMANDS = {"measure": cmd_measure, "ops": cmd_ops}

if __name__ == "__main__":
    sys.exit(main())
