"""Search spaces never propose an infeasible schedule, on any hardware; the registry finds new ones."""
import dataclasses
import optuna
import pytest

from dynaflow import search_spaces
from dynaflow.runtime import Hardware, detect
from dynaflow.runtime.executor import check_shares
from dynaflow.runtime.plan import check_order
from fakes import H100, tiny_context

A100 = Hardware(kind="cuda", name="NVIDIA A100-SXM4-80GB", arch="8.0", num_sms=108, memory_bytes=80 * 2**30)
SMALL_BATCH = dict(num_decode=3, context_len=8, prefill_tokens=0)
BIG_BATCH = dict(num_decode=96, context_len=8, prefill_tokens=64, prefill_chunk=32)


@pytest.mark.parametrize("hardware", [H100, A100, detect("cpu")], ids=["h100", "a100", "cpu"])
@pytest.mark.parametrize("batch", [SMALL_BATCH, BIG_BATCH], ids=["small", "big"])
@pytest.mark.parametrize("space", sorted(search_spaces.registry()))
def test_every_proposal_is_feasible(space, hardware, batch):
    ctx = tiny_context(hardware, **batch)
    suggest = search_spaces.get_space(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    granularity = 8 if hardware.arch == "9.0" else 2 if hardware.kind == "cuda" else 1
    for _ in range(40):
        trial = study.ask()
        s = suggest(trial, ctx)
        ranges = ctx.layout.request_ranges(s.split_unit, s.split_sizes)  # raises if splits are infeasible
        assert len(ranges) == s.num_nano
        if s.order:
            check_order(s.order, ctx.graph, s.num_nano)
        check_shares(s, hardware.num_sms)
        assert all(x.sm_share is None or x.sm_share % granularity == 0 for x in s.streams)
        if s.split_sizes and ctx.split_step > 1:
            assert all(b in ctx.boundaries() for b in _ends(ranges))
        study.tell(trial, 1.0)


def _ends(ranges):
    return [r1 for _, r1 in ranges]


def test_registry_finds_a_new_module_without_edits(tmp_path, monkeypatch):
    (tmp_path / "everything_split.py").write_text(
        "from dynaflow.runtime import Schedule\nname = 'everything-split'\n"
        "def suggest(trial, ctx):\n    return Schedule(split_sizes=(1,) * ctx.layout.num_requests)\n")
    monkeypatch.setattr(search_spaces, "__path__", [*search_spaces.__path__, str(tmp_path)])
    assert "everything-split" in search_spaces.registry()
    assert {"sequential", "dbo", "nanoflow"} <= set(search_spaces.registry())


def test_unknown_space_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"space must be one of \['dbo', 'nanoflow', 'sequential'\], but got 'tbo'"):
        search_spaces.get_space("tbo")


@pytest.mark.parametrize("groups", [16, 10, 3, 2])
def test_the_handwritten_overlap_fits_the_groups_the_driver_grants(groups):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "handwritten_overlap.py"
    spec = importlib.util.spec_from_file_location("handwritten_overlap", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    hw = dataclasses.replace(H100, sm_step=8, sm_groups=groups)
    schedule = bench.handwritten_schedule(tiny_context(hw), cuda_graph=True)
    shares = [s.sm_share for s in schedule.streams]
    assert None not in shares and sum(shares) <= groups * 8 and all(s % 8 == 0 for s in shares)
    assert shares[0] >= shares[1]  # the compute stream gets the larger share


def test_a_network_op_has_a_stream_in_every_mapping_and_an_unknown_resource_is_refused():
    """A collective (resource class network) is routed like a copy; a resource no class names is
    one error naming the op (it was a KeyError deep in the space)."""
    from dynaflow.runtime.graph import Op, OpGraph, Resource
    from dynaflow.search_spaces.nanoflow import MAPPINGS

    ctx = tiny_context()
    ops = list(ctx.graph.ops)
    ops[1] = dataclasses.replace(ops[1], resource="network")
    assert ops[1].resource is Resource.NETWORK
    ctx = dataclasses.replace(ctx, graph=OpGraph(ops=tuple(ops), module=ctx.graph.module,
                                                 writes_output=ctx.graph.writes_output))
    assert {route(Resource.NETWORK, 0) for route in MAPPINGS.values()} == {0, 1, 2}  # one, rest, copy stream
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        search_spaces.get_space("nanoflow")(study.ask(), ctx)
    with pytest.raises(ValueError, match=r"op 'x': resource must be one of \['compute', 'memory', 'copy', 'network'\]"):
        Op(name="x", deps=(), resource="disk")
