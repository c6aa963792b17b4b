"""Tuning on vLLM's own model: a step of the workload's shape, formed by vLLM, kept and replayed.

    dynaflow-tune tune --model vllm:./my-model --shapes shapes.json   # the shapes a serve recorded

`start(workload)` starts vLLM once per process (`Engine`: its engine core in this process,
stepped by the tuner, VLLM_ENABLE_V1_MULTIPROCESSING=0; the model in vLLM's own worker process,
bound to the CPU threads vLLM gives it when serving; the plugin on, every step sequential). It
feeds the engine requests so that its scheduler forms a step of the workload's shape (decode
requests whose sequences end near the workload's context, then its prefill requests of one chunk
each), and the worker keeps that step (`TuningWorker`, a `worker_extension_cls` reached by
vLLM's collective_rpc): its inputs, its attention metadata and slot mappings, as a Case (the
graph the plugin cuts when serving, so the same ops, op names and attention backend, every
attention and KV-cache op of a nano-batch run inside that nano-batch's replayed forward
context; a sequential schedule run as vLLM's compiled graph). Trials are measured there, by a
Bench behind a Station of tuner/remote.py's protocol (`dynaflow_call`; tuner/targets.py's
VllmTarget is the driver's side). Replaying writes the KV cache at the kept step's slots with the values the step itself
wrote, so every run starts from the same state; the kept requests stay alive (their cache blocks
untouched) until the next step is kept.

Records are stored under `vllm:<folder name>` (workload.model_name), the name the plugin looks
them up by, with the hardware key the worker sees (its CPU threads), the one it serves on.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dynaflow.runtime import BatchLayout, Bench, Case, MeasureConfig, Schedule, Workload, telemetry
from dynaflow.runtime.vllm import ENV_POLICY, ENV_SCHEDULES, RUNNERS, hooks

from .measuring import LocalTarget
from .remote import Reply, Request, Station, died, error_text, hung

MAX_STEPS = 4096  # steps fed to vLLM before a shape it would not form is given up


def sequential(layout: BatchLayout) -> Schedule:
    """The policy the tuning engine serves with: vLLM's own graph for every step."""
    return Schedule()


@dataclass(frozen=True, slots=True)
class Limits:
    """What the tuning engine is started with: the step's token budget, requests, sequence length."""

    tokens: int
    requests: int
    model_len: int

    def covers(self, other: "Limits") -> bool:
        return self.tokens >= other.tokens and self.requests >= other.requests and self.model_len >= other.model_len

    def union(self, other: "Limits") -> "Limits":
        return Limits(max(self.tokens, other.tokens), max(self.requests, other.requests),
                      max(self.model_len, other.model_len))


def kv_cache_bytes(folder: str, dtype: str, limits: Limits) -> int | None:
    """A KV cache holding every request at the full sequence length (twice over, for vLLM's block
    rounding), not the machine's memory vLLM takes by default; None (vLLM's default) for a config
    that does not say its sizes."""
    import json

    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        per_token = 2 * int(cfg["num_hidden_layers"]) * int(cfg.get("num_key_value_heads") or heads) * head_dim
    except (OSError, ValueError, KeyError, TypeError):
        return None
    element = torch.empty(0, dtype=getattr(torch, dtype, torch.float32)).element_size()
    return max(2 * per_token * element * limits.requests * (limits.model_len + 64), 2**26)


def limits_for(w: Workload) -> Limits:
    """A step budget holding the whole step (decodes and every prefill chunk at once), with room
    for the decode requests' prompts to be prefilled in a few steps."""
    tokens = max(256, 1 << (w.num_tokens - 1).bit_length())
    return Limits(tokens=tokens, requests=max(w.num_decode + w.num_prefill, 1),
                  model_len=max(w.context_len, w.chunk if w.prefill_tokens else 0) + 64)


