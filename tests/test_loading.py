"""Start-up loading: the fallback chain, hardware refusal, version drift, bad files, policies."""
import dataclasses
import json
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaflow.runtime import Executor, Schedule, StreamSpec, Step, Workload
from dynaflow.runtime.loading import ScheduleMap, fit_to_batch, load_schedule
from dynaflow.runtime.serving import ScheduledModule
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule
from dynaflow.runtime.workload import preset_layout
from fakes import A100, H100


def record(w: Workload, schedule: Schedule, hardware=H100) -> StoredSchedule:
    return StoredSchedule(hardware=hardware, workload=w, schedule=schedule,
                          verdict="sequential_best" if schedule.is_sequential else "winner",
                          tokens_per_s=1.0, baseline_tokens_per_s=1.0, speedup=1.2, speedup_spread=0.01,
                          efficiency=0.5, space="nanoflow")


def wl(d: int, p: int = 0, ctx: int = 2048) -> Workload:
    return Workload(model="llama3-8b", num_decode=d, context_len=ctx, prefill_tokens=p, dtype="bfloat16", device="cuda")


def split(*sizes) -> Schedule:
    return Schedule(split_sizes=sizes, streams=(StreamSpec(), StreamSpec()), label=f"split{sizes}")


@pytest.fixture
def store(tmp_path):
    s = ScheduleStore(StoreConfig(root=tmp_path))
    s.save(record(wl(64), split(32, 32)))
    s.save(record(wl(256), split(128, 128)))
    s.save(record(wl(256, 512), split(128, 129)))
    return tmp_path


def test_exact_bucket(store, caplog):
    with caplog.at_level(logging.INFO, logger="dynaflow"):
        s = load_schedule(store, wl(256), hardware=H100)
    assert s.label == "split(128, 128)" and s.split_sizes == (128, 128)
    assert "exact: llama3-8b_d256x2048_p0_bf16" in caplog.text


def test_nearest_bucket_is_rescaled_to_the_live_batch(store, caplog):
    with caplog.at_level(logging.INFO, logger="dynaflow"):
        s = load_schedule(store, wl(200), hardware=H100)  # 64 and 256 stored: 256 is 1.28x away, 64 is 3.1x
    assert s.label == "split(128, 128)" and s.split_sizes == (100, 100)
    assert "nearest: llama3-8b_d256x2048_p0_bf16" in caplog.text
    with caplog.at_level(logging.INFO, logger="dynaflow"):
        s = load_schedule(store, wl(100), hardware=H100)  # 64 (1.56x, below) beats 256 (2.56x: too far)
    assert s.label == "split(32, 32)" and s.split_sizes == (50, 50)


def test_nothing_within_reach_falls_back_to_sequential(store, caplog):
    with caplog.at_level(logging.INFO, logger="dynaflow"):
        s = load_schedule(store, wl(16), hardware=H100)
    assert s.is_sequential
    assert "sequential: no stored bucket within 2x of live" in caplog.text


def test_each_rule_is_logged_once_and_every_lookup_counted(store, caplog):
    smap = ScheduleMap.load(store, model="llama3-8b", hardware=H100)
    with caplog.at_level(logging.INFO, logger="dynaflow"):
        for d in (200, 201, 202, 16, 17, 256, 256):
            smap.pick(preset_layout(d, 0, 0), 2048)
    assert caplog.text.count("nearest:") == 1 and caplog.text.count("sequential: no stored") == 1
    assert smap.rule_counts == {"nearest": 3, "sequential": 2, "exact": 2}
    assert smap.shapes.total_calls == 7 and len(smap.shapes.calls) == 6
    assert smap.tuned_share() == 5 / 7


def test_other_hardware_is_refused_naming_both(store):
    path = next((store / "schedules" / H100.key).glob("*d64*"))
    with pytest.raises(ValueError, match=f"was tuned on {H100.key}, but this is {A100.key}.*num_sms: 132 vs 108"):
        load_schedule(path, wl(64), hardware=A100)


def test_software_drift_warns(store, caplog):
    newer = type(H100)(**{**H100.to_dict(), "software": {**H100.software, "torch": "2.99.0"}})
    with caplog.at_level(logging.WARNING, logger="dynaflow"):
        load_schedule(store, wl(64), hardware=newer)
    assert "torch: '2.11.0' -> '2.99.0'" in caplog.text


