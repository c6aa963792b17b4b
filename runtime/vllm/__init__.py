"""Tuned schedules inside vLLM: a plugin, no fork.

    DYNAFLOW_VLLM_SCHEDULES=results vllm serve ./my-model        # or LLM(...) in a script

One switch: the environment variable naming the store the tuner wrote (or
`DYNAFLOW_VLLM_POLICY=module:function`, a policy `(BatchLayout) -> Schedule`, for a hand-written
rule). vLLM loads the plugin from the `vllm.general_plugins` entry point in each of its processes;
with neither variable set, `register()` returns at once and vLLM runs untouched. With one set, the
plugin wraps the compilation backend vLLM chooses for itself (DYNAMO_TRACE_ONCE mode, as vLLM's
CPU build always runs: one graph of the whole model) and runs every forward step through
`steps.StepRunner`: the step's batch is looked up like any live batch (exact, nearest,
sequential); a sequential answer runs vLLM's own compiled graph, any other runs the graph's ops
per nano-batch on the schedule's streams. Every problem with the configuration (no store, records
for other hardware or another model, a corrupt record, a vLLM this plugin does not know) is one
WARNING and sequential steps: never a crash of the engine.

Other settings, all optional: DYNAFLOW_VLLM_MODEL, the model name the records are looked up by
(default `vllm:<the model folder's name>`, as `dynaflow-tune tune --model vllm:<folder>` stores
them, tuned on vLLM's own model: tuner/vllm_engine.py); DYNAFLOW_VLLM_SHAPES, a file the live step shapes
are written to as the engine exits (`dynaflow-tune tune --shapes FILE` tunes them);
DYNAFLOW_VLLM_REPORT, a JSON file the plugin's counts are written to as the engine exits (steps
split and sequential, how the store answered them, the reasons a step ran sequential).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
from pathlib import Path

import torch

from ..workload import folder_name, register_case_builder

log = logging.getLogger("vllm.dynaflow")  # shown in vLLM's own log format, by its handlers

ENV_SCHEDULES = "DYNAFLOW_VLLM_SCHEDULES"
ENV_POLICY = "DYNAFLOW_VLLM_POLICY"
ENV_MODEL = "DYNAFLOW_VLLM_MODEL"
ENV_SHAPES = "DYNAFLOW_VLLM_SHAPES"
ENV_REPORT = "DYNAFLOW_VLLM_REPORT"
RUNNERS: list = []  # this process's step runners (one per graph vLLM compiles), for tests and reports


def _build_case(workload):
    raise ValueError(f"model {workload.model!r} runs inside vLLM's worker process, not in this one: "
                     "`dynaflow-tune tune`, `measure` and `ops` reach it there (tuner/vllm_engine.py).")


# `vllm:<folder>`: measured on a step vLLM formed, in its worker; its records named by the folder
register_case_builder("vllm:", _build_case, name=folder_name("vllm:"))


def enabled() -> bool:
    return bool(os.environ.get(ENV_SCHEDULES) or os.environ.get(ENV_POLICY))


def register() -> None:
    """The `vllm.general_plugins` entry point: runs in every vLLM process, possibly more than once."""
    if not enabled():
        return
    from . import hooks
    try:
        hooks.check()
    except RuntimeError as e:
        log.warning("%s", e)
        return
    # vLLM's AOT compile caches what a backend returns; a step runner is rebuilt at each start instead.
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    hooks.install(wrap_backend)
    hooks.watch_first_step()


def model_key(facts: dict) -> str:
    return os.environ.get(ENV_MODEL) or f"vllm:{Path(facts['model']).name}"


def chooser_for(facts: dict):
    """The policy named by DYNAFLOW_VLLM_POLICY, else the store's ScheduleMap for this model and
    the live hardware; any problem is one WARNING and a chooser that answers sequential."""
    from ..loading import ScheduleMap
    from ..schedule import Schedule
    from ..serving import Policy
    from ..workload import load_callable

    dtype = str(facts["dtype"]).removeprefix("torch.")
    policy = os.environ.get(ENV_POLICY)
    try:
        if policy:
            return Policy(load_callable(policy))
        store = os.environ[ENV_SCHEDULES]
        if not Path(store).is_dir():
            raise ValueError(f"{ENV_SCHEDULES}={store!r} is not a folder (the --store a tuner wrote)")
        device = "cpu" if facts["device_type"] == "cpu" else None
        return ScheduleMap.load(store, model=model_key(facts), dtype=dtype, device=device, on_error="warn")
    except Exception as e:  # the engine must serve whatever the configuration says
        log.warning("dynaflow: %s; every step runs sequential", e if policy is None else f"policy {policy!r}: {e}")
        return Policy(lambda layout: Schedule())


def wrap_backend(backend, vllm_config):
    """A compilation backend: vLLM's own `backend` compiles the graph for sequential steps, and a
    StepRunner runs the graph's ops per nano-batch for the others."""
    from . import hooks
    from .steps import StepRunner

    facts = hooks.config_facts(vllm_config)
    hooks.count_vllm_ops()  # vLLM's kernels are loaded by now
    chooser = chooser_for(facts)
    dtype, inductor_config = facts["dtype"], facts["inductor_config"]

    def compile_graph(gm, example_inputs, **kwargs):
        try:
            runner = StepRunner(gm, None, chooser, dtype=dtype)
        except Exception as e:  # a graph the cutter cannot split: vLLM runs it as it would have
            log.warning("dynaflow: vLLM's graph cannot be cut into ops (%s: %s); every step runs sequential",
                        type(e).__name__, e)
            return _compiled(backend, gm, example_inputs, inductor_config, kwargs)
        runner.sequential = _compiled(backend, gm, example_inputs, inductor_config, kwargs)
        RUNNERS.append(runner)
        log.info("dynaflow: vLLM's graph cut into %d ops (%d with attention or a KV-cache write); steps scheduled by %s",
                 len(runner.graph.ops), len(runner.context_ops), _describe(chooser))
        atexit.register(_at_exit, runner)
        return runner

    return compile_graph


