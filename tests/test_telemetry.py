"""NVML reads the GPU torch uses (by UUID, else PCI bus id: CUDA_VISIBLE_DEVICES renumbers torch's
devices, not NVML's), and device peaks are timed with CUDA events over repeated launches. Both
against fakes of pynvml and torch.cuda that keep the real numbering rules."""
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from dynaflow.runtime import hardware, telemetry


@dataclass
class PhysicalGPU:
    uuid: str
    domain: int
    bus: int
    clock: int


GPUS = [PhysicalGPU("1111aaaa-0000-0000-0000-000000000000", 0, 0x17, 1000),
        PhysicalGPU("2222bbbb-0000-0000-0000-000000000000", 0, 0x65, 2000),
        PhysicalGPU("3333cccc-0000-0000-0000-000000000000", 0, 0xCA, 3000)]


def fake_pynvml(*, by_uuid=True):
    nv = types.ModuleType("pynvml")
    nv.NVML_CLOCK_SM, nv.NVML_TEMPERATURE_GPU = 1, 0

    class NVMLError(Exception):
        pass

    def by_uuid_fn(uuid):
        if not by_uuid:
            raise NVMLError("not supported")
        for gpu in GPUS:
            if uuid == f"GPU-{gpu.uuid}":  # NVML's form: the GPU- prefix
                return gpu
        raise NVMLError("not found")

    def by_bus(bus_id):
        for gpu in GPUS:
            if bus_id.lower() == f"{gpu.domain:08x}:{gpu.bus:02x}:00.0":
                return gpu
        raise NVMLError("not found")

    nv.nvmlInit = lambda: None
    nv.nvmlDeviceGetHandleByIndex = lambda i: GPUS[i]  # physical numbering
    nv.nvmlDeviceGetHandleByUUID = by_uuid_fn
    nv.nvmlDeviceGetHandleByPciBusId = by_bus
    nv.nvmlDeviceGetClockInfo = lambda h, kind: h.clock
    nv.nvmlDeviceGetTemperature = lambda h, kind: 50
    nv.nvmlDeviceGetPowerUsage = lambda h: 300_000
    nv.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0
    nv.nvmlSystemGetDriverVersion = lambda: "580.00"
    nv.nvmlDeviceGetMigMode = lambda h: (0, 0)
    return nv


@pytest.fixture
def visible(monkeypatch):
    """CUDA_VISIBLE_DEVICES=2,1: torch's cuda:0 is physical GPU 2, cuda:1 is GPU 1."""
    order = [2, 1]

    def props(index):
        gpu = GPUS[order[index]]
        return types.SimpleNamespace(uuid=gpu.uuid, pci_domain_id=gpu.domain, pci_bus_id=gpu.bus, pci_device_id=0)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(telemetry, "_HANDLES", {})
    return order


@pytest.mark.parametrize("by_uuid", [True, False], ids=["uuid", "pci-bus-id"])
def test_nvml_reads_the_gpu_torch_uses(visible, monkeypatch, by_uuid):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(by_uuid=by_uuid))
    assert telemetry.sample("cuda:0")["sm_clock_mhz"] == 3000  # physical GPU 2, not NVML's index 0
    assert telemetry.sample("cuda:1")["sm_clock_mhz"] == 2000
    assert telemetry.sample("cuda")["sm_clock_mhz"] == 3000  # the current device
    assert telemetry.nvml_static(1) == {"driver": "580.00", "mig": False}


def test_a_gpu_nvml_cannot_match_reads_as_no_nvml(visible, monkeypatch):
    nv = fake_pynvml(by_uuid=False)
    nv.nvmlDeviceGetHandleByPciBusId = lambda bus_id: (_ for _ in ()).throw(RuntimeError("not found"))
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    assert telemetry.sample("cuda:0") == {"nvml": None}


def test_device_peaks_are_timed_with_events_over_repeated_launches(monkeypatch):
    """A fake device clock: each launch takes 2 ms of device time, and the host sees 50 ms of
    launch and sync jitter that the measurement must not include."""
    clock = {"device_ms": 0.0}

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self, stream=None):
            self.at = clock["device_ms"]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at - self.at

    launches = []

    def launch():
        launches.append(1)
        clock["device_ms"] += 2.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: __import__("time").sleep(0.05))
    seconds = hardware._best_time(launch, "cuda:0", repeats=3, launches=20)
    assert seconds == pytest.approx(2e-3)
    assert len(launches) == 1 + 3 * 20  # one warm-up, then 20 launches per timed repeat


def test_a_round_on_a_gpu_whose_clocks_were_cut_is_busy(visible, monkeypatch):
    """Another process on the GPU, or a thermal/hardware slowdown of its clocks, makes a reading
    contended (a paired round measured then is no evidence); the routine power cap does not."""
    nv = fake_pynvml()
    nv.nvmlClocksEventReasonSwPowerCap, nv.nvmlClocksEventReasonHwThermalSlowdown = 0x4, 0x40
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: []
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    nv.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x4  # at the power cap: routine
    quiet = telemetry.busy_since(telemetry.busy_mark(), "cuda:0")
    assert quiet["gpu_slowdown"] == 0 and quiet["gpu_other_processes"] == 0
    assert telemetry.contention({**quiet, "others_cpu_s": 0.0}) is None
    nv.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x44
    hot = telemetry.busy_since(telemetry.busy_mark(), "cuda:0")
    assert hot["gpu_slowdown"] == 1
    assert "the GPU's clocks were cut (a thermal or hardware slowdown)" in telemetry.contention(hot)
    assert telemetry.merge_busy([quiet, hot])["gpu_slowdown"] == 1
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [types.SimpleNamespace(pid=1)]
    assert "1 other process(es) ran on the GPU" in telemetry.contention(
        telemetry.busy_since(telemetry.busy_mark(), "cuda:0"))
