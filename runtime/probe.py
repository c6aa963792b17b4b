"""What this GPU stack can do, one line per mechanism, each "works (...)" or "FAILED (error)".

    python -m dynaflow.runtime.probe

Checks, in order: the device; green contexts made from one split of the SMs (in the partition
step the driver reports); a GEMM on each partition, equal to the primary context's within the
derived tolerance (cuBLAS may pick another algorithm for fewer SMs); events across contexts (a
green stream's own event waited on by another context's stream, and whether the driver refuses
a torch event recorded on a green stream, as documented); a multi-stream CUDA graph over green
streams captured both ways (begun on a green stream; begun on a torch stream and joined),
replayed and equal to the model's own run, and which the backend uses; NVML reading the same
GPU. Without a GPU it prints one line and exits 3. Exit 1 if any mechanism failed.
"""
from __future__ import annotations

import sys
import traceback
from typing import Callable

import torch

EXIT_NO_GPU = 3


def _line(name: str, check: Callable[[], str]) -> bool:
    try:
        print(f"{name}: works ({check()})", flush=True)
        return True
    except Exception as e:  # the probe reports every failure as its line and goes on
        where = traceback.extract_tb(e.__traceback__)[-1]
        print(f"{name}: FAILED ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})", flush=True)
        return False


def capture_modes(run_with: Callable[[str], object], check: Callable[[object], None]) -> dict[str, str | None]:
    """Each capture mode (cuda.CAPTURE_MODES) tried on its own: mode -> None where a graph captured
    that way replayed equal to the reference, else the error."""
    from .backends.cuda import CAPTURE_MODES

    found: dict[str, str | None] = {}
    for mode in CAPTURE_MODES:
        try:
            check(run_with(mode))
            found[mode] = None
        except Exception as e:  # the probe reports each mode's failure and goes on
            found[mode] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return found


def backend_choice(found: dict[str, str | None]) -> str | None:
    """The mode the backend settles on: the first that works, in the order it tries them."""
    return next((mode for mode, error in found.items() if error is None), None)


