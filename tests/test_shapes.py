"""Live shapes: which stored bucket answers decode-only, prefill-only and mixed batches (and by
which rule), each answer computed once, every lookup counted; recording the shapes a server
meets and saving them; start-up that works on a CPU and says why it found nothing."""
import json
import logging

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dynaflow.runtime import (BatchLayout, Bucket, Executor, Schedule, ScheduledModule, ShapeLog, StreamSpec,
                              Workload, detect)
from dynaflow.runtime.loading import ScheduleMap
from dynaflow.runtime.shapes import BucketIndex, candidates, context_bucket, distance
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule
from dynaflow.runtime.workload import preset_layout
from fakes import H100
from cli_output import error_lines


def wl(d=0, p=0, c=None, ctx=2048, model="llama3-8b", device="cuda", dtype="bfloat16") -> Workload:
    return Workload(model=model, num_decode=d, context_len=ctx if d else 0, prefill_tokens=p, prefill_chunk=c,
                    dtype=dtype, device=device)


def save(root, w: Workload, sizes, hardware=H100, unit="requests"):
    schedule = Schedule(split_unit=unit, split_sizes=sizes, streams=(StreamSpec(), StreamSpec()), label=f"{w.key}")
    ScheduleStore(StoreConfig(root=root)).save(StoredSchedule(
        hardware=hardware, workload=w, schedule=schedule, verdict="winner", tokens_per_s=2.0,
        baseline_tokens_per_s=1.0, speedup=2.0, speedup_spread=0.01, efficiency=None, space="nanoflow"))


@pytest.fixture
def smap(tmp_path):
    save(tmp_path, wl(d=64), (32, 32))                        # decode-only
    save(tmp_path, wl(p=512, c=128), (2, 2))                  # prefill-only, 4 requests
    save(tmp_path, wl(d=64, p=256, c=128), (33, 33))          # mixed: 64 decode + 2 prefill requests
    return ScheduleMap.load(tmp_path, model="llama3-8b", hardware=H100)


@pytest.mark.parametrize("live, rule, label", [
    (preset_layout(64, 0, 0), "exact", "d64x2048_p0"),
    (preset_layout(100, 0, 0), "nearest", "d64x2048_p0"),           # 1.56x away, decode-only
    (preset_layout(0, 8, 128), "nearest", "d0x0_p512"),             # prefill-only: 1024 tokens, 2x
    (preset_layout(48, 3, 100), "nearest", "d64x2048_p256"),        # mixed
    (preset_layout(0, 8, 64), "exact, rescaled", "d0x0_p512"),      # 512 tokens as 8 requests: splits refitted
    (preset_layout(1000, 0, 0), "sequential", None),                # 15x away: too far
    (preset_layout(0, 1, 100), "sequential", None),                 # prefill-only, 5x away
])
def test_each_kind_of_batch_finds_its_nearest_suitable_bucket(smap, live, rule, label):
    schedule = smap.pick(live, 2048 if live.request_kinds.count("decode") else 0)
    assert smap.rule_counts == {rule: 1}
    if label is None:
        assert schedule.is_sequential
    else:
        assert label in schedule.label
        assert sum(schedule.split_sizes) == live.num_requests  # fitted to the live batch


def test_a_bucket_of_other_kinds_never_answers():
    """A split tuned for a mixed batch says nothing about a decode-only one, nor the reverse."""
    mixed, decode = Bucket(num_decode=64, prefill_tokens=256, context_len=2048), Bucket(num_decode=64, prefill_tokens=0,
                                                                                       context_len=2048)
    assert distance(mixed, decode) == float("inf") and candidates([mixed], decode) == []
    assert distance(decode, Bucket(num_decode=128, prefill_tokens=0, context_len=0)) == 1.0
    # equally far above and below: the one at or below first; then the closest context
    below, above = Bucket(num_decode=50, prefill_tokens=0, context_len=0), Bucket(num_decode=200, prefill_tokens=0,
                                                                                  context_len=0)
    assert candidates([above, below], Bucket(num_decode=100, prefill_tokens=0, context_len=0)) == [(1, "nearest"),
                                                                                                   (0, "nearest")]
    assert [context_bucket(c) for c in (0, 1, 2, 3, 1000, 1024, 1025)] == [0, 1, 2, 4, 1024, 1024, 2048]


