"""The baseline: one nano-batch, one stream, ops in graph order."""
from dynaflow.runtime import Schedule

from .base import SpaceContext, Trial

name = "sequential"


def suggest(trial: Trial, ctx: SpaceContext) -> Schedule:
    return Schedule(label="sequential")