def main() -> int:
    if not torch.cuda.is_available():
        print(f"probe: no GPU: torch {torch.__version__} sees no CUDA device, and every check needs one "
              f"(nothing was checked)")
        return EXIT_NO_GPU
    from .backends import green_ctx
    from . import telemetry

    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    arch = f"{props.major}.{props.minor}"
    step, groups = green_ctx.sm_layout(index)
    step = step or green_ctx.sm_granularity(arch)
    results = [_line("device", lambda: f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                                       f"{props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
                                       f"CUDA {torch.version.cuda}")]
    made: dict = {}

    def partitions() -> str:
        usable = groups or props.multi_processor_count // step
        shares = [step * max(1, usable // 2), step * max(1, min(2, usable - usable // 2))]
        streams, granted, marks, close = green_ctx.make_partitioned_streams(index, shares, [0, 0])
        made.update(streams=streams, marks=marks, close=close, shares=granted)
        said = "granted as asked" if granted == shares else f"GRANTED {granted} (fewer than asked)"
        return (f"one split into {groups if groups else '?'} groups of {step} SMs (the driver's step"
                f"{'' if groups else ': not reported, the architecture rule'}), partitions of {shares} SMs {said}")

    def kernels() -> str:
        a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
        want = a @ a
        torch.cuda.synchronize()
        out = []
        for stream in made["streams"]:
            with torch.cuda.stream(stream):
                out.append(a @ a)
        torch.cuda.synchronize()
        from .measure import Tolerance

        tol = Tolerance.derive(torch.bfloat16, reduction=a.shape[1], depth=1, reference=want)
        worst = max(tol.error(o, want) for o in out)
        exact = all(torch.equal(o, want) for o in out)
        if worst > 1:
            raise RuntimeError(f"a partition's GEMM differs from the primary context's by {worst:.2f}x the "
                               f"tolerance (rtol {tol.rtol:.2e})")
        return (f"a 2048^3 bf16 GEMM on each of {len(out)} partitions equals the primary context's "
                f"{'bit for bit' if exact else f'within {worst:.2f}x the derived tolerance (not bit for bit)'}")

    def events() -> str:
        s0, s1 = made["streams"]
        x = torch.zeros(1 << 24, device="cuda")
        torch.cuda.synchronize()
        mark = made["marks"][0]()
        with torch.cuda.stream(s0):
            for _ in range(20):  # long enough that a missing wait would read zeros
                x.add_(1)
        mark.record(s0)
        mark.block(s1)
        mark.block(torch.cuda.current_stream())
        with torch.cuda.stream(s1):
            y = x.sum()
        torch.cuda.synchronize()
        mark.close()
        if float(y) != 20.0 * x.numel():
            raise RuntimeError(f"the other stream read {float(y)} before the green stream's work was done")
        try:
            torch.cuda.Event().record(s0)
            torch.cuda.synchronize()
            rule = "a torch event recorded on a green stream was accepted by this driver"
        except RuntimeError as e:
            rule = f"a torch event recorded on a green stream is refused as documented ({str(e).splitlines()[0]})"
        return f"green-context event waited on by a green and the primary stream; {rule}"

    def graph() -> str:
        from .backends.cuda import CUDABackend
        from .executor import Executor
        from .measure import tolerance_for
        from .schedule import Schedule, Step, StreamSpec
        from .workload import Workload

        case = Workload(model="llama-tiny", num_decode=8, context_len=64, prefill_tokens=32, prefill_chunk=16,
                        dtype="bfloat16", device="cuda").build()
        ex = Executor(case)
        ref = ex.reference().clone()
        tol = tolerance_for(ex, ref)
        order = tuple(Step(op=op, nano=b, stream=b) for op in ex.graph.names for b in (0, 1))
        schedule = Schedule(split_sizes=(4, 6), streams=tuple(StreamSpec(sm_share=s) for s in made["shares"]),
                            order=order, cuda_graph=True)
        notes: dict = {}

        def run_with(mode: str):
            mode_ex = Executor(case, backend=CUDABackend(f"cuda:{index}", capture_mode=mode))
            run = mode_ex.compile(schedule, sm_count=props.multi_processor_count)
            try:
                for _ in range(3):
                    out = run()
                torch.cuda.synchronize()
                notes[mode] = run.runner.notes
                if not run.runner.notes.get("partition", "").startswith("green contexts"):
                    raise RuntimeError(f"the graph's streams were not partitioned: {run.runner.notes.get('partition')}")
                return out.clone()
            finally:
                run.close()

        found = capture_modes(run_with, lambda out: torch.testing.assert_close(out, ref, rtol=tol.rtol, atol=tol.atol))
        said = "; ".join(f"capture {mode}: {'works' if err is None else 'FAILED (' + err + ')'}"
                         for mode, err in found.items())
        choice = backend_choice(found)
        if choice is None:
            raise RuntimeError(said)
        return (f"2 green streams in one graph, replayed 3x, equal to the model's run; {said}; "
                f"the backend uses capture mode {choice}; {notes[choice]['partition']}")

    def nvml() -> str:
        sample = telemetry.sample(f"cuda:{index}")
        if not sample or sample.get("nvml", 1) is None or sample.get("sm_clock_mhz") is None:
            raise RuntimeError(f"no NVML reading for torch's cuda:{index}: {sample}")
        return (f"cuda:{index} matched by UUID/PCI bus id: SM clock {sample['sm_clock_mhz']} MHz, "
                f"{sample['temperature_c']} C, {sample['power_w']:.0f} W, throttle {sample['throttle_reasons']}")

    ok = _line("green contexts", partitions)
    results.append(ok)
    for name, check in (("kernel on each partition", kernels), ("events across contexts", events),
                        ("cuda graph over green streams", graph)):
        results.append(_line(name, check) if ok else _line(name, lambda: (_ for _ in ()).throw(
            RuntimeError("skipped: no green contexts"))))
    if "close" in made:
        torch.cuda.synchronize()
        made["close"]()
    results.append(_line("nvml", nvml))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
