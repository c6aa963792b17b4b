"""Backends are found by device type: a new one is one `register` call, and an unknown device
is one error naming what is registered."""
import pytest
import torch

from dynaflow.runtime import Executor, Schedule, Workload
from dynaflow.runtime.backends import CPUBackend, _FACTORIES, get_backend, register


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), torch.zeros(1).device])
def test_the_cpu_backend_for_every_spelling_of_the_cpu(device):
    assert isinstance(get_backend(device), CPUBackend)


@pytest.mark.parametrize("device", ["tpu", "mps", "", "cuda:x"])
def test_an_unknown_device_names_the_registered_types(device):
    with pytest.raises(ValueError, match=r"device must be one of \['cpu', 'cuda'\]"):
        get_backend(device)


def test_a_registered_backend_runs_a_schedule_with_no_other_edit(monkeypatch):
    made = []

    class Counting(CPUBackend):
        name = "counting"

        def prepare(self, plan):
            made.append(plan.schedule)
            return super().prepare(plan)

    monkeypatch.setitem(_FACTORIES, "meta", lambda device: Counting())
    register("meta", lambda device: Counting())
    ex = Executor(Workload(model="llama-tiny", num_decode=4, context_len=16).build(), backend=get_backend("meta"))
    ref = ex.reference()
    out = ex.compile(Schedule(split_sizes=(2, 2))).__call__()
    torch.testing.assert_close(out, ref)
    assert made and isinstance(ex.backend, Counting)


def test_a_new_device_type_is_a_registration_not_an_edit(monkeypatch, capsys):
    """A made-up accelerator ("xpu", two of them) registered as a device type, its hardware and its
    backend: workloads accept its spellings, a missing one is one line naming it, the search space,
    the default dtype, the unit word, a Ray worker's resource and a tensor-parallel rank's device
    follow its description; nothing else names it."""
    import argparse

    from dynaflow.runtime import Hardware, devices, hardware
    from dynaflow.runtime.devices import DeviceType, device_type
    from dynaflow.search_spaces import SpaceContext, get_space
    from dynaflow.tuner.commands import pool_config
    from dynaflow.tuner.workloads import default_dtype
    import dataclasses

    import optuna

    xpu = DeviceType(name="xpu", label="XPU", unit="EUs", accelerator=True, default_dtype="float16",
                     collectives="xccl", indexed=True, graphs=False, partitions=False, count=lambda: 2,
                     synchronize=lambda device: None, install="install torch's XPU build")
    monkeypatch.setitem(devices._TYPES, "xpu", xpu)
    card = Hardware(kind="xpu", name="Made-up XPU", arch="1", num_sms=64, memory_bytes=2**34)
    monkeypatch.setitem(hardware._HARDWARE, "xpu", (lambda device: card, None))
    monkeypatch.setitem(_FACTORIES, "xpu", lambda device: CPUBackend())

    assert Workload(model="llama-tiny", num_decode=4, context_len=16, device="xpu:1").device == "xpu:1"
    with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda', 'cuda:N', 'xpu' or 'xpu:N', but got 'tpu'"):
        Workload(model="llama-tiny", num_decode=4, context_len=16, device="tpu")
    with pytest.raises(ValueError, match=r"device 'xpu:2' asked for, but only 2 XPU device\(s\) exist"):
        devices.check_device("xpu:2")
    monkeypatch.setitem(devices._TYPES, "xpu", DeviceType(**{**xpu.__dict__, "count": lambda: 0}))
    with pytest.raises(ValueError, match=r"sees no XPU device; use --device cpu, or install torch's XPU build\."):
        devices.check_device("xpu")
    monkeypatch.setitem(devices._TYPES, "xpu", xpu)

    assert hardware.detect("xpu:0") is card and Hardware.from_dict(card.to_dict()) == card
    assert card.partition_step == 1  # no SM partitions on it
    assert default_dtype(None, "xpu") == "float16" and device_type(card.kind).unit == "EUs"
    assert isinstance(get_backend("xpu:1"), CPUBackend)
    args = argparse.Namespace(workers="all", ray_address=None, device="xpu", tp=1, model="llama-tiny")
    assert pool_config(args).use_gpus  # an accelerator: each Ray worker holds one card
    ex = Executor(Workload(model="llama-tiny", num_decode=4, context_len=16).build())
    ctx = SpaceContext(hardware=card, graph=ex.graph, layout=ex.case.layout)
    for _ in range(5):
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        schedule = get_space("nanoflow")(trial, ctx)
        assert "cuda_graph" not in trial.params and not schedule.cuda_graph  # no graphs on it
    on_cuda = optuna.create_study().ask()
    get_space("nanoflow")(on_cuda, SpaceContext(hardware=dataclasses.replace(card, kind="cuda"), graph=ex.graph,
                                                layout=ex.case.layout))
    assert "cuda_graph" in on_cuda.params  # the same space asks where the type has graphs
