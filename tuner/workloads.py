"""Parse workload specs given on the command line: d<requests>x<context>[+p<tokens>[c<chunk>]]."""
from __future__ import annotations

import re

from dynaflow.runtime import Workload
from dynaflow.runtime.devices import device_type

_SPEC = re.compile(r"(?:d(?P<d>[0-9]+)x(?P<c>[0-9]+))?(?:\+?p(?P<p>[0-9]+)(?:c(?P<chunk>[0-9]+))?)?")
FORMAT = "d<decode requests>x<context>[+p<prefill tokens>[c<chunk>]], e.g. d256x2048+p512 or p512c128"


def parse_workload(spec: str, *, model: str, dtype: str, device: str, tp: int = 1,
                   sequence_parallel: bool = False) -> Workload:
    m = _SPEC.fullmatch(spec.strip())
    if not spec.strip() or m is None or not any(m.groupdict().values()):
        raise ValueError(f"workload {spec!r} must look like {FORMAT}.")
    g = {k: int(v) if v else 0 for k, v in m.groupdict().items()}
    if m.group("d") is not None and m.group("p") is not None and "+p" not in spec:
        fixed = spec.strip().replace("p", "+p", 1)
        raise ValueError(f"workload {spec!r}: a prefill part after the decode part needs '+' ({fixed!r}); "
                         f"it must look like {FORMAT}.")
    if g["d"] == 0 and g["p"] == 0:
        raise ValueError(f"workload {spec!r} holds no tokens (no decode request, no prefill token); it must look "
                         f"like {FORMAT} with at least one request or token.")
    return Workload(model=model, num_decode=g["d"], context_len=g["c"], prefill_tokens=g["p"],
                    prefill_chunk=g["chunk"] or None, dtype=dtype, device=device, tp=tp,
                    sequence_parallel=sequence_parallel)


def default_dtype(dtype: str | None, device: str) -> str:
    """The dtype a flag left unset means: bfloat16 on a GPU, float32 on a CPU."""
    return dtype or device_type(device).default_dtype
