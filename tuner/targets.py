"""Which target measures a workload: the registered integrations (a serving engine's models,
by prefix), a tensor-parallel group, or this process. The Target itself, and the paired round,
are tuner/measuring.py's; measuring in another process is tuner/remote.py's protocol."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

from dynaflow.runtime import MeasureConfig, Workload

from .measuring import LocalTarget, Target
from .remote import RemoteTarget, Reply, Request

VLLM_GRACE_S = 30.0  # beyond a trial's limit, before vLLM's worker is declared hung


class VllmTarget(RemoteTarget):
    """Measures a `vllm:<folder>` model where vLLM serves it: in vLLM's worker process, on a step
    of the workload's shape that vLLM's scheduler formed and the plugin kept (tuner/vllm_engine.py).
    The transport is vLLM's collective_rpc; a worker that fails or hangs costs one trial, and the
    engine is started again (and the step kept again) for the next."""

    def __init__(self, workload: Workload, config: MeasureConfig) -> None:
        self.workload = workload
        self.engine = None
        super().__init__(workload, config)

    def connect(self) -> None:
        from . import vllm_engine

        self.engine, self.step = vllm_engine.start(self.workload)
        self.engine.rpc("dynaflow_driver", os.getpid())  # the driver's spinning: not contention

    def send(self, request: Request, timeout_s: float | None) -> Reply:
        return self.engine.call(request, None if timeout_s is None else timeout_s + VLLM_GRACE_S)

    def lost(self) -> None:
        """Its worker died or hung: the engine goes (the next trial starts one)."""
        from . import vllm_engine

        engine, self.engine = self.engine, None
        if engine is not None:
            vllm_engine.discard(engine)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Integration:
    """How the tuner measures the models of one prefix (a serving engine's): the target it
    measures them on, what starts once before the first target (an engine holding every
    workload's step), and why a Ray pool cannot run them (None: it can)."""

    target: Callable[[Workload, MeasureConfig], Target]
    reserve: Callable[[list[Workload]], None] | None = None
    no_pool: str | None = None


INTEGRATIONS: dict[str, Integration] = {}  # model prefix -> its integration; other models: LocalTarget


def register_integration(prefix: str, integration: Integration) -> None:
    INTEGRATIONS[prefix] = integration


def integration_of(workload: Workload) -> Integration | None:
    return next((i for p, i in INTEGRATIONS.items() if workload.model.startswith(p)), None)


def _reserve_vllm(workloads: list[Workload]) -> None:
    from . import vllm_engine
    vllm_engine.reserve(workloads)


register_integration("vllm:", Integration(
    target=VllmTarget, reserve=_reserve_vllm,
    no_pool="vllm: models are measured in the one vLLM engine this process drives; --workers (a Ray pool) is not "
            "supported for them."))


def reserve(workloads) -> None:
    """Before the first target: what each integration starts once for all its workloads."""
    for prefix, integration in INTEGRATIONS.items():
        mine = [w for w in workloads if w.model.startswith(prefix)]
        if mine and integration.reserve is not None:
            integration.reserve(mine)


def target_for(workload: Workload, config: MeasureConfig) -> Target:
    """Where a workload is measured: its integration's target (vLLM's worker for a `vllm:` model),
    a group of rank processes at tensor parallelism > 1 (tuner/tp.py), else this process."""
    if (integration := integration_of(workload)) is not None:
        return integration.target(workload, config)
    if workload.tp > 1:
        from .tp import TPTarget
        return TPTarget(workload, config)
    return LocalTarget(workload, config)


