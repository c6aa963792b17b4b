"""Flags of the tuner's commands; their bodies import optuna only when they run."""
from __future__ import annotations


def add_tuner_commands(sub, common, measure_flags) -> None:
    pass
