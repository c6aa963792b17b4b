"""How the tool says a problem: the lowest layer of tuner/ (nothing here imports the rest).

A warning is one line naming the tool (`one_line`, installed as warnings.formatwarning by the
CLI and by each tensor-parallel rank), never the source file and line that raised it."""
from __future__ import annotations


def one_line(message, category, filename, lineno, line=None) -> str:
    """A warning as one line naming the tool, not the source file and line that raised it."""
    return f"dynaflow-tune: warning: {message}\n"
