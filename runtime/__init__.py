"""dynaflow.runtime: run intra-device schedules on unchanged models. Imports torch only."""
from .batch import BatchLayout
from .executor import Compiled, Executor
from .graph import Op, OpGraph, trace
from .hardware import Hardware, detect
from .hf import apply_schedules, cache_kwargs, compile_with_schedules, recorded_shapes, remove_schedules
from .loading import ScheduleMap, load_schedule
from .measure import Bench, MeasureConfig, Measurement, TrialOutcome, measure
from .schedule import Schedule, Step, StreamSpec
from .serving import ScheduledModule
from .shapes import Bucket, ShapeLog
from .case import Case
from .workload import PRESETS, Workload
from . import vllm as _vllm  # noqa: F401 - registers the builder of `vllm:` models (vLLM itself stays unimported)

__all__ = [
    "BatchLayout", "Bench", "Bucket", "Case", "Compiled", "Executor", "Hardware", "MeasureConfig", "Measurement",
    "Op", "OpGraph", "PRESETS", "Schedule", "ScheduleMap", "ScheduledModule", "ShapeLog", "Step", "StreamSpec",
    "TrialOutcome", "Workload", "apply_schedules", "cache_kwargs", "compile_with_schedules", "detect", "load_schedule", "measure", "recorded_shapes",
    "remove_schedules", "trace",
]
