"""Field checks for what is read from files: each failure is one ValueError naming the field and
the rule, showing the bad value short (a deeply nested value is never repr'd whole)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from collections.abc import Mapping
from typing import Any


def short(value: Any) -> str:
    """A bounded description of a value: repr for scalars and short strings, else its type."""
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
        return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    return f"a {'JSON object' if isinstance(value, Mapping) else 'JSON list' if isinstance(value, list) else type(value).__name__}"


class DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(f"the key {short(key)} appears twice in one object (JSON keeps the last silently; "
                               "this refuses to guess which was meant)")
        out[key] = value
    return out


def loads(text: str | bytes) -> Any:
    """json.loads, refusing an object with a key twice (DuplicateKey, a ValueError)."""
    return json.loads(text, object_pairs_hook=_no_duplicates)


def clip(text: str, limit: int = 60) -> str:
    """A name or label cut to a readable length for an output line, saying how long it was."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text):,} characters)"


def names(items, limit: int = 8) -> str:
    """A list of names for an error message: the first `limit`, each clipped, and how many in all."""
    items = list(items)
    shown = ", ".join(clip(i, 40) for i in items[:limit])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file; any defect (unreadable, not UTF-8, not JSON, a key twice in one object,
    nested past Python's recursion limit) is one ValueError naming the file."""
    try:
        return loads(Path(path).read_bytes().decode("utf-8"))
    except DuplicateKey as e:
        raise ValueError(f"{what} {path}: {e}") from None
    except OSError as e:
        raise ValueError(f"{what} {path} is unreadable: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{what} {path} nests JSON deeper than any record or schedule does") from None


def obj(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a JSON object, but got {short(value)}.")
    return value


def known(d: Mapping[str, Any], fields: set[str], name: str) -> None:
    unknown = sorted(str(k) for k in set(d) - fields)
    if unknown:
        raise ValueError(f"{name} has unknown field(s) {[short(k) for k in unknown][:5]}; known: {sorted(fields)}.")


def string(d: Mapping[str, Any], key: str, name: str, *, optional: bool = False, default: str | None = None) -> Any:
    value = d.get(key, default)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name}.{key} must be a string, but got {short(value)}.")
    return value


def boolean(d: Mapping[str, Any], key: str, name: str, *, optional: bool = False) -> Any:
    value = d.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise ValueError(f"{name}.{key} must be true or false, but got {short(value)}.")
    return value


def integer(d: Mapping[str, Any], key: str, name: str, *, lo: int | None = None, optional: bool = False,
            default: int | None = None) -> Any:
    value = d.get(key, default)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or (lo is not None and value < lo):
        raise ValueError(f"{name}.{key} must be an integer{f' >= {lo}' if lo is not None else ''}, "
                         f"but got {short(value)}.")
    return value


def number(d: Mapping[str, Any], key: str, name: str, *, positive: bool = False, optional: bool = False) -> Any:
    """A finite number (>= 0; > 0 if positive)."""
    value = d.get(key)
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"{name}.{key} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"but got {short(value)}.")
    return value