def test_each_live_shape_is_answered_once_and_every_lookup_counted(smap, monkeypatch):
    calls = []
    choose = smap._choose
    monkeypatch.setattr(smap, "_choose", lambda *a: calls.append(1) or choose(*a))
    for _ in range(100):
        smap.pick(preset_layout(100, 0, 0), 2000)
        smap.pick_counts(0, 8, 128)
    assert len(calls) == 2
    assert smap.rule_counts == {"nearest": 200}
    assert smap.answers() == {Bucket(num_decode=100, prefill_tokens=0, context_len=2048): "nearest",
                              Bucket(num_decode=0, prefill_tokens=1024, context_len=0, num_prefill=8): "nearest"}
    assert smap.shapes.total_calls == 200 and smap.tuned_share() == 1.0


def test_shapes_are_saved_and_loaded(smap, tmp_path):
    smap.pick_counts(64, 0, 0, 1500)
    smap.pick_counts(0, 4, 128)
    smap.pick_counts(0, 4, 128)
    path = smap.shapes.save(tmp_path / "shapes.json")
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    back = ShapeLog.load(path)
    assert back.calls == smap.shapes.calls and back.model == "llama3-8b"


@pytest.mark.parametrize("damage, words", [
    (lambda d: {**d, "shapes_schema": 2}, "shapes_schema must be 1"),
    (lambda d: {**d, "shapes": [{"num_decode": -1, "calls": 1}]}, "num_decode must be an integer >= 0"),
    (lambda d: {**d, "shapes": [{"num_decode": 4, "calls": 0}]}, "calls must be an integer >= 1"),
    (lambda d: {**d, "shapes": [{"prefill_tokens": 4, "calls": 1}]}, "must hold decode requests or prefill requests"),
    (lambda d: {**d, "extra": 1}, "unknown field"),
])
def test_bad_shape_files_are_one_error_naming_the_file(tmp_path, damage, words):
    log = ShapeLog(model="m")
    log.add(Bucket(num_decode=4, prefill_tokens=0, context_len=16))
    path = log.save(tmp_path / "s.json")
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=f"shapes file {path} is invalid: .*{words}"):
        ShapeLog.load(path)


def test_a_policy_module_records_the_shapes_it_was_called_with():
    ex = Executor(Workload(model="llama-tiny", num_decode=8, context_len=16, prefill_tokens=16, prefill_chunk=8).build())
    layer = ScheduledModule(ex.case.model, lambda layout: Schedule())
    with torch.no_grad():
        for _ in range(3):
            layer(*ex.case.inputs)
    assert layer.shapes.calls == {Bucket(num_decode=8, prefill_tokens=16, context_len=0, num_prefill=2): 3}


# --- start-up ----------------------------------------------------------------------------------------

def test_load_uses_the_live_device_by_default_and_works_on_a_cpu(tmp_path):
    cpu = detect("cpu")
    save(tmp_path, wl(d=8, ctx=16, model="llama-tiny", device="cpu", dtype="float32"), (4, 4), hardware=cpu)
    smap = ScheduleMap.load(tmp_path, model="llama-tiny", dtype="float32")  # no device, no hardware given
    assert len(smap.raw) == 1 and smap.pick_counts(8, 0, 0, 16).split_sizes == (4, 4)


@pytest.mark.parametrize("setup, words", [
    (lambda root: None, "does not exist"),
    (lambda root: save(root, wl(d=64), (32, 32)), "holds no records for this hardware (only for cuda-nvidia-h100"),
    (lambda root: save(root, wl(d=8, ctx=16, model="llama-tiny", device="cpu", dtype="float32"), (4, 4),
                       hardware=detect("cpu")), "holds no records for llama3-8b float32 (only for llama-tiny float32)"),
])
def test_an_empty_map_is_one_warning_naming_the_path_and_why(tmp_path, caplog, setup, words):
    root = tmp_path / "store"
    setup(root)
    with caplog.at_level(logging.WARNING, logger="dynaflow"):
        smap = ScheduleMap.load(root, model="llama3-8b", dtype="float32", device="cpu")
    said = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1 and words in said[0].getMessage() and str(root) in said[0].getMessage()
    assert smap.pick_counts(8, 0, 0, 16).is_sequential


def test_batch_layout_of_an_hf_prefill_finds_the_preset_bucket(smap):
    """HF layers see rows x tokens: 4 prefill rows of 128 tokens is the stored p512c128 bucket."""
    layout = BatchLayout(request_tokens=(128,) * 4, request_kinds=("prefill",) * 4, input_axes=(),
                         kinds=("decode", "prefill"))
    assert smap.pick(layout, 0).split_sizes == (2, 2) and smap.rule_counts == {"exact": 1}


