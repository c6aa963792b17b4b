"""Hugging Face transformers models under schedules, in one home:

    layers.py           decoder layers wrapped in place (layer granularity): apply_schedules
    compile_backend.py  a torch.compile backend cutting the whole model into ops: compile_with_schedules
    models.py           HF architectures as tunable cases (`--model hf:<arch>[:<preset>[:<layers>]]`)
    compat.py           the transformers range tested, and the API drift bridged

transformers is imported only where an `hf:` model is built; the rest works on any module
shaped like one.
"""
from . import models  # noqa: F401  registers the "hf:" case builder
from .compat import TESTED_TRANSFORMERS, cache_kwargs, check_transformers, whole_graph_note
from .compile_backend import CompiledWithSchedules, compile_with_schedules, module_path, schedule_backend
from .layers import ScheduledDecoderLayer, apply_schedules, decoder_layers, recorded_shapes, remove_schedules

__all__ = [
    "CompiledWithSchedules", "ScheduledDecoderLayer", "TESTED_TRANSFORMERS", "apply_schedules", "cache_kwargs",
    "check_transformers", "compile_with_schedules", "decoder_layers", "module_path", "recorded_shapes",
    "remove_schedules", "schedule_backend", "whole_graph_note",
]
