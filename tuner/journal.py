"""Optuna's journal file, tuned for one driver process writing many small records.

- No fsync per record: each record still reaches the file (write + flush) before the call
  returns, so a killed or crashed tuner loses nothing; only a power cut or kernel crash could
  lose the last records.
- An flock on a side file instead of Optuna's symlink lock (which is built for NFS): two tuners
  on one local journal still serialise their writes.
- Reads that would find nothing new return without opening the file.
- A last line cut short by a kill (or a full disk) is dropped when the file is opened, with a
  warning naming the file; Optuna's own reader would otherwise fail on the next record
  appended after it.
Together these take the driver from ~10 ms to a few ms per trial on a small machine.
"""
from __future__ import annotations

import fcntl
import json
import os
import warnings
from typing import Any, Iterator

from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock


class FlockLock(BaseJournalFileLock):
    def __init__(self, path: str) -> None:
        self._fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)

    def acquire(self) -> bool:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return True

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


class UnsyncedJournalBackend(JournalFileBackend):
    def __init__(self, file_path: str) -> None:
        super().__init__(file_path, lock_obj=FlockLock(file_path))
        self._lock.acquire()
        try:
            drop_cut_last_line(file_path)
        finally:
            self._lock.release()

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
        self._lock.acquire()
        try:
            with open(self._file_path, "ab") as f:
                f.write(lines.encode("utf-8"))
                f.flush()
        finally:
            self._lock.release()

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        known = self._log_number_offset.get(log_number_from)
        if known is not None and known >= os.stat(self._file_path).st_size:
            return
        yield from super().read_logs(log_number_from)


def drop_cut_last_line(path: str) -> None:
    """Truncate the file after its last complete line, if its end is not one."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        keep = _end_of_last_line(f, size)
        f.truncate(keep)
    warnings.warn(f"journal {path}: dropped its last line ({size - keep} bytes), which a killed writer left "
                  "unfinished", stacklevel=2)


def _end_of_last_line(f, size: int, chunk: int = 1 << 16) -> int:
    end = size
    while end > 0:
        start = max(0, end - chunk)
        f.seek(start)
        block = f.read(end - start)
        at = block.rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0
