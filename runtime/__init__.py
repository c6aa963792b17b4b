"""dynaflow.runtime: run intra-device schedules on unchanged models. Imports torch only."""
from .batch import BatchLayout
from .executor import Compiled, Executor
from .graph import Op, OpGraph, trace
from .hardware import Hardware, detect
from .hf import apply_schedules, recorded_shapes, remove_schedules
from .hf_compat import cache_kwargs
from .loading import ScheduleMap, load_schedule
from .measure import Bench, MeasureConfig, Measurement, TrialOutcome, measure
from .schedule import Schedule, Step, StreamSpec
from .serving import ScheduledModule
from .shapes import Bucket, ShapeLog
from .workload import PRESETS, Case, Workload

__all__ = [
    "BatchLayout", "Bench", "Bucket", "Case", "Compiled", "Executor", "Hardware", "MeasureConfig", "Measurement",
    "Op", "OpGraph", "PRESETS", "Schedule", "ScheduleMap", "ScheduledModule", "ShapeLog", "Step", "StreamSpec",
    "TrialOutcome", "Workload", "apply_schedules", "cache_kwargs", "detect", "load_schedule", "measure", "recorded_shapes",
    "remove_schedules", "trace",
]