@dataclass(kw_only=True)
class KeptStep:
    """One live step of vLLM's, kept to run again: its graph runner, inputs, batch and context."""

    runner: Any  # steps.StepRunner
    inputs: tuple
    layout: BatchLayout
    context_len: int
    ctx: Any  # vLLM's ForwardContext of the step
    metadata: dict  # what vLLM built for the whole step (copied)
    slots: dict | None
    attention: hooks.StepAttention  # the step's CommonAttentionMetadata per group (copied): nano-batches' metadata
    output: torch.Tensor | None = None  # what vLLM's own graph returned for the step

    def whole(self):
        return hooks.replayed_context(self.ctx, self.metadata, self.slots)

    def case(self, name: str) -> Case:
        # per nano-batch slot: the request range its builder last built metadata for, and that
        # metadata (a slot's builder may keep state of its last build: rebuilt when its range changes)
        built: dict[int, tuple[tuple[int, int], tuple]] = {}
        whole_range = (0, self.layout.num_requests)

        def nano_metadata(nano: int, r0: int, r1: int):
            if (r0, r1) == whole_range:
                return self.whole()
            have = built.get(nano)
            if have is None or have[0] != (r0, r1):
                tokens = self.attention.tokens(r0, r1)
                have = built[nano] = ((r0, r1), (self.attention.nano(nano, r0, r1), hooks.nano_slots(self.slots, tokens)))
            return hooks.replayed_context(self.ctx, *have[1])

        case = self.runner.case(self.inputs, self.layout, nano_metadata, model=_Replayed(self.runner.gm, self.whole))
        case.name = name
        case.sequential = _Replayed(self.runner.sequential, self.whole)  # vLLM's compiled graph, as served
        return case


class _Replayed:
    """A call of the kept step's whole graph inside its forward context: eagerly (the reference),
    or vLLM's compiled graph (what a sequential step runs when serving)."""

    def __init__(self, gm, whole: Callable) -> None:
        self.gm, self.whole = gm, whole

    def __call__(self, *inputs):
        with self.whole():
            return self.gm(*inputs)


