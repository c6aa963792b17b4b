"""Schedule as data: validation names the field, the value and the rule; JSON round-trips."""
import json
import random

import pytest

from dynaflow.runtime import Executor, Schedule, Step, StreamSpec, Workload
from schedules import random_schedule


@pytest.mark.parametrize("kwargs, words", [
    (dict(split_unit="bytes"), ["split_unit", "'bytes'", "requests"]),
    (dict(split_sizes=(4, 0)), ["split_sizes", "positive", "[4, 0]" if False else "(4, 0)"]),
    (dict(split_sizes=(2, True)), ["split_sizes", "positive ints"]),
    (dict(streams=()), ["streams", "1..8", "got 0"]),
    (dict(streams=(StreamSpec(),) * 9), ["streams", "got 9"]),
    (dict(cuda_graph="yes"), ["cuda_graph", "bool", "'yes'"]),
    (dict(order=(Step(op="a", nano=1),)), ["nano-batch 1", "1 nano-batch"]),
    (dict(order=(Step(op="a", nano=0, stream=2),)), ["stream 2", "only 1"]),
    (dict(order=(Step(op="a", nano=0), Step(op="a", nano=0))), ["twice"]),
])
def test_invalid_schedule_names_the_field(kwargs, words):
    with pytest.raises(ValueError) as e:
        Schedule(**kwargs)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {e.value}"


@pytest.mark.parametrize("kwargs, words", [
    (dict(sm_share=0), ["sm_share", "positive", "0"]),
    (dict(priority=2), ["priority", "[-3, 0]", "2"]),
])
def test_invalid_stream_names_the_field(kwargs, words):
    with pytest.raises(ValueError) as e:
        StreamSpec(**kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_sequential_is_the_default_value():
    s = Schedule()
    assert s.is_sequential and s.num_nano == 1 and len(s.streams) == 1
    assert Schedule.from_json(s.to_json()) == s


def test_random_schedules_round_trip_exactly():
    ex = Executor(Workload(model="mixtral-tiny", num_decode=5, context_len=8, prefill_tokens=16, prefill_chunk=8).build())
    rng = random.Random(0)
    for _ in range(50):
        s = random_schedule(ex.graph, ex.case.layout, rng)
        text = s.to_json()
        back = Schedule.from_json(text)
        assert back == s and back.to_json() == text


def test_json_accepts_plain_dicts_for_streams_and_steps():
    d = Schedule(split_sizes=(1, 2), streams=(StreamSpec(sm_share=8), StreamSpec())).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Schedule.from_dict(d).streams[0].sm_share == 8


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(schema_version=99), ["schema_version", "99", "newer"]),
    (lambda d: d.pop("schema_version"), ["schema_version", "None"]),
    (lambda d: d.update(colour="red"), ["unknown field", "colour"]),
    (lambda d: d.update(order=[["a", 0]]), ["[op, nano, stream]"]),
    (lambda d: d.update(streams=[{"sm_shares": 3}]), ["streams", "sm_shares"]),
])
def test_from_dict_rejects_bad_files(mutate, words):
    d = Schedule().to_dict()
    mutate(d)
    with pytest.raises(ValueError) as e:
        Schedule.from_dict(d)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_from_dict_rejects_non_objects():
    with pytest.raises(ValueError, match="JSON object"):
        Schedule.from_dict([1, 2])


def _executor():
    return Executor(Workload(model="llama-tiny", num_decode=4, context_len=8, prefill_tokens=16, prefill_chunk=8).build())


def test_against_graph_split_must_sum_to_batch():
    with pytest.raises(ValueError, match=r"split_sizes must sum to the batch's 6 requests, but \[2, 2\] sums to 4"):
        _executor().compile(Schedule(split_sizes=(2, 2)))


def test_against_graph_token_split_inside_a_request():
    with pytest.raises(ValueError, match="cut at token 10, inside a request"):
        _executor().compile(Schedule(split_unit="tokens", split_sizes=(10, 10)))


def test_against_graph_order_breaking_a_dependency():
    ex = _executor()
    names = list(ex.graph.names)
    names[1], names[2] = names[2], names[1]  # qkv_proj before attn_norm
    order = tuple(Step(op=o, nano=0) for o in names)
    with pytest.raises(ValueError, match=r"issues \('qkv_proj', nano 0\) before its input \('attn_norm', nano 0\)"):
        ex.compile(Schedule(order=order))


def test_against_graph_unknown_op_and_missing_steps():
    ex = _executor()
    with pytest.raises(ValueError, match="names op 'mlp', which the graph lacks"):
        ex.compile(Schedule(order=(Step(op="mlp", nano=0),)))
    with pytest.raises(ValueError, match="must hold every"):
        ex.compile(Schedule(order=(Step(op="prologue", nano=0),)))


def test_against_hardware_sm_shares_over_the_device():
    with pytest.raises(ValueError, match=r"sum to at most the device's 132 SMs.*\[100, 40\] sums to 140"):
        _executor().compile(Schedule(streams=(StreamSpec(sm_share=100), StreamSpec(sm_share=40))), sm_count=132)
