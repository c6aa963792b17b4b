"""Tables of stored schedules and of a study's trials, with pandas."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from dynaflow.runtime.store import ScheduleStore, StoreConfig


def stored_table(root: Path) -> pd.DataFrame:
    rows = []
    for path, rec in ScheduleStore(StoreConfig(root=root)).records():
        if isinstance(rec, ValueError):
            rows.append({"hardware": path.parent.name, "workload": path.stem, "schedule": f"UNREADABLE: {rec}"})
            continue
        rows.append({"hardware": rec.hardware.key, "workload": rec.workload.key, "schedule": rec.schedule.label,
                     "speedup": round(rec.speedup, 3), "noise": round(rec.speedup_spread, 3),
                     "tokens_per_s": round(rec.tokens_per_s), "efficiency": rec.efficiency and round(rec.efficiency, 3),
                     "space": rec.space, "trial": rec.trial, "created_at": rec.created_at})
    return pd.DataFrame(rows)
