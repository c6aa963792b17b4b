"""The one call path every consumer of scheduled execution goes through (ScheduledModule, the HF
layer wrapper, the compile backend, and the next one): a map and a policy are both Choosers; a
plan is built once per (schedule, shape), bound per call, unbound after it, even when it fails."""
import pytest
import torch

from dynaflow.runtime import BatchLayout, Schedule, ScheduleMap, ShapeLog
from dynaflow.runtime.plan import Plan, Task
from dynaflow.runtime.serving import Chooser, Policy, ScheduledCalls, as_chooser

LAYOUT = BatchLayout(request_tokens=(1,) * 4, request_kinds=("decode",) * 4, input_axes=(), kinds=("decode", "prefill"))


def test_a_map_and_a_policy_are_both_choosers():
    smap = ScheduleMap([], source="none")
    assert as_chooser(smap) is smap and isinstance(smap, Chooser)
    log = ShapeLog()
    policy = as_chooser(lambda layout: Schedule(split_sizes=(2, 2)), log)
    assert isinstance(policy, Policy) and policy.shapes is log
    assert policy.pick(LAYOUT, 100).split_sizes == (2, 2) and log.total_calls == 1
    assert as_chooser(policy) is policy  # wrapping twice keeps one log


def test_a_consumer_binds_runs_and_unbinds_through_one_call():
    seen, events = [], []

    def prepare():
        plan = Plan(schedule=schedule, tasks=[Task(op="x", nano=0, stream=0, waits=(), fn=lambda: seen.append(box[0]))],
                    out=None, ranges=[(0, 4)], join_copies=False)
        box = []
        plan.bind = lambda value: (box.clear(), box.append(value), events.append("bind"))[-1] or value * 2
        plan.unbind = lambda: (box.clear(), events.append("unbind"))
        return plan

    calls = ScheduledCalls(lambda layout: Schedule(split_sizes=(2, 2)))
    schedule = calls.pick(LAYOUT, 8)
    assert calls.shapes.total_calls == 1
    for value in (1, 2):
        assert calls.run(schedule, ("shape",), torch.device("cpu"), prepare, value,
                         finish=lambda plan, bound: bound + 1) == value * 2 + 1
    assert seen == [1, 2] and calls.plans.built == 1 and events == ["bind", "unbind"] * 2

    def failing():
        plan = prepare()
        plan.tasks[0].fn = lambda: (_ for _ in ()).throw(RuntimeError("kernel failed"))
        return plan

    with pytest.raises(RuntimeError, match="kernel failed"):
        calls.run(schedule, ("other shape",), "cpu", failing, 3)
    assert events[-1] == "unbind"  # the failed call's tensors are not kept alive either
