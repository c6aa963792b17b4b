"""A schedule: how one layer's ops run on one device. Plain data, JSON round-trip.

`Schedule()` is the sequential schedule: one nano-batch, one stream, ops in graph order.
Everything else is a value of the same type, so "no tuned schedule" is never a special case.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from collections.abc import Mapping
from functools import cache
from typing import Any, ClassVar

from . import validate
from .validate import short

SCHEMA_VERSION = 1
SPLIT_UNITS = ("requests", "tokens")
MAX_STREAMS = 8


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamSpec:
    """One stream. `sm_share`: SMs on a GPU (threads on CPU) reserved for it; None = no partition."""

    sm_share: int | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if self.sm_share is not None and (not _is_int(self.sm_share) or self.sm_share < 1):
            raise ValueError(f"streams[].sm_share must be a positive int or None, but got {short(self.sm_share)}.")
        if not _is_int(self.priority) or not -3 <= self.priority <= 0:
            raise ValueError(
                f"streams[].priority must be an int in [-3, 0] (lower runs first), but got {short(self.priority)}."
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class Step:
    """Issue op `op` of nano-batch `nano` on stream `stream`."""

    op: str
    nano: int
    stream: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.op, str):
            raise ValueError(f"order step op must be an op name, but got {short(self.op)}.")
        for name in ("nano", "stream"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"order step {name} must be an int >= 0, but got {short(getattr(self, name))}.")


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Split sizes, streams, and the issue order of (op, nano-batch) steps.

    split_sizes: nano-batch sizes in `split_unit`s; () means one nano-batch of the whole batch.
    order: every (op, nano-batch) exactly once, each after its producers; () means nano-batch
        by nano-batch, ops in graph order, all on stream 0.
    """

    split_unit: str = "requests"
    split_sizes: tuple[int, ...] = ()
    streams: tuple[StreamSpec, ...] = (StreamSpec(),)
    order: tuple[Step, ...] = ()
    cuda_graph: bool = False
    label: str = "sequential"
    schema_version: ClassVar[int] = SCHEMA_VERSION

    def __post_init__(self) -> None:
        for name in ("split_sizes", "streams", "order"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ValueError(f"{name} must be a list, but got {short(getattr(self, name))}.")
        _set(self, "split_sizes", tuple(self.split_sizes))
        _set(self, "streams", tuple(_as(StreamSpec, s, "streams") for s in self.streams))
        _set(self, "order", tuple(_as(Step, s, "order") for s in self.order))
        self._check_fields()

    def _check_fields(self) -> None:
        if not isinstance(self.split_unit, str) or self.split_unit not in SPLIT_UNITS:
            raise ValueError(f"split_unit must be one of {SPLIT_UNITS}, but got {short(self.split_unit)}.")
        if not isinstance(self.label, str):
            raise ValueError(f"label must be a string, but got {short(self.label)}.")
        bad = [short(s) for s in self.split_sizes if not _is_int(s) or s < 1]
        if bad:
            shown = ", ".join(short(x) for x in self.split_sizes[:16]) + (", ..." if len(self.split_sizes) > 16 else "")
            raise ValueError(f"split_sizes must be positive ints, but got ({shown}) (bad: {', '.join(bad[:3])}).")
        if not 1 <= len(self.streams) <= MAX_STREAMS:
            raise ValueError(f"streams must hold 1..{MAX_STREAMS} streams, but got {len(self.streams)}.")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph must be a bool, but got {short(self.cuda_graph)}.")
        seen: set[tuple[str, int]] = set()
        for step in self.order:
            if not 0 <= step.nano < self.num_nano:
                raise ValueError(
                    f"order step {step} names nano-batch {step.nano}, but split_sizes "
                    f"{self.split_sizes!r} makes {self.num_nano} nano-batch(es)."
                )
            if not 0 <= step.stream < len(self.streams):
                raise ValueError(f"order step ({short(step.op)}, nano {step.nano}) names stream {step.stream}, but only "
                                 f"{len(self.streams)} exist.")
            if (step.op, step.nano) in seen:
                raise ValueError(f"order holds ({short(step.op)}, nano {step.nano}) twice; each step must appear once.")
            seen.add((step.op, step.nano))

    def __hash__(self) -> int:  # computed once: serving looks plans up by schedule on every call
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.split_unit, self.split_sizes, self.streams, self.order, self.cuda_graph, self.label))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def num_nano(self) -> int:
        return max(1, len(self.split_sizes))

    @property
    def is_sequential(self) -> bool:
        return self.num_nano == 1 and len(self.streams) == 1 and not self.order

    @property
    def total_sm_share(self) -> int | None:
        shares = [s.sm_share for s in self.streams if s.sm_share is not None]
        return sum(shares) if shares else None

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "split_unit": self.split_unit, "split_sizes": list(self.split_sizes),
                "streams": [{"sm_share": s.sm_share, "priority": s.priority} for s in self.streams],
                "order": [[s.op, s.nano, s.stream] for s in self.order],  # compact: orders get long
                "cuda_graph": self.cuda_graph, "label": self.label}

    def key(self) -> str:
        """What the schedule does, without its label: equal keys run the same way."""
        d = self.to_dict()
        del d["label"]
        return json.dumps(d, sort_keys=True)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Schedule":
        if not isinstance(d, Mapping):
            raise ValueError(f"a schedule must be a JSON object, but got {type(d).__name__}.")
        version = d.get("schema_version")
        if not _is_int(version) or version != SCHEMA_VERSION:
            raise ValueError(
                f"schedule schema_version must be {SCHEMA_VERSION}, but got {short(version)}; "
                "a newer dynaflow-tune wrote it, or it is not a schedule file."
            )
        known = _field_names(cls)
        unknown = sorted(str(k) for k in set(d) - known - {"schema_version"})
        if unknown:
            raise ValueError(f"schedule has unknown field(s) {[short(k) for k in unknown][:5]}; known: {sorted(known)}.")
        kwargs = {k: v for k, v in d.items() if k in known}
        if "order" in kwargs:
            if not isinstance(kwargs["order"], list):
                raise ValueError(f"order must be a list, but got {short(kwargs['order'])}.")
            kwargs["order"] = [_step_from_json(s) for s in kwargs["order"]]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        try:
            data = validate.loads(text)
        except validate.DuplicateKey as e:
            raise ValueError(f"a schedule: {e}.") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"a schedule must be JSON, but it is not ({e.msg} at line {e.lineno} column {e.colno}).") from None
        except RecursionError:
            raise ValueError("a schedule must be JSON, but it nests deeper than any schedule does.") from None
        return cls.from_dict(data)

    def __str__(self) -> str:
        shares = [s.sm_share for s in self.streams]
        return (f"Schedule({validate.clip(self.label)}: split {self.split_unit} {list(self.split_sizes) or 'whole'}, "
                f"{len(self.streams)} stream(s) shares={shares}, {len(self.order) or 'default'} steps, "
                f"cuda_graph={self.cuda_graph})")


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


@cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


@cache
def _required(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING)


def _as(cls: type, value: object, name: str) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        fields = _field_names(cls)
        unknown = sorted(str(k) for k in set(value) - fields)
        if unknown:
            raise ValueError(f"{name} entries have unknown field(s) {[short(k) for k in unknown][:5]}; "
                             f"known: {sorted(fields)}.")
        missing = sorted(name for name in _required(cls) if name not in value)
        if missing:
            raise ValueError(f"{name} entries need {missing}.")
        return cls(**value)
    raise ValueError(f"{name} entries must be {cls.__name__} or objects, but got {short(value)}.")


def _step_from_json(value: object) -> Step:
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return Step(op=value[0], nano=value[1], stream=value[2])
    if isinstance(value, Mapping):
        return _as(Step, value, "order")
    raise ValueError(f"order entries must be [op, nano, stream], but got {short(value)}.")

