"""Batch layout: which requests a batch holds and how each model input is indexed by them.

A nano-batch is a contiguous range of requests. Every batched input is indexed on one dim (0
unless `input_dims` says another, e.g. 1 for a [seq, batch, hidden] input) by flat tokens, by
all requests, or by the requests of one kind (e.g. only decode requests), so a request range maps
to one contiguous slice of each input: nano-batches are views, never copies.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

import torch

TOKENS = "tokens"
REQUESTS = "requests"


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchLayout:
    """request_tokens[i], request_kinds[i]: tokens and kind of request i, in batch order.
    input_axes[j]: how input j is indexed on dim 0: "tokens", "requests", a kind, or None (whole).
    output_axis: how the output is indexed ("tokens" or "requests"); a model returning a tuple (or
    list) of tensors has every element indexed by it, each on its own dim (`output_dims`)."""

    request_tokens: tuple[int, ...]
    request_kinds: tuple[str, ...]
    input_axes: tuple[str | None, ...]
    output_axis: str = TOKENS
    kinds: tuple[str, ...] = ()  # request kinds inputs may be indexed by, even if none is in this batch
    input_dims: tuple[int, ...] = ()  # the dim each input is batched on; () = dim 0 for every input
    output_dim: int = 0  # the dim the output is batched on
    output_dims: tuple[int, ...] = ()  # a tuple output: the dim of each element; () = output_dim for all

    def __post_init__(self) -> None:
        if not self.request_tokens:
            raise ValueError("a batch must hold at least one request, but request_tokens is empty.")
        if len(self.request_kinds) != len(self.request_tokens):
            raise ValueError(
                f"request_kinds has {len(self.request_kinds)} entries but request_tokens has "
                f"{len(self.request_tokens)}; they must match."
            )
        if min(self.request_tokens) < 1:
            raise ValueError(f"every request needs >= 1 token, but request_tokens={self.request_tokens!r}.")
        if self.input_dims and len(self.input_dims) != len(self.input_axes):
            raise ValueError(f"input_dims has {len(self.input_dims)} entries but input_axes has "
                             f"{len(self.input_axes)}; give one dim per input (or none: dim 0 for all).")
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0
               for d in (*self.input_dims, self.output_dim, *self.output_dims)):
            raise ValueError(f"input_dims, output_dim and output_dims must be ints >= 0, but got {self.input_dims!r}, "
                             f"{self.output_dim!r} and {self.output_dims!r}.")
        axes = {TOKENS, REQUESTS, *self.request_kinds, *self.kinds}
        for j, axis in enumerate((*self.input_axes, self.output_axis)):
            if axis is not None and axis not in axes:
                raise ValueError(f"input_axes[{j}]={axis!r} is not one of {sorted(axes)} or None.")
        if self.input_axes and all(a is None for a in self.input_axes) and self.output_axis is not None:
            raise ValueError(f"input_axes={self.input_axes!r} declares every input whole, but the output is batched by "
                             f"{self.output_axis!r}: each nano-batch would compute from the whole batch, so no split "
                             "of the output could be right; batch the input(s) the rows come from (input_axes).")

    @property
    def num_requests(self) -> int:
        return len(self.request_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.request_tokens)

    @classmethod
    def uniform(cls, num_rows: int, num_inputs: int) -> "BatchLayout":
        """Every input and the output indexed by the same rows (a user model with batch on dim 0)."""
        return cls(request_tokens=(1,) * num_rows, request_kinds=(REQUESTS,) * num_rows,
                   input_axes=(REQUESTS,) * num_inputs, output_axis=REQUESTS)

    def request_ranges(self, split_unit: str, split_sizes: tuple[int, ...]) -> list[tuple[int, int]]:
        """Nano-batches as request ranges [r0, r1). Raises ValueError naming the rule broken."""
        if not split_sizes:
            return [(0, self.num_requests)]
        if split_unit == REQUESTS:
            return _ranges_from_sizes(split_sizes, self.num_requests, "requests")
        token_ends = list(itertools.accumulate(self.request_tokens))
        ranges = _ranges_from_sizes(split_sizes, self.num_tokens, "tokens")
        request_of_end = {end: i + 1 for i, end in enumerate(token_ends)}
        for _, end in ranges[:-1]:
            if end not in request_of_end:
                raise ValueError(
                    f"split_sizes {list(split_sizes)} cut at token {end}, inside a request; token splits "
                    f"must fall on request boundaries (request ends: {token_ends[:8]}{'...' if len(token_ends) > 8 else ''})."
                )
        bounds = [0] + [request_of_end[end] for _, end in ranges]
        return list(zip(bounds, bounds[1:]))

    def nearest_cuts(self, fractions: list[float], allowed, unit: str = TOKENS) -> list[int]:
        """For each cumulative fraction of the batch (measured in tokens or requests), the allowed
        request boundary nearest to it (the smaller one on a tie)."""
        positions = list(itertools.accumulate(self.request_tokens, initial=0)) if unit == TOKENS \
            else range(self.num_requests + 1)
        if isinstance(allowed, range) and allowed.step == 1:  # positions rise: the nearest is beside the bisection
            lo, hi = max(allowed.start, 0), min(allowed.stop, len(positions))
            allowed = [r for f in fractions for k in (bisect.bisect_left(positions, f * positions[-1], lo, hi),)
                       for r in (k - 1, k) if lo <= r < hi]
        allowed = list(allowed)
        return [min(allowed, key=lambda r: (abs(positions[r] - f * positions[-1]), r)) for f in fractions]

    def slices(self, r0: int, r1: int) -> dict[str, slice]:
        """The dim-0 slice of every axis for requests [r0, r1)."""
        out = {REQUESTS: slice(r0, r1)}
        tok_before = sum(self.request_tokens[:r0])
        out[TOKENS] = slice(tok_before, tok_before + sum(self.request_tokens[r0:r1]))
        for kind in {*self.request_kinds, *self.kinds}:
            start = self.request_kinds[:r0].count(kind)
            out[kind] = slice(start, start + self.request_kinds[r0:r1].count(kind))
        return out

    def dim_of(self, j: int) -> int:
        return self.input_dims[j] if self.input_dims else 0

    def split_inputs(self, inputs: tuple[torch.Tensor, ...], r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        """Views of every batched input for requests [r0, r1); unbatched inputs pass whole."""
        if len(inputs) != len(self.input_axes):
            raise ValueError(f"the model takes {len(self.input_axes)} inputs per the layout, but got {len(inputs)}.")
        sl = self.slices(r0, r1)
        return tuple(x if axis is None else _narrow(x, self.dim_of(j), sl[axis])
                     for j, (x, axis) in enumerate(zip(inputs, self.input_axes)))

    def output_slice(self, r0: int, r1: int) -> slice:
        return self.slices(r0, r1)[self.output_axis]

    def output_view(self, out: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """The output's view for requests [r0, r1), on its batch dim."""
        return _narrow(out, self.output_dim, self.output_slice(r0, r1))

    def out_dim(self, i: int | None = None) -> int:
        """The batch dim of the output (i None) or of element i of a tuple output."""
        return self.output_dim if i is None or not self.output_dims else self.output_dims[i]

    def join(self, outputs: list):
        """The nano-batches' outputs (each a tensor or a flat tuple/list of tensors, in batch order)
        joined into the whole batch's, each tensor concatenated on its batch dim."""
        first = outputs[0]
        if isinstance(first, (tuple, list)):
            return type(first)(torch.cat([o[i] for o in outputs], dim=self.out_dim(i)) for i in range(len(first)))
        return torch.cat(outputs, dim=self.out_dim())

    def check(self, inputs: tuple, output=None) -> None:
        """Every batched input (and the output, or each element of a tuple output) must be as long
        on its batch dim as its axis is over the whole batch: a [seq, batch, hidden] input declared
        on dim 0 is one error here, not a silent wrong answer. Raises ValueError naming the input
        or output element, the dim and the axis."""
        whole = self.slices(0, self.num_requests)
        named = [(f"input {j}", x, axis, self.dim_of(j)) for j, (x, axis) in enumerate(zip(inputs, self.input_axes))]
        if isinstance(output, (tuple, list)):
            named += self._output_elements(output)
        elif output is not None:
            named.append(("the output", output, self.output_axis, self.output_dim))
        for name, x, axis, dim in named:
            if axis is None or not isinstance(x, torch.Tensor):
                continue
            want = whole[axis].stop - whole[axis].start
            if x.dim() <= dim or x.shape[dim] != want:
                got = f"has {x.shape[dim]} on dim {dim}" if x.dim() > dim else f"has only {x.dim()} dim(s)"
                where = "input_dims=..., output_dim=...)" if not name.startswith("output element") \
                    else "output_dims=...); an element not batched (a loss summed over the batch) cannot be split: " \
                         "return it from a separate call"
                raise ValueError(
                    f"{name} {got} (shape {list(x.shape)}), but the layout batches it by {axis!r} on dim {dim}, "
                    f"which has {want} in this batch: is the batch on another dim? say which with BatchLayout({where}.")

    def _output_elements(self, output) -> list[tuple]:
        if self.output_dims and len(self.output_dims) != len(output):
            raise ValueError(f"output_dims has {len(self.output_dims)} entries but the model returned "
                             f"{len(output)} outputs; give one dim per output (or none: output_dim for all).")
        for i, x in enumerate(output):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"output element {i} is a {type(x).__name__}, not a tensor: a model may return a "
                                 "tensor or a flat tuple/list of tensors batched like its inputs.")
        return [(f"output element {i}", x, self.output_axis, self.out_dim(i)) for i, x in enumerate(output)]


def _narrow(x: torch.Tensor, dim: int, sl: slice) -> torch.Tensor:
    return x[sl] if dim == 0 else x.narrow(dim, sl.start, sl.stop - sl.start)


def _ranges_from_sizes(sizes: tuple[int, ...], total: int, unit: str) -> list[tuple[int, int]]:
    if sum(sizes) != total:
        raise ValueError(
            f"split_sizes must sum to the batch's {total} {unit}, but {list(sizes)} sums to {sum(sizes)}."
        )
    ends = list(itertools.accumulate(sizes))
    return list(zip([0] + ends[:-1], ends))
