"""dynaflow.runtime: run intra-device schedules on unchanged models. Imports torch only."""
from .batch import BatchLayout
from .executor import Compiled, Executor
from .graph import Op, OpGraph, trace
from .hardware import Hardware, detect
from .measure import Bench, MeasureConfig, Measurement, TrialOutcome, measure
from .schedule import Schedule, Step, StreamSpec
from .workload import PRESETS, Case, Workload

__all__ = [
    "BatchLayout", "Bench", "Case", "Compiled", "Executor", "Hardware", "MeasureConfig", "Measurement",
    "Op", "OpGraph", "PRESETS", "Schedule", "Step", "StreamSpec", "TrialOutcome", "Workload", "detect",
    "measure", "trace",
]
