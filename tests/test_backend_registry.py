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
