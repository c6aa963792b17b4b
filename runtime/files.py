"""Files the runtime writes: JSON, atomically, readable by every user."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

FILE_MODE = 0o644  # a server running as another user reads what the tuner wrote


def write_json_atomic(path: Path, data: Any, *, indent: int | None = None) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old file or the new one."""
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=True))


def write_text_atomic(path: Path, text: str) -> None:
    """As write_json_atomic, for text made already."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


PSEUDO = (Path("/proc"), Path("/sys"), Path("/dev"))  # kernel interfaces: never a place for results


def check_folder(path: Path | str, flag: str) -> Path:
    """A folder results can be written in, checked before any work: not a file, not under a
    kernel pseudo-filesystem, created if missing, writable. Any defect is one ValueError naming
    `flag` and the path."""
    path = Path(path)
    resolved = path.resolve()
    if any(resolved == p or resolved.is_relative_to(p) for p in PSEUDO):
        raise ValueError(f"{flag} {path} is under {next(p for p in PSEUDO if resolved.is_relative_to(p))}, a kernel "
                         "interface, not a folder for results; give a folder of your own")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; give a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".dynaflow-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path} is not writable: {e.strerror or e}") from None
    return path


def check_file(path: Path | str, flag: str) -> Path:
    """A file results can be written to: not a folder, and its folder passes check_folder; a
    missing folder is created only inside one that exists (a mistyped path such as
    /nonexistent/dir/x.db is refused, not made). `flag` names what gave the path (e.g.
    "--storage 'sqlite:///x.db'")."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} names a folder, {path}; give a file path in it")
    folder = path.parent
    if not folder.exists() and not folder.parent.exists():
        missing = next(p for p in reversed([folder, *folder.parents]) if not p.exists())
        raise ValueError(f"{flag}: its folder {folder} does not exist, from {missing} on; create it first (only a "
                         "missing last folder is created)")
    check_folder(path.parent, f"{flag}: its folder")
    return path
