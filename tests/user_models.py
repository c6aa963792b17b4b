"""Models the runtime has no special code for, as a user would write them."""
from __future__ import annotations

import threading
import time

import torch
import torch.fx
from torch import nn

from dynaflow.runtime import BatchLayout, Case, Workload


class GatedBlock(nn.Module):
    """A pre-norm MLP block with a side branch; rows are independent, so any split is valid."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.down = nn.Linear(4 * dim, dim)
        self.gate = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        h = self.down(self.act(self.up(self.norm(x))))
        g = torch.sigmoid(self.gate(x)) * scale
        return x + h * g


PACE_S_PER_ROW = 2e-4


def pace(x: torch.Tensor) -> torch.Tensor:
    """Stands for a device kernel: sleeps in proportion to its rows, releasing the GIL like a kernel
    frees the host. Its time does not depend on how busy the CPU is, so timings of a model built on
    it are steady on a loaded CI machine."""
    time.sleep(PACE_S_PER_ROW * x.shape[0])
    return x


torch.fx.wrap("pace")  # one op in the traced graph, not traced through


class PacedBlock(nn.Module):
    """Two paced 'kernels' around a small MLP: a model whose speed a test can predict."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.up = nn.Linear(dim, dim)
        self.down = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = pace(self.up(x))
        return x + pace(self.down(torch.relu(h)))


# The paced units: a compute unit and a memory unit, each running one 'kernel' at a time (a lock),
# each kernel sleeping a known time: fixed ms + ms per row. Two kernels of one unit on two streams
# serialise; a compute kernel beside a memory kernel does not slow down. Times a test can predict.
PACED_UNITS_MS = {"c1": (1.0, 0.1), "m1": (0.6, 0.05), "c2": (1.0, 0.1), "m2": (0.6, 0.05)}
UNIT_LOCKS = {"compute": threading.Lock(), "memory": threading.Lock()}


def paced_compute(x: torch.Tensor, fixed_ms: float, row_ms: float) -> torch.Tensor:
    with UNIT_LOCKS["compute"]:
        time.sleep((fixed_ms + row_ms * x.shape[0]) / 1e3)
    return x


def paced_memory(x: torch.Tensor, fixed_ms: float, row_ms: float) -> torch.Tensor:
    with UNIT_LOCKS["memory"]:
        time.sleep((fixed_ms + row_ms * x.shape[0]) / 1e3)
    return x


torch.fx.wrap("paced_compute")
torch.fx.wrap("paced_memory")


class ComputeKernel(nn.Module):
    """Classed compute: a small square matmul (about 20 FLOPs per byte, tens of microseconds), then its
    paced time."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.times = PACED_UNITS_MS[name]
        self.a = nn.Parameter(torch.randn(128, 128) / 128, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + (self.a @ self.a)[0, : x.shape[1]] * 0.0
        return paced_compute(x, *self.times)


class MemoryKernel(nn.Module):
    """Classed memory: an elementwise op (a fraction of a FLOP per byte), then its paced time."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.times = PACED_UNITS_MS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return paced_memory(x * 1.0, *self.times)


class PacedUnits(nn.Module):
    """compute -> memory -> compute -> memory, and the residual: a layer of known times."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.m1, self.c2, self.m2 = ComputeKernel("c1"), MemoryKernel("m1"), ComputeKernel("c2"), MemoryKernel("m2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m2(self.c2(self.m1(self.c1(x))))


class BatchNormish(nn.Module):
    """Mixes rows (centres over the batch): nano-batching changes its output."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return x + (h - h.mean(0, keepdim=True))


class NoResidual(nn.Module):
    """Ends in a module call, not an add: the join falls back to a copy."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Noisy(nn.Module):
    """Adds fresh noise on every call: no run equals another, not even the sequential one."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x) + torch.randn_like(x)


def _case(model: nn.Module, rows: int, dim: int, seed: int, extra: tuple = ()) -> Case:
    torch.manual_seed(seed)
    inputs = (torch.randn(rows, dim), *extra)
    return Case(model=model.eval(), inputs=inputs, layout=BatchLayout.uniform(rows, len(inputs)),
                name=type(model).__name__)


def gated_block(w: Workload) -> Case:
    torch.manual_seed(w.seed)
    rows = w.num_decode or 12
    return _case(GatedBlock(), rows, 32, w.seed, extra=(torch.rand(rows, 1),))


def batch_mixing(w: Workload) -> Case:
    torch.manual_seed(w.seed)
    return _case(BatchNormish(), w.num_decode or 8, 16, w.seed)


def no_residual(w: Workload) -> Case:
    torch.manual_seed(w.seed)
    return _case(NoResidual(), w.num_decode or 8, 16, w.seed)


def paced_block(w: Workload) -> Case:
    torch.manual_seed(w.seed)
    return _case(PacedBlock(), w.num_decode or 8, 16, w.seed)


def paced_units(w: Workload) -> Case:
    torch.manual_seed(w.seed)
    return _case(PacedUnits(), w.num_decode or 8, 16, w.seed)


def noisy_block(w: Workload) -> Case:
    return _case(Noisy(), w.num_decode or 8, 16, w.seed)


def not_a_case(w: Workload) -> int:
    return 42


def broken_factory(w: Workload) -> Case:
    raise RuntimeError("the weights folder is empty")


class RoutedBlock(nn.Module):
    """An MoE-style layer returning (hidden, router logits): a tuple of batch-first tensors."""

    def __init__(self, dim: int = 32, experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.router(x)
        h = self.down(torch.relu(self.up(x))) * torch.softmax(logits, -1).amax(-1, keepdim=True)
        return x + h, logits


def routed_block(w: Workload) -> Case:
    return _case(RoutedBlock(), w.num_decode or 12, 32, w.seed)