def _compiled(backend, gm, example_inputs, inductor_config: dict, kwargs: dict):
    """What vLLM would have run: its backend applied to the graph (inductor with vLLM's options)."""
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs, config_patches=inductor_config)
    if isinstance(backend, str):
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs, **kwargs)
    return backend(gm, example_inputs, **kwargs)


def _describe(chooser) -> str:
    policy = os.environ.get(ENV_POLICY)
    return f"policy {policy}" if policy else f"{getattr(chooser, 'source', 'a sequential fallback')}"


def report(runner) -> dict:
    """What the plugin did in this process: steps split and sequential, how the store answered
    (ScheduleMap.rule_counts: exact, nearest, sequential), the reasons a step ran sequential, and
    the hardware key records must carry to apply here (vLLM sets its worker's CPU threads)."""
    from ..hardware import detect
    rules = dict(getattr(runner.calls.chooser, "rule_counts", {}) or {})
    return {"steps_split": runner.steps["split"], "steps_sequential": runner.steps["sequential"],
            "answered_by": rules, "sequential_because": sorted(runner.said),
            "hardware": detect(str(runner.device)).key if runner.device is not None else None,
            "deciding_s": runner.cost_s["deciding"], "sequential_steps_s": runner.cost_s["sequential_steps"]}


def _at_exit(runner) -> None:
    """Say what the plugin did; write the step shapes and the report where the environment says."""
    done = report(runner)
    log.info("dynaflow: %d step(s) split into nano-batches, %d sequential%s", done["steps_split"],
             done["steps_sequential"], f"; the store answered {done['answered_by']}" if done["answered_by"] else "")
    for env, write in ((ENV_SHAPES, lambda path: runner.shapes.save(path)),
                       (ENV_REPORT, lambda path: Path(path).write_text(json.dumps(done, indent=1)))):
        path = os.environ.get(env)
        if path:
            try:
                write(path)
            except OSError as e:
                log.warning("dynaflow: cannot write %s=%s (%s)", env, path, e)