class Engine:
    """vLLM serving `folder`, driven step by step from this process (its engine core here:
    VLLM_ENABLE_V1_MULTIPROCESSING=0) while the model runs in vLLM's own worker process, bound
    to its CPU threads as when serving (the multiprocessing executor), with the plugin on and
    every step sequential. The kept step and its measurements live in the worker (TuningWorker,
    reached by vLLM's collective_rpc)."""

    def __init__(self, folder: str, dtype: str, limits: Limits) -> None:
        self.folder, self.dtype, self.limits = folder, dtype, limits
        self.live: list[str] = []  # the requests of the kept step: aborted when the next is kept
        self._ids = 0
        from vllm import LLM

        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_AOT_COMPILE": "0",
               ENV_POLICY: f"{__name__}:sequential", ENV_SCHEDULES: None}
        with _env(env):  # the worker process inherits them as it starts
            self.llm = LLM(model=folder, skip_tokenizer_init=True, dtype=dtype, max_model_len=limits.model_len,
                           max_num_batched_tokens=limits.tokens, max_num_seqs=limits.requests,
                           enable_chunked_prefill=True, enable_prefix_caching=False, seed=0,
                           kv_cache_memory_bytes=kv_cache_bytes(folder, dtype, limits),
                           distributed_executor_backend="mp", worker_extension_cls=f"{__name__}.TuningWorker")
        self.vocab = int(self.llm.llm_engine.model_config.get_vocab_size())
        why = self.rpc("dynaflow_ready")
        if why:
            self.close()
            raise ValueError(f"model 'vllm:{folder}': {why}; it cannot be tuned here.")

    def rpc(self, method: str, *args):
        """A TuningWorker method run in vLLM's worker (driving the engine: keeping a step)."""
        return self.llm.collective_rpc(method, args=args)[0]

    def call(self, request: Request, timeout_s: float | None) -> Reply:
        """A request of tuner/remote.py's protocol, answered by the worker's Station. vLLM's worker
        failing or not answering within `timeout_s` (vLLM's collective_rpc timeout) is WorkerLost."""
        try:
            return self.llm.collective_rpc("dynaflow_call", timeout=timeout_s, args=(request,))[0]
        except TimeoutError:
            raise hung(f"vLLM's worker did not answer within {timeout_s:g} s; engine restarted") from None
        except Exception as e:  # noqa: BLE001 - the Station never raises: the worker (or vLLM) failed
            raise died(f"vLLM's worker failed ({error_text(e)}); engine restarted") from None

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def _add(self, prompt_len: int, max_tokens: int) -> str:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._ids += 1
        rid = f"dynaflow-tune-{self._ids}"
        ids = [(7 * self._ids + 13 * j) % (self.vocab - 1) + 1 for j in range(prompt_len)]
        self.llm.llm_engine.add_request(rid, TokensPrompt(prompt_token_ids=ids),
                                        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        self.live.append(rid)
        return rid

    def keep(self, w: Workload) -> dict:
        """Feed requests until vLLM forms a step of `w`'s shape; the worker keeps that step.
        Returns what the worker says of it (its requests' tokens, its longest sequence)."""
        engine = self.llm.llm_engine
        if self.live:
            engine.abort_request(self.live)
            self.live = []
            while engine.has_unfinished_requests():
                engine.step()
        want = sorted((1,) * w.num_decode + (w.chunk,) * w.num_prefill)
        self.rpc("dynaflow_arm", None)
        if w.num_decode:
            # prompts whose sequences end within (context/2, context] at the kept step, after the
            # steps their prefills take at this budget
            ahead = math.ceil(w.num_decode * w.context_len / self.limits.tokens) + 2
            prompt = max(1, w.context_len - ahead)
            for _ in range(w.num_decode):
                self._add(prompt, self.limits.model_len - prompt)
            for _ in range(MAX_STEPS):  # until every decode request decodes
                engine.step()
                if self.rpc("dynaflow_seen") == (1,) * w.num_decode:
                    break
        for _ in range(w.num_prefill):  # alive after the kept step too: their cache blocks stay theirs
            self._add(w.chunk, self.limits.model_len - w.chunk)
        self.rpc("dynaflow_arm", want)
        engine.step()
        kept = self.rpc("dynaflow_kept")
        if kept is None:
            last = self.rpc("dynaflow_seen") or ()
            raise ValueError(f"vLLM formed no step of {w.key}'s shape ({w.num_decode} decode request(s) and "
                             f"{w.num_prefill} prefill chunk(s) of {w.chunk} tokens): its last step held requests of "
                             f"{list(last)[:12]} tokens.")
        return kept


class TuningWorker:
    """Mixed into vLLM's worker (`worker_extension_cls`): what the tuner asks of the process the
    model runs in, over vLLM's collective_rpc: keeping a step (dynaflow_arm, _seen, _kept), then
    measuring on it through tuner/remote.py's protocol (dynaflow_call: a Station)."""

    def dynaflow_ready(self) -> str | None:
        if RUNNERS:
            return None
        return f"vLLM runs with {hooks.UNCOVERED[0]}" if hooks.UNCOVERED else "vLLM compiled no graph the plugin could cut"

    def dynaflow_arm(self, want: list[int] | None) -> None:
        """Watch the steps (their requests' tokens: dynaflow_seen); keep the next one holding `want`."""
        runner = RUNNERS[-1]
        _WORKER.update(seen=None, kept=None)
        _STATION.close()  # its Bench ran on the last kept step

        def capture(args, attention, metadata, slots, layout, context):
            _WORKER["seen"] = layout.request_tokens
            if want is None or _WORKER["kept"] is not None or sorted(layout.request_tokens) != want:
                return None
            ctx, md, sl = hooks.kept_step(metadata, slots)
            inputs = tuple(a.clone() if k == "rows" else a for a, k in zip(args, runner.kinds))
            step = _WORKER["kept"] = KeptStep(runner=runner, inputs=inputs, layout=layout, context_len=context,
                                              ctx=ctx, metadata=md, slots=sl, attention=attention.kept())
            return lambda out: setattr(step, "output", out.clone() if isinstance(out, torch.Tensor) else None)

        runner.capture = capture

    def dynaflow_seen(self) -> tuple[int, ...] | None:
        return _WORKER.get("seen")

    def dynaflow_kept(self) -> dict | None:
        RUNNERS[-1].capture = None
        step = _WORKER.get("kept")
        return None if step is None else {"request_tokens": step.layout.request_tokens, "context_len": step.context_len}

    def dynaflow_driver(self, pid: int) -> None:
        """The tuner driving vLLM's engine core spins while it waits on this worker: its CPU time
        is the tuning's own work, not contention (telemetry.count_as_own)."""
        telemetry.count_as_own([pid])

    def dynaflow_call(self, request: Request) -> Reply:
        return _STATION.handle(request)


_WORKER: dict[str, Any] = {}  # in vLLM's worker process: the armed capture's view, the kept step


def kept_step_target(workload: Workload, config: MeasureConfig) -> LocalTarget:
    """The Station's target in vLLM's worker: a Bench on the kept step (reference, counts, peaks,
    tolerance), named as the workload's model."""
    step = _WORKER.get("kept")
    if step is None:
        raise ValueError("no step is kept in vLLM's worker (dynaflow_arm, then a step of the shape)")
    case = step.case(workload.model)
    check_replay(step, case)
    return LocalTarget(None, None, bench=Bench(case=case, config=config))


_STATION = Station(kept_step_target)


@contextmanager
def _env(values: dict[str, str | None]):
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


_ENGINE: list[Engine] = []  # this process's tuning engine (one at a time)
_RESERVED: list[Limits] = []  # limits the coming workloads need: one engine start serves them all


def reserve(workloads) -> None:
    """Start the engine with room for every one of `workloads` (vllm: models), not once each."""
    for w in workloads:
        _RESERVED[:] = [limits_for(w).union(_RESERVED[0]) if _RESERVED else limits_for(w)]


def start(w: Workload) -> tuple[Engine, dict]:
    """The process's engine for `w`'s model, with a step of `w`'s shape kept in its worker."""
    folder = w.model.removeprefix("vllm:")
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"model {w.model!r}: {folder!r} is not a model folder (no config.json in it): give the "
                         "folder vLLM serves, as 'vllm:<folder>'.")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ValueError(f"model {w.model!r} is measured inside vLLM, which is not installed in this Python: "
                         "`sh scripts/setup.sh --vllm` installs it (vLLM's CPU build here).") from None
    try:
        hooks.check()
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    engine = engine_for(folder, w.dtype, limits_for(w))
    return engine, engine.keep(w)


