"""Models returning a flat tuple (or list) of batched tensors: each element joined on its own batch
dim, verified element by element; an element that is not batched is one error naming it."""
import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
from torch import nn

from dynaflow.runtime import Bench, Case, MeasureConfig, Schedule, StreamSpec
from dynaflow.runtime.measure import Tolerance
from dynaflow.runtime.batch import BatchLayout
from dynaflow.runtime.schedule import Step
from dynaflow.runtime.serving import ScheduledModule

CONFIG = MeasureConfig(warmup=0, repeats=1)


class RouterLayer(nn.Module):
    """An MoE-like layer: (hidden out, router logits), the second of another width."""

    def __init__(self, dim: int = 8, experts: int = 3, as_list: bool = False) -> None:
        super().__init__()
        self.router, self.up, self.down = nn.Linear(dim, experts), nn.Linear(dim, 16), nn.Linear(16, dim)
        self.as_list = as_list

    def forward(self, x):
        logits = self.router(x)
        out = x + self.down(torch.relu(self.up(x))) * torch.softmax(logits, -1)[:, :1]
        return [out, logits] if self.as_list else (out, logits)


class SeqStats(nn.Module):
    """Returns a [batch, dim] output and a [seq, batch] one: the batch on dim 0 and on dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # x: [batch, seq, 8]
        h = self.proj(x)
        return h.mean(1), h.norm(dim=-1).transpose(0, 1)


class WithLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        h = self.proj(x)
        return h, h.pow(2).mean()  # an aux loss over the whole batch: not batched


def _case(model: nn.Module, x: torch.Tensor, layout: BatchLayout | None = None) -> Case:
    return Case(model=model.eval(), inputs=(x,), layout=layout or BatchLayout.uniform(x.shape[0], 1), name="tuple_model")


def _eager(case: Case):
    with torch.no_grad():
        return case.model(*case.inputs)


def _schedules(ops: tuple[str, ...]) -> list[Schedule]:
    two = tuple(Step(op=op, nano=b, stream=b) for op in ops for b in (0, 1))
    return [Schedule(), Schedule(split_sizes=(3, 3)), Schedule(split_sizes=(1, 5)), Schedule(split_sizes=(2, 2, 2)),
            Schedule(split_sizes=(2, 4), streams=(StreamSpec(), StreamSpec()), order=two)]


@pytest.mark.parametrize("as_list", [False, True])
def test_a_tuple_output_joins_each_element_and_equals_the_model(as_list):
    torch.manual_seed(0)
    case = _case(RouterLayer(as_list=as_list), torch.randn(6, 8))
    want = _eager(case)
    bench = Bench(case=case, config=CONFIG)
    for schedule in _schedules(bench.executor.graph.names):
        m = bench.measure(schedule)
        assert m.ok, (schedule.label, m.summary())
        compiled = bench.executor.compile(schedule)
        try:
            got = compiled()
            assert type(got) is type(want) and len(got) == 2
            for g, w in zip(got, want):
                assert g.shape == w.shape
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
        finally:
            compiled.close()


def test_elements_batched_on_different_dims():
    torch.manual_seed(0)
    x = torch.randn(6, 5, 8)
    layout = dataclasses.replace(BatchLayout.uniform(6, 1), output_dims=(0, 1))
    case = _case(SeqStats(), x, layout)
    bench = Bench(case=case, config=CONFIG)
    for sizes in [(3, 3), (1, 5), (2, 2, 2)]:
        compiled = bench.executor.compile(Schedule(split_sizes=sizes))
        try:
            got = compiled()
            for g, w in zip(got, _eager(case)):
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
        finally:
            compiled.close()
        assert bench.measure(Schedule(split_sizes=sizes)).ok


def test_an_element_on_another_dim_than_declared_is_one_error_naming_it():
    torch.manual_seed(0)
    case = _case(SeqStats(), torch.randn(6, 5, 8))  # output_dims left at 0 for both
    with pytest.raises(ValueError, match=r"output element 1 has 5 on dim 0 \(shape \[5, 6\]\).*output_dims="):
        Bench(case=case, config=CONFIG)


def test_an_unbatched_element_is_refused_by_name():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"output element 1 has only 0 dim\(s\).*not batched \(a loss summed over the "
                                         r"batch\) cannot be split"):
        Bench(case=_case(WithLoss(), torch.randn(6, 8)), config=CONFIG)


def test_non_tensor_elements_and_wrong_output_dims_are_errors():
    class Odd(nn.Module):
        def forward(self, x):
            return x * 2, None

    with pytest.raises(ValueError, match=r"must return a tensor or a flat tuple/list of tensors, but returned a "
                                         r"tuple holding NoneType"):
        Bench(case=_case(Odd(), torch.randn(6, 8)), config=CONFIG)
    layout = dataclasses.replace(BatchLayout.uniform(6, 1), output_dims=(0, 0, 0))
    with pytest.raises(ValueError, match=r"output_dims has 3 entries but the model returned 2 outputs"):
        Bench(case=_case(RouterLayer(), torch.randn(6, 8), layout), config=CONFIG)
    with pytest.raises(ValueError, match=r"output_dims must be ints >= 0"):
        dataclasses.replace(BatchLayout.uniform(6, 1), output_dims=(0, -1))


def test_the_tolerance_takes_the_worst_element_so_one_wrong_element_fails():
    ref = (torch.ones(4, 3), torch.full((4, 2), 100.0))
    tol = Tolerance.derive(torch.float32, reduction=8, depth=2, reference=ref)
    assert tol.error(tuple(t.clone() for t in ref), ref) == 0.0
    wrong_small = (ref[0] * 1.5, ref[1].clone())  # the small element wrong, the large one right
    assert tol.error(wrong_small, ref) > 1
    assert tol.error((ref[0],), ref) == math.inf  # an element missing
    assert tol.error(ref[0], ref) == math.inf  # one tensor for a tuple
    assert tol.error((ref[0], ref[1][:2]), ref) == math.inf  # a shape that differs


def test_scheduled_module_returns_tuples_and_outputs_of_another_width():
    torch.manual_seed(0)

    class Narrower(nn.Module):  # output [rows, 4] from input [rows, 8]: no residual add to write into
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    x = torch.randn(6, 8)
    for model in (RouterLayer().eval(), Narrower().eval()):
        layer = ScheduledModule(model, lambda layout: Schedule(split_sizes=(2, 4)),
                                layout_of=lambda inputs: BatchLayout.uniform(inputs[0].shape[0], 1))
        with torch.no_grad():
            for _ in range(2):  # the second call reuses the cached plan
                got, want = layer(x), model(x)
                for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                    assert g.shape == w.shape
                    torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
        assert layer.plans.built == 1


class Spread(nn.Module):
    """Returns one element per entry of `dims`: the projected input with its batch moved to that dim."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims
        self.projs = nn.ModuleList(nn.Linear(4, 4) for _ in dims)

    def forward(self, x):  # x: [batch, 3, 4]
        return tuple(torch.movedim(p(x), 0, d) for p, d in zip(self.projs, self.dims))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dims=st.lists(st.integers(0, 2), min_size=1, max_size=3),
       cuts=st.lists(st.integers(1, 6), min_size=1, max_size=4, unique=True))
def test_any_split_of_any_tuple_layout_equals_the_model(dims, cuts):
    torch.manual_seed(0)
    rows = 7
    ends = sorted({c for c in cuts if c < rows}) + [rows]
    sizes = tuple(b - a for a, b in zip([0] + ends[:-1], ends))
    case = _case(Spread(tuple(dims)), torch.randn(rows, 3, 4),
                 dataclasses.replace(BatchLayout.uniform(rows, 1), output_dims=tuple(dims)))
    bench = Bench(case=case, config=CONFIG)
    compiled = bench.executor.compile(Schedule(split_sizes=sizes))
    try:
        got = compiled()
        assert bench.check(got) <= 1
        for g, w in zip(got, _eager(case)):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    finally:
        compiled.close()
