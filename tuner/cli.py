"""The `dynaflow-tune` command: parses flags once and hands each subcommand its config.

    tune (the default job), measure (one schedule by hand), ops (the op graph),
    list (the stored schedules), studies (a storage's studies), report (a study's figures)

Commands live in tuner/commands.py; optuna is imported only by the commands that need it.
Errors a user can fix are one line on stderr (exit 2 for bad input, 1 for a run that cannot
go on), never a traceback.
"""
from __future__ import annotations

import os
import sys
import warnings

from .commands import build_parser
from .config import TuneError
from .errors import one_line


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = one_line
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
        return code
    except BrokenPipeError:  # `dynaflow-tune ops | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # 128 + SIGPIPE, as a tool killed by the closed pipe would
    except ValueError as e:
        print(f"dynaflow-tune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TuneError as e:
        print(f"dynaflow-tune {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