# --- choosing buckets for recorded shapes --------------------------------------------------------------

def test_buckets_cover_the_most_token_weighted_traffic_first():
    from dynaflow.tuner.buckets import choose_buckets, coverage, workload_of
    log = ShapeLog(model="llama-tiny")
    decode = [Bucket(num_decode=16, prefill_tokens=0, context_len=c) for c in (64, 128)]
    log.add(decode[0], 500)
    log.add(decode[1], 300)
    log.add(Bucket(num_decode=24, prefill_tokens=0, context_len=128), 100)   # 1.5x: nearest to d16
    log.add(Bucket(num_decode=0, prefill_tokens=1024, context_len=0, num_prefill=8), 20)  # 20 x 1024 tokens
    log.add(Bucket(num_decode=2, prefill_tokens=0, context_len=64), 50)      # 8x away from d16
    one = choose_buckets(log, 1)
    assert one == [Bucket(num_decode=0, prefill_tokens=1024, context_len=0, num_prefill=8)]  # 20,480 tokens > 15,200
    two = choose_buckets(log, 2)
    assert two[1] == decode[0]
    cov = coverage(log, two)
    assert cov.by_rule == {"exact": 820, "nearest": 100, "sequential": 50} and cov.share == 920 / 970
    assert choose_buckets(log, 10)[-1] == Bucket(num_decode=2, prefill_tokens=0, context_len=64)
    assert len(choose_buckets(log, 10)) == 3  # nothing left uncovered after three
    w = workload_of(two[0], model="llama-tiny", dtype="float32", device="cpu")
    assert (w.num_decode, w.prefill_tokens, w.prefill_chunk, w.context_len) == (0, 1024, 128, 0)


@pytest.mark.parametrize("argv, words", [
    (["--buckets", "2"], "--buckets needs --shapes FILE"),
    (["--shapes", "{shapes}", "--workload", "d4x16"], "give --shapes or --workload, not both"),
    (["--shapes", "{shapes}", "--buckets", "0"], "--buckets must be >= 1"),
    (["--shapes", "{tmp}/none.json"], "shapes file"),
])
def test_tune_shapes_flags_are_checked(tmp_path, capsys, argv, words):
    from dynaflow.tuner.cli import main
    log = ShapeLog(model="llama-tiny")
    log.add(Bucket(num_decode=4, prefill_tokens=0, context_len=16))
    shapes = log.save(tmp_path / "s.json")
    argv = [a.format(shapes=shapes, tmp=tmp_path) for a in argv]
    assert main(["tune", *argv, "--store", str(tmp_path), "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and words in err


def _bucket(d, p, c):
    return Bucket(num_decode=d, prefill_tokens=p, context_len=c)


_dims = st.tuples(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 8, 9, 12, 16, 24, 32, 48, 64, 100, 128]),
                  st.sampled_from([0, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512]), st.sampled_from([0, 512, 1024, 2048]))


@settings(max_examples=300, deadline=None, derandomize=True)
@example(stored=[(4, 0, 0), (16, 0, 2048), (8, 0, 512), (8, 0, 1024)], live=(8, 0, 2048), ratio=2.0)  # exact, by context
@example(stored=[(4, 0, 0), (16, 0, 2048)], live=(8, 0, 2048), ratio=2.0)  # a tie: below the live batch first
@example(stored=[(16, 32, 0), (4, 32, 0), (8, 64, 0), (8, 16, 0)], live=(8, 32, 0), ratio=2.0)  # four at distance 1
@given(stored=st.lists(_dims.filter(lambda x: x[0] or x[1]), min_size=1, max_size=40),
       live=_dims.filter(lambda x: x[0] or x[1]), ratio=st.sampled_from([1.5, 2.0, 4.0]))
def test_the_index_finds_the_head_of_the_full_ordering(stored, live, ratio):
    """BucketIndex.first (start-up's lookup without scoring every bucket) is exactly the leading
    group of `candidates` (every bucket scored and sorted): the same buckets, rules and order."""
    buckets = [_bucket(*x) for x in stored]
    want = candidates(buckets, _bucket(*live), ratio)
    key = lambda i: distance(buckets[i], _bucket(*live))  # noqa: E731
    head = [c for c in want if key(c[0]) == key(want[0][0])] if want else []
    assert BucketIndex(buckets, ratio).first(_bucket(*live)) == head