def discard(engine: Engine) -> None:
    """An engine whose worker died or hung: shut down, so the next start() makes a fresh one."""
    if engine in _ENGINE:
        _ENGINE.remove(engine)
    try:
        engine.close()
    except Exception:  # noqa: BLE001 - its worker is gone already
        pass


def engine_for(folder: str, dtype: str, limits: Limits) -> Engine:
    """The process's engine for (folder, dtype), restarted with larger limits when a workload needs them."""
    if _ENGINE:
        e = _ENGINE[0]
        if e.folder == folder and e.dtype == dtype and e.limits.covers(limits):
            return e
        limits = limits.union(e.limits) if e.folder == folder and e.dtype == dtype else limits
        e.close()
        _ENGINE.clear()
    limits = limits.union(_RESERVED[0]) if _RESERVED else limits
    _ENGINE.append(Engine(folder, dtype, limits))
    return _ENGINE[0]


def check_replay(step: KeptStep, case: Case) -> None:
    """The kept step, replayed through its graph, gives what vLLM's own graph gave in the step
    (within the rounding inductor's fusions make): else the step cannot be tuned on."""
    if step.output is None:
        return
    with torch.no_grad():
        out = case.model(*case.inputs)
    out = out if isinstance(out, torch.Tensor) else out[0]
    scale = float(step.output.float().pow(2).mean().sqrt()) or 1.0
    err = float((out.float() - step.output.float()).pow(2).mean().sqrt()) / scale
    if not err < 1e-3:
        raise ValueError(f"vLLM's step, replayed outside vLLM, differs from what vLLM computed (relative rms error "
                         f"{err:.2g}): this model's graph reads state the plugin does not keep; it cannot be tuned.")

