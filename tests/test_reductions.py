"""The derived tolerance counts every reduction an op makes, so convolutions and norms are never
judged INCORRECT when split (issue 25's false INCORRECT: 12 of 20 correct schedules), while a
schedule that feeds a nano-batch the wrong rows is still caught."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dynaflow.runtime import Bench, Case, MeasureConfig, Schedule, StreamSpec
from dynaflow.runtime.batch import BatchLayout
from dynaflow.runtime.counters import count


@pytest.mark.parametrize("module, x, length", [
    (nn.Conv1d(8, 4, 3), (2, 8, 10), 8 * 3),  # in-channels x kernel
    (nn.Conv2d(8, 4, (3, 5), groups=2), (2, 8, 10, 10), 4 * 15),  # per group
    (nn.ConvTranspose1d(8, 4, 3), (2, 8, 10), 8 * 3),
    (nn.LayerNorm(24), (3, 24), 24),
    (nn.LayerNorm((4, 6)), (3, 4, 6), 24),
    (nn.GroupNorm(2, 8), (3, 8, 5), 4 * 5),  # channels per group x spatial
    (nn.RMSNorm(20), (3, 20), 20),
    (nn.Softmax(-1), (3, 33), 33),
], ids=["conv1d", "conv2d-groups", "conv-transposed", "layer-norm", "layer-norm-2d", "group-norm", "rms-norm",
        "softmax"])
def test_each_kind_of_reduction_is_counted(module, x, length):
    _, counts = count(module.eval(), torch.randn(*x))
    assert counts.max_reduction == length


@pytest.mark.parametrize("fn, length", [(lambda x: x.sum(-1), 40), (lambda x: x.mean((1, 2)), 40 * 3),
                                        (lambda x: x.var(1), 3), (lambda x: torch.logsumexp(x, -1), 40)],
                         ids=["sum", "mean", "var", "logsumexp"])
def test_sums_means_and_variances_count_their_reduced_extent(fn, length):
    class F(nn.Module):
        def forward(self, x):
            return fn(x)

    _, counts = count(F(), torch.randn(2, 3, 40))
    assert counts.max_reduction == length


class Stack(nn.Module):
    """A random stack of row-independent layers on [rows, channels, length]."""

    def __init__(self, kinds: list[str], channels: int, length: int) -> None:
        super().__init__()
        layers = []
        for kind in kinds:
            layers.append({"conv": lambda: nn.Conv1d(channels, channels, 3, padding=1),
                           "conv-groups": lambda: nn.Conv1d(channels, channels, 5, padding=2, groups=2),
                           "group-norm": lambda: nn.GroupNorm(2, channels),
                           "layer-norm": lambda: nn.LayerNorm(length),
                           "rms-norm": lambda: nn.RMSNorm(length),
                           "softmax": lambda: nn.Softmax(-1),
                           "gelu": nn.GELU}[kind]())
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)  # residuals keep the values from collapsing
        return x


KINDS = ["conv", "conv-groups", "group-norm", "layer-norm", "rms-norm", "softmax", "gelu"]


def _bench(kinds, rows, channels, length, seed) -> Bench:
    torch.manual_seed(seed)
    model = Stack(kinds, channels, length).eval()
    x = torch.randn(rows, channels, length) * 3
    case = Case(model=model, inputs=(x,), layout=BatchLayout.uniform(rows, 1), name="stack")
    return Bench(case=case, config=MeasureConfig(warmup=0, repeats=1))


def _schedules(rows: int, draw) -> list[Schedule]:
    out = []
    for _ in range(10):
        n = draw(st.integers(2, min(4, rows)))
        cuts = sorted(draw(st.sets(st.integers(1, rows - 1), min_size=n - 1, max_size=n - 1)))
        sizes = tuple(b - a for a, b in zip([0, *cuts], [*cuts, rows]))
        streams = (StreamSpec(),) * draw(st.integers(1, 2))
        out.append(Schedule(split_sizes=sizes, streams=streams, label=f"split{sizes}x{len(streams)}"))
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.data())
def test_no_correct_schedule_of_a_random_conv_norm_stack_is_judged_incorrect(data):
    """25 random stacks x 10 random splits each: 250 schedules, zero false INCORRECT. Counting
    GEMMs, attention and softmax only (before), stacks of convolutions and norms failed 29 of 240
    correct splits on this machine: a split changes the kernels' blocking, hence the rounding."""
    kinds = data.draw(st.lists(st.sampled_from(KINDS), min_size=2, max_size=6))
    rows = data.draw(st.integers(4, 12))
    bench = _bench(kinds, rows, data.draw(st.sampled_from([8, 16, 32])), data.draw(st.integers(6, 40)),
                   data.draw(st.integers(0, 99)))
    for schedule in _schedules(rows, data.draw):
        compiled = bench.executor.compile(schedule)
        try:
            error = bench.check(compiled())
        finally:
            compiled.close()
        assert error <= 1.0, (kinds, schedule.label, error, bench.tolerance)


def test_a_stack_fed_the_wrong_rows_is_still_caught(monkeypatch):
    """Each nano-batch after the first reads its rows one too early: a dependency on the right
    rows broken. The bound that admits every correct split still refuses this one."""
    honest = BatchLayout.split_inputs

    def off_by_one(self, inputs, r0, r1):
        views = honest(self, inputs, r0, r1)
        return views if r0 == 0 else honest(self, inputs, r0 - 1, r1 - 1)

    for seed, kinds in enumerate([["conv", "group-norm"], ["layer-norm", "softmax", "conv-groups"],
                                  ["rms-norm", "gelu", "conv"]]):
        bench = _bench(kinds, 8, 8, 16, seed)
        assert bench.measure(Schedule(split_sizes=(4, 4))).ok
        monkeypatch.setattr(BatchLayout, "split_inputs", off_by_one)
        m = bench.measure(Schedule(split_sizes=(4, 4)))
        monkeypatch.setattr(BatchLayout, "split_inputs", honest)
        assert m.outcome.value == "incorrect" and m.error_ratio > 10, (kinds, m.summary())
