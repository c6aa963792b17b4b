"""Disjoint SM partitions from CUDA green contexts, through cuda-bindings' driver API.

torch's own GreenContext.create() splits the whole device on each call, so two of them can
overlap (pytorch/pytorch#195378). Here the device's SM resource is split once, one share after
another from what remains, so the partitions are disjoint by construction. Shares are rounded
up by the driver to its granularity (8 SMs on Hopper); the granted sizes are returned.
"""
from __future__ import annotations

import torch


class PartitionUnavailable(RuntimeError):
    """Raised with the reason when SM partitions cannot be made on this device or stack."""


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise PartitionUnavailable(f"CUDA driver call failed with {err!r}")
    return rest[0] if len(rest) == 1 else rest


def make_partitioned_streams(device_index: int, shares: list[int], priorities: list[int]):
    """One stream per share, on disjoint SM partitions. Returns (streams, granted SM counts)."""
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise PartitionUnavailable(f"cuda-bindings is not installed ({e}); pip install cuda-python") from None
    torch.cuda.init()
    dev = _check(driver.cuDeviceGet(device_index))
    remaining = _check(driver.cuDeviceGetDevResource(dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    streams, granted = [], []
    for share, priority in zip(shares, priorities):
        groups, _, remaining = _check(driver.cuDevSmResourceSplitByCount(1, remaining, 0, share))
        part = groups[0]
        desc = _check(driver.cuDevResourceGenerateDesc([part], 1))
        ctx = _check(driver.cuGreenCtxCreate(desc, dev, driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
        raw = _check(driver.cuGreenCtxStreamCreate(ctx, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, priority))
        streams.append(torch.cuda.get_stream_from_external(int(raw), device=device_index))
        granted.append(int(part.sm.smCount))
    return streams, granted