@pytest.mark.parametrize("damage, words", [
    (lambda text: text[: len(text) // 2], "is not valid JSON"),
    (lambda text: "", "is not valid JSON"),
    (lambda text: text.replace('"record_schema": 4', '"record_schema": 5'), "record_schema must be 1 to 4, but got 5"),
    (lambda text: text.replace('"schema_version": 1', '"schema_version": 7'), "schedule schema_version must be 1"),
])
def test_bad_files_are_errors_naming_the_file_or_warnings(store, caplog, damage, words):
    path = next((store / "schedules" / H100.key).glob("*d256x2048_p0*"))
    path.write_text(damage(path.read_text()))
    with pytest.raises(ValueError) as e:
        load_schedule(store, wl(256), hardware=H100)
    assert str(path) in str(e.value) and words in str(e.value)
    with caplog.at_level(logging.WARNING, logger="dynaflow"):
        s = load_schedule(store, wl(128), hardware=H100, on_error="warn")
    assert s.label == "split(32, 32)"  # the broken 256 bucket skipped (it was nearest), the 64 one answered
    assert str(path) in caplog.text


def test_loading_never_runs_code_from_the_file(store, tmp_path):
    path = next((store / "schedules" / H100.key).glob("*d64*"))
    data = json.loads(path.read_text())
    data["schedule"]["label"] = "__import__('os').system('touch PWNED')"
    path.write_text(json.dumps(data))
    assert load_schedule(path, wl(64), hardware=H100).label.startswith("__import__")
    assert not (tmp_path / "PWNED").exists()


def test_fit_to_batch_keeps_proportions_and_gives_up_when_too_small():
    layout = preset_layout(10, 1, 30)  # 10 decode tokens + one 30-token prefill
    assert fit_to_batch(Schedule(split_unit="tokens", split_sizes=(3, 1)), layout).split_sizes == (10, 1)
    assert fit_to_batch(split(1, 1, 1), preset_layout(2, 0, 0)) is None


def test_scheduled_module_runs_the_map_or_a_policy_per_call():
    ex = Executor(Workload(model="llama-tiny", num_decode=8, context_len=16, prefill_tokens=16, prefill_chunk=8).build())
    ref = ex.reference().clone()
    names = ex.graph.names

    def policy(layout):  # a ten-line dual-batch overlap: split only above 6 requests
        if layout.num_requests <= 6:
            return Schedule()
        half = layout.num_requests // 2
        order = tuple(Step(op=o, nano=b, stream=b) for o in names for b in (0, 1))
        return Schedule(split_sizes=(half, layout.num_requests - half), streams=(StreamSpec(), StreamSpec()),
                        order=order, label="dbo")

    chosen = {}
    layer = ScheduledModule(ex.case.model, lambda layout: chosen.setdefault(layout.num_requests, policy(layout)))
    with torch.no_grad():
        outs = [layer(*ex.case.inputs) for _ in range(4)]  # the policy returns one Schedule object per shape
    assert layer.last_schedule.label == "dbo"
    assert layer.plans.built == 1  # built once for the shape, then reused: each call only binds its tensors
    assert len({id(o) for o in outs}) == 4  # every call gets its own output tensor
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    x, k, v, decode_pos, prefill_pos = ex.case.inputs
    with torch.no_grad():  # 4 decode requests only: the policy answers sequential, no plan
        layer(x[:4], k[:4], v[:4], decode_pos[:4], prefill_pos[:0])
    assert layer.last_schedule.is_sequential and layer.plans.built == 1


def test_pack_speeds_start_up_and_never_goes_stale(store):
    first = load_schedule(store, wl(256), hardware=H100)
    assert (store / "schedules" / f"{H100.key}.pack.json").exists()
    assert load_schedule(store, wl(256), hardware=H100) == first  # from the pack
    ScheduleStore(StoreConfig(root=store)).save(record(wl(256), split(100, 156)))  # re-tuned since
    assert load_schedule(store, wl(256), hardware=H100).split_sizes == (100, 156)


def test_a_warned_load_does_not_hide_a_broken_file_from_a_strict_one(store):
    path = next((store / "schedules" / H100.key).glob("*d64*"))
    path.write_text("{")
    load_schedule(store, wl(256), hardware=H100, on_error="warn")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_schedule(store, wl(256), hardware=H100)


# --- one hardware type, many boards: memory within tolerance, another SKU refused ------------------

H200 = dataclasses.replace(H100, name="NVIDIA H200", memory_bytes=int(139.8 * 2**30))
H200_OTHER_BOARD = dataclasses.replace(H200, memory_bytes=int(139.4 * 2**30))  # another board (or ECC on)
H100_SAME_SMS = dataclasses.replace(H200, name="NVIDIA H200", memory_bytes=80 * 2**30)  # another SKU, renamed


def test_records_tuned_on_one_h200_load_on_another(tmp_path):
    ScheduleStore(StoreConfig(root=tmp_path)).save(record(wl(256), split(128, 128), hardware=H200))
    assert H200.key == H200_OTHER_BOARD.key and not H200_OTHER_BOARD.mismatch(H200)
    assert load_schedule(tmp_path, wl(256), hardware=H200_OTHER_BOARD).split_sizes == (128, 128)


def test_records_in_a_store_written_before_memory_left_the_key_still_load(tmp_path):
    store = ScheduleStore(StoreConfig(root=tmp_path))
    path = store.save(record(wl(256), split(128, 128), hardware=H200))
    legacy = path.parent.with_name(H200.legacy_key)  # schedules/cuda-nvidia-h200-90-132sm-140g/
    path.parent.rename(legacy)
    assert legacy.name.endswith("-140g")
    assert load_schedule(tmp_path, wl(256), hardware=H200_OTHER_BOARD).split_sizes == (128, 128)  # 139g here


def test_another_sku_with_the_same_sms_is_refused(tmp_path):
    path = ScheduleStore(StoreConfig(root=tmp_path)).save(record(wl(256), split(128, 128), hardware=H200))
    assert H100.key != H200.key  # the name keys the device type
    assert load_schedule(tmp_path, wl(256), hardware=H100).is_sequential
    wrong = H100_SAME_SMS.mismatch(H200)
    assert len(wrong) == 1 and wrong[0].startswith("memory_bytes:") and "more than 8% apart" in wrong[0]
    with pytest.raises(ValueError, match="memory_bytes"):
        load_schedule(path, wl(256), hardware=H100_SAME_SMS)  # one record file, checked whole


def test_a_stored_record_naming_ops_the_module_lacks_is_said_at_start_up(tmp_path, caplog):
    """Wrapping a layer under a map checks every record's order against the layer's graph before
    any call: the one made for another model is named (its workload) at start-up, once, and its
    batches run sequentially; the record that fits runs scheduled."""
    ex = Executor(Workload(model="llama-tiny", num_decode=8, context_len=16).build())
    ref = ex.reference().clone()
    foreign = Schedule(split_sizes=(4, 4), streams=(StreamSpec(), StreamSpec()),
                       order=(Step(op="input_layernorm", nano=0, stream=0), Step(op="input_layernorm", nano=1, stream=1)),
                       label="foreign")
    w = lambda d: Workload(model="llama-tiny", num_decode=d, context_len=16, dtype="bfloat16", device="cuda")
    s = ScheduleStore(StoreConfig(root=tmp_path))
    s.save(record(w(8), foreign))
    s.save(record(w(64), split(32, 32)))
    smap = ScheduleMap.load(tmp_path, model="llama-tiny", hardware=H100)
    with caplog.at_level(logging.WARNING, logger="dynaflow"):
        layer = ScheduledModule(ex.case.model, smap)
    said = [r.getMessage() for r in caplog.records if "graph lacks" in r.getMessage()]
    assert said == ["record llama-tiny_d8x16_p0_bf16: schedule foreign names op(s) input_layernorm, which this "
                    "module's graph lacks (a record made for another model?): it runs sequentially"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dynaflow"), torch.no_grad():
        out = layer(*ex.case.inputs)  # the 8-request batch: the foreign record's bucket
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert layer.last_schedule.label == "foreign" and layer.plans.built == 0
    assert not [r for r in caplog.records if "graph lacks" in r.getMessage()]  # said once, at start-up


def test_a_schedule_naming_ops_the_module_lacks_runs_sequentially_with_one_warning(caplog):
    """A record made for another model (its order names ops this graph lacks) is said once and
    run sequentially, equal to the module, instead of raising at every call that picks it."""
    ex = Executor(Workload(model="llama-tiny", num_decode=8, context_len=16).build())
    ref = ex.reference().clone()
    foreign = Schedule(split_sizes=(4, 4), streams=(StreamSpec(), StreamSpec()),
                       order=(Step(op="input_layernorm", nano=0, stream=0), Step(op="input_layernorm", nano=1, stream=1)),
                       label="foreign")
    layer = ScheduledModule(ex.case.model, lambda layout: foreign)
    with caplog.at_level(logging.WARNING, logger="dynaflow"), torch.no_grad():
        outs = [layer(*ex.case.inputs) for _ in range(3)]
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    said = [r.getMessage() for r in caplog.records if "which this module's graph lacks" in r.getMessage()]
    assert said == ["schedule foreign names op(s) input_layernorm, which this module's graph lacks (a record made "
                    "for another model?): it runs sequentially"] and layer.plans.built == 0


@settings(max_examples=200, deadline=None, derandomize=True)
@given(tokens=st.lists(st.integers(1, 40), min_size=2, max_size=60), data=st.data())
def test_nearest_cuts_by_bisection_equal_the_scan_of_every_boundary(tokens, data):
    """Start-up's fitting finds each cut by bisection when the allowed boundaries are a range: the
    same cut as scanning every allowed boundary (ties to the smaller one), in tokens and requests."""
    from dynaflow.runtime.batch import BatchLayout

    layout = BatchLayout(request_tokens=tuple(tokens), request_kinds=("requests",) * len(tokens),
                         input_axes=("requests",))
    lo = data.draw(st.integers(0, len(tokens)))
    allowed = range(lo, data.draw(st.integers(lo + 1, len(tokens) + 1)))
    fractions = data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.25, 1 / 3, 0.5, 2 / 3, 0.75, 0.9, 1.0]), max_size=4))
    for unit in ("tokens", "requests"):
        assert layout.nearest_cuts(fractions, allowed, unit=unit) == layout.nearest_cuts(fractions, list(allowed),
                                                                                         unit=unit)
