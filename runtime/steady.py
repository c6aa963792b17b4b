"""The state a timed run starts from: set before it, read inside it, compared across a pair.

Besides the schedule, two things decided a run's speed here (docs/verdicts.md has the evidence):

- **Whether freed memory goes back to the OS.** glibc's malloc returns a freed block above its
  (dynamic) mmap threshold with munmap, and trims the top of its heap above the trim threshold;
  whether it does for a given tensor depends on where earlier allocations landed. A model whose
  run allocates and frees tens of MiB (an HF model's KV cache copies, repeat_kv) then either reuses
  its memory (0 page faults per run) or faults every page fresh and zeroed on every run: 16,384
  minor faults, 20 -> 37 ms for hf:llama d16x256, decided by the process's history, not by the
  schedule. `keep_freed_memory()` makes glibc keep what is freed (no munmap, no trim): the steady
  state of a caching allocator, which is what a GPU's allocator gives every schedule anyway.
  It is not a guarantee: torch allocates with posix_memalign, whose small trailing remainder lands
  in glibc's per-thread cache (tcache) right after the block, where it keeps the freed block from
  merging back; then a same-size request does not fit the freed block and every run faults fresh
  pages. Seen in a process that had imported torch and little else (10,240 faults per 40 MiB run),
  never in a process that had imported a Bench's modules (2026-12-07). So the faults of every
  timed run are read (`RunState.faults_per_run`): a paired round whose runs refaulted is no evidence (`differs`).
- **Each thread's intra-op thread count.** `torch.set_num_threads` sets the calling thread's
  OpenMP and MKL counts, and a process-wide value that every thread reads at its first parallel op:
  a stream thread's cap, set while another thread starts, becomes that thread's count for good. The
  CPU backend sets the count explicitly in every thread at the start of every run and reports what
  each thread saw (`Runner.threads_seen`).

`RunState` is what a measurement read inside its timed runs; `differs(baseline, candidate)` says why
a pair's halves ran in different states (such a round is no evidence), or None.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import resource
import statistics
from dataclasses import asdict, dataclass
from typing import Any

FAULTING_PAGES = 256  # minor page faults per run (1 MiB of 4 KiB pages) above which a run was refaulting memory

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_KEPT: list[str] = []  # what keep_freed_memory() did in this process (it does it once)


def keep_freed_memory() -> str:
    """Make this process's malloc keep freed memory for reuse (glibc: no heap trimming, no mmap'd
    blocks), once; returns what the allocator does now, in words (recorded with every measurement)."""
    if _KEPT:
        return _KEPT[0]
    how = "uncontrolled: not glibc (freed memory may go back to the OS; page faults per run are read)"
    if platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            trim = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
            no_mmap = libc.mallopt(_M_MMAP_MAX, ctypes.c_int(0))
            if trim == 1 and no_mmap == 1:
                how = "glibc: freed memory kept for reuse (no trim, no mmap)"
            else:
                how = "uncontrolled: glibc refused mallopt (page faults per run are read)"
        except (OSError, AttributeError):
            how = "uncontrolled: libc not loadable (page faults per run are read)"
    _KEPT.append(how)
    return how


def page_faults() -> int:
    """Minor page faults of this process so far (every thread's)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass(frozen=True, kw_only=True, slots=True)
class RunState:
    """The state a measurement's timed runs ran in, read inside them.

    threads: the intra-op thread count each running thread saw (one per stream; () where the
    backend has no such count, e.g. CUDA); full_threads: the device's full count (what the
    sequential schedule must run with; None where it has none); faults_per_run: the median minor
    page faults per timed run; allocator: what keep_freed_memory() made of malloc."""

    threads: tuple[int, ...] = ()
    full_threads: int | None = None
    faults_per_run: float = 0.0
    allocator: str = ""

    @classmethod
    def read(cls, faults: list[int], *, threads=(), full_threads: int | None = None, allocator: str = "") -> "RunState":
        return cls(threads=tuple(int(t) for t in threads), full_threads=full_threads,
                   faults_per_run=float(statistics.median(faults)) if faults else 0.0, allocator=allocator)

    @property
    def refaulting(self) -> bool:
        """Its runs faulted fresh pages every time (memory went back to the OS between runs)."""
        return self.faults_per_run > FAULTING_PAGES

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["threads"] = list(self.threads)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "RunState | None":
        if not d:
            return None
        full = d.get("full_threads")
        return cls(threads=tuple(int(t) for t in d.get("threads") or ()), full_threads=None if full is None else int(full),
                   faults_per_run=float(d.get("faults_per_run") or 0.0), allocator=str(d.get("allocator", "")))


def sequential_off(state: RunState) -> str | None:
    """Why the sequential schedule's run was not in its known state (all the device's threads, no
    refaulting), or None."""
    if state.full_threads is not None and state.threads and state.threads != (state.full_threads,):
        return f"the sequential run had {list(state.threads)} thread(s), not the device's {state.full_threads}"
    if state.refaulting:
        return f"the sequential run faulted {state.faults_per_run:,.0f} pages per run (its memory was refaulted)"
    return None


def differs(baseline: RunState | None, candidate: RunState | None) -> str | None:
    """Why a paired round's halves ran in different states (no evidence), or None when they did
    not (or a half's state is unknown: an older record, a remote target that reads none)."""
    if baseline is None or candidate is None:
        return None
    off = sequential_off(baseline)
    if off is not None:
        return off
    if candidate.refaulting:
        return (f"the candidate faulted {candidate.faults_per_run:,.0f} pages per run, the sequential run "
                f"{baseline.faults_per_run:,.0f} (memory refaulted in one half only)")
    return None
