"""dynaflow.runtime: run intra-device schedules on unchanged models. Imports torch only.

The names below load on first use (PEP 562), so a process that reads only files, records or the
store (the CLI's `list`, `show`, `studies`, a storage opened by the tuner) never imports torch.
The integrations (runtime.hf: `hf:`, runtime.vllm: `vllm:`) register their models when a workload
is first built or named (runtime.workload.integrations). `measure()` is runtime.measure's: the
package's attribute of that name is the module."""
from __future__ import annotations

import importlib

_WHERE = {  # name -> the submodule that defines it
    "BatchLayout": "batch", "Compiled": "executor", "Executor": "executor", "Op": "graph", "OpGraph": "graph",
    "trace": "graph", "Hardware": "hardware", "detect": "hardware", "apply_schedules": "hf",
    "cache_kwargs": "hf", "compile_with_schedules": "hf", "recorded_shapes": "hf", "remove_schedules": "hf",
    "ScheduleMap": "loading", "load_schedule": "loading", "Bench": "measure", "MeasureConfig": "measure",
    "Measurement": "measure", "TrialOutcome": "measure", "Schedule": "schedule",
    "Step": "schedule", "StreamSpec": "schedule", "ScheduledModule": "serving", "Bucket": "shapes",
    "ShapeLog": "shapes", "Case": "case", "PRESETS": "workload", "Workload": "workload",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once: the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
