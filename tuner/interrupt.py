"""Ctrl-C that never lands in the middle of a storage write.

The first Ctrl-C only raises a flag: the search stops timing the current trial and records it as
interrupted, or the confirmation stops after its current round; either way the workload's verdict
is stored as "inconclusive: interrupted" (an earlier conclusive record stays) and `tune` exits 130.
A second Ctrl-C stops at once.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


class StopFlag:
    def __init__(self) -> None:
        self.requested = False

    def __bool__(self) -> bool:
        return self.requested


@contextmanager
def stop_on_ctrl_c() -> Iterator[StopFlag]:
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals reach the main thread only: the caller's own handling applies
        return

    def handler(signum, frame) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        print("\nstopping: the trial or round being timed ends the run; nothing is concluded, the sequential schedule "
              "is kept and a stored record stays (Ctrl-C again to stop now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
