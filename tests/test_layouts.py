"""Inputs and outputs batched on any dim: the layout says which, a disagreement is one error
before any run, and a baseline wrong by orders of magnitude blames the layout, not the tolerance."""
import dataclasses

import pytest
import torch
from torch import nn

from dynaflow.runtime import Bench, Case, MeasureConfig, Measurement, Schedule, StreamSpec, TrialOutcome
from dynaflow.runtime.batch import BatchLayout
from dynaflow.tuner.config import TuneConfig, TuneError
from dynaflow.tuner.study import ensure_baseline, open_study
from dynaflow.tuner.session import study_config
from fakes import FakeTarget, split_landscape, tiny_context
from test_tuner import W


class SeqFirst(nn.Module):
    """[seq, batch, hidden] in and out (torch.nn.MultiheadAttention's default), mixing over seq
    only: batch rows are independent, but on dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, scale):
        return x + torch.softmax(self.proj(x), dim=0) * scale


def _case(layout: BatchLayout) -> Case:
    torch.manual_seed(0)
    x, scale = torch.randn(5, 6, 8), torch.rand(1, 6, 1)  # seq 5, batch 6
    return Case(model=SeqFirst().eval(), inputs=(x, scale), layout=layout, name="seq_first")


def test_an_input_batched_on_another_dim_than_declared_is_one_error_before_any_run():
    with pytest.raises(ValueError, match=r"input 0 has 5 on dim 0 \(shape \[5, 6, 8\]\), but the layout batches it by "
                                         r"'requests' on dim 0, which has 6 in this batch: is the batch on another dim"):
        Bench(case=_case(BatchLayout.uniform(6, 2)), config=MeasureConfig(warmup=0, repeats=1))


def test_the_output_is_checked_too():
    layout = dataclasses.replace(BatchLayout.uniform(6, 2), input_dims=(1, 1))  # the output left on dim 0
    with pytest.raises(ValueError, match=r"the output has 5 on dim 0 .* on dim 0, which has 6"):
        Bench(case=_case(layout), config=MeasureConfig(warmup=0, repeats=1))


@pytest.mark.parametrize("sizes", [(3, 3), (1, 5), (2, 2, 2), (1, 1, 4)])
def test_a_batch_on_dim_1_splits_into_views_and_equals_the_model(sizes):
    layout = dataclasses.replace(BatchLayout.uniform(6, 2), input_dims=(1, 1), output_dim=1)
    bench = Bench(case=_case(layout), config=MeasureConfig(warmup=0, repeats=1))
    for streams in (1, 2):
        m = bench.measure(Schedule(split_sizes=sizes, streams=(StreamSpec(),) * streams))
        assert m.ok, m.summary()
    compiled = bench.executor.compile(Schedule(split_sizes=sizes))
    try:
        assert torch.allclose(compiled(), _case(layout).model(*_case(layout).inputs), rtol=1e-6, atol=1e-6)
    finally:
        compiled.close()


def test_bad_dims_name_the_field():
    with pytest.raises(ValueError, match="input_dims has 1 entries but input_axes has 2"):
        dataclasses.replace(BatchLayout.uniform(6, 2), input_dims=(1,))
    with pytest.raises(ValueError, match="input_dims, output_dim and output_dims must be ints >= 0"):
        dataclasses.replace(BatchLayout.uniform(6, 2), output_dim=-1)


class WrongBaseline(FakeTarget):
    def __init__(self, ratio: float) -> None:
        super().__init__(tiny_context(), split_landscape)
        self.ratio = ratio

    def measure(self, schedule, **kw):
        return Measurement(outcome=TrialOutcome.INCORRECT, error_ratio=self.ratio,
                           message=f"output differs from the sequential reference: error {self.ratio:.2f}x tolerance")


@pytest.mark.parametrize("ratio, advice", [
    (3.8e9, "that is no rounding error: the model's rows are not independent, or the layout is wrong (is the batch "
            "on another dim"),
    (1.7, "the sequential run differs from itself beyond the tolerance: loosen it with --rtol/--atol"),
])
def test_a_failing_baseline_advises_by_how_wrong_it_is(tmp_path, ratio, advice):
    cfg = TuneConfig(workloads=(W,), storage=f"sqlite:///{tmp_path}/s.db", store_root=tmp_path, progress=False)
    with pytest.raises(TuneError) as info:
        ensure_baseline(open_study("s", study_config(cfg)), WrongBaseline(ratio), cfg.trial_timeout_s, log=lambda *a: None)
    assert advice in str(info.value)
    assert ("loosen it" in str(info.value)) == (ratio < 1e3)
