"""Opening a study's storage: any Optuna URL, or journal:PATH; with heartbeats on both.

- A tuner and readers (a notebook, optuna-dashboard, a second tuner) may open the same new
  SQLite file at once: Optuna's schema creation then races (`table ... already exists`,
  `UNIQUE constraint failed: alembic_version.version_num`). The loser retries: by then the
  schema is there.
- Heartbeats: each running trial's driver records one every `heartbeat_s`; a RUNNING trial
  whose heartbeat is older than the grace period belonged to a process that died, and
  `optuna.storages.fail_stale_trials` fails it. A second tuner on a live study leaves the
  first's trials alone. RDB storages have this built in; the journal gets it below. Optuna
  never fails a RUNNING trial that has no heartbeat at all, so a process killed between `ask`
  and its first beat would leave one RUNNING for ever: both storages here also fail a trial
  silent since its start for longer than the grace period.
"""
from __future__ import annotations

import random
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import optuna
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import TrialState

from dynaflow.runtime.files import check_file

SCHEMA_RETRIES = 8
HEARTBEAT_ATTR = "dynaflow_heartbeat"


@dataclass(frozen=True, kw_only=True, slots=True)
class StorageConfig:
    url: str = "sqlite:///results/studies.db"
    heartbeat_s: int = 10  # how often a running trial says it is alive
    grace_s: int | None = None  # silence after which it is stale; default 3 heartbeats

    def __post_init__(self) -> None:
        if "://" not in self.url and not self.url.startswith("journal:"):
            raise ValueError(f"--storage must be an Optuna storage URL such as sqlite:///results/studies.db "
                             f"or postgresql://user@host/db, or journal:PATH, but got {self.url!r}.")
        if self.heartbeat_s < 1 or (self.grace_s is not None and self.grace_s <= self.heartbeat_s):
            raise ValueError(f"--heartbeat-s must be >= 1 and the grace period longer than it, but got "
                             f"{self.heartbeat_s} and {self.grace_s}.")

    @property
    def grace_period_s(self) -> int:
        return self.grace_s or 3 * self.heartbeat_s


FORMS = "sqlite:///PATH, journal:PATH or a database URL such as postgresql://user@host/db"


def open_storage(config: StorageConfig | str, *, create: bool = True) -> BaseStorage | str:
    """A storage for `config` (a StorageConfig or a bare URL: readers need no heartbeat).
    Local folders are created. A local SQLite file is put in write-ahead-log mode: a notebook
    or optuna-dashboard can read it while the tuner writes, and each write costs half as much."""
    config = StorageConfig(url=config) if isinstance(config, str) else config
    url = config.url
    if url.startswith("sqlite:///") and url.endswith(":memory:"):
        return url
    from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError

    try:
        check_storage(url, create=create)
        if url.startswith("journal:"):
            return _journal(url.removeprefix("journal:"), config)
        if "://" not in url:
            raise ValueError(f"--storage {url!r} is not a URL: give {FORMS}")
        return _retry_schema(lambda: _rdb(url, config))
    except OSError as e:
        raise ValueError(f"--storage {url!r} cannot be opened: {e.strerror or e}"
                         f"{f' ({e.filename})' if getattr(e, 'filename', None) else ''}") from None
    except ImportError:
        raise ValueError(f"--storage {url!r} needs a database driver that is not installed: {driver_hint(url)}") \
            from None
    except NoSuchModuleError:  # SQLAlchemy knows no database of that name
        raise ValueError(f"--storage {url!r}: {url.split('://')[0]!r} is no database SQLAlchemy knows; give "
                         f"{FORMS}") from None
    except SQLAlchemyError as e:
        first = str(getattr(e, "orig", None) or e).splitlines()[0]
        raise ValueError(f"--storage {url!r} cannot be opened: {type(e).__name__}: {first}") from None


# the pip package of each driver SQLAlchemy may ask for (by its dialect's driver name)
DRIVERS = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "asyncpg": "asyncpg", "pg8000": "pg8000",
           "mysqldb": "mysqlclient", "pymysql": "pymysql", "oracledb": "oracledb", "pyodbc": "pyodbc"}


def driver_hint(url: str) -> str:
    """What to install for `url`'s database: the driver SQLAlchemy's dialect imports (for
    postgresql:// SQLAlchemy 2.1 takes psycopg 3, 2.0 psycopg2; postgresql+psycopg2:// names it)."""
    from sqlalchemy.engine.url import make_url

    try:
        driver = make_url(url).get_dialect().driver
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot read: the general advice
        return "install the driver SQLAlchemy uses for it"
    return f"pip install '{DRIVERS.get(driver, driver)}' (the {driver} driver SQLAlchemy uses for it)"


def check_storage(url: str, *, create: bool = True) -> None:
    """A file storage's path (sqlite:///PATH, journal:PATH) names a file in a writable folder,
    checked before any work, so a long search never ends in a storage that cannot be written;
    with create=False (readers) it must exist, and nothing is made."""
    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix):
            path = url.removeprefix(prefix)
            if not path or path.endswith("/"):
                raise ValueError(f"--storage {url!r} names no file: give {prefix}PATH, e.g. {prefix}results/studies."
                                 f"{'db' if prefix == 'sqlite:///' else 'journal'}")
            if not create and not Path(path).is_file():
                raise ValueError(f"--storage {url!r} names no storage: {path} does not exist (nothing was tuned "
                                 "there yet); give the --storage that `tune` used")
            if create:
                check_file(path, f"--storage {url!r}")


def _rdb(url: str, config: StorageConfig) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():  # heartbeat_interval is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = HeartbeatRDBStorage(url, heartbeat_interval=config.heartbeat_s, grace_period=config.grace_period_s)
    if url.startswith("sqlite:///"):
        _sqlite_wal(storage)
    return storage


def _retry_schema(make):
    """Retry what Optuna's schema creation races on when several processes open a new database."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(SCHEMA_RETRIES):
        try:
            return make()
        except (IntegrityError, OperationalError) as e:
            racing = "already exists" in str(e) or "UNIQUE constraint" in str(e) or "locked" in str(e)
            if not racing or attempt == SCHEMA_RETRIES - 1:
                raise
            time.sleep(0.05 * (attempt + 1) * (1 + random.random()))


def _sqlite_wal(storage: optuna.storages.RDBStorage) -> None:
    from sqlalchemy import event

    def on_connect(conn, _record) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # committed writes survive a killed process
        cur.execute("PRAGMA synchronous=NORMAL")  # only a power cut could lose the last commits
        cur.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened while creating the schema predate the pragmas


def _silent_since_start(trials: list[tuple[int, datetime | None]], grace_s: float) -> list[int]:
    """Ids of (id, start) RUNNING trials without a heartbeat that started over `grace_s` ago."""
    cutoff = datetime.now() - timedelta(seconds=grace_s)  # Optuna stamps starts in local time
    return [trial_id for trial_id, start in trials if start is not None and start < cutoff]


class HeartbeatRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage; a RUNNING trial that never beat is stale once past the grace period."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session) as session:
            rows = (session.query(models.TrialModel)
                    .filter(models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.RUNNING,
                            ~models.TrialModel.heartbeats.any()).all())
            never_beat = [(t.trial_id, t.datetime_start) for t in rows]  # local time, as Optuna reports it
        return super()._get_stale_trial_ids(study_id) + _silent_since_start(never_beat, self.grace_period)


def _journal(path: str, config: StorageConfig) -> "HeartbeatJournalStorage":
    from .journal import UnsyncedJournalBackend

    return HeartbeatJournalStorage(UnsyncedJournalBackend(path), heartbeat_s=config.heartbeat_s,
                                   grace_s=config.grace_period_s)


class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with heartbeats kept as a trial system attribute (one journal
    line each), so fail_stale_trials works on it as on an RDB storage."""

    def __init__(self, backend, *, heartbeat_s: int, grace_s: int) -> None:
        super().__init__(backend)
        self.heartbeat_s, self.grace_s = heartbeat_s, grace_s

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        beat = [t._trial_id for t in running
                if HEARTBEAT_ATTR in t.system_attrs and now - t.system_attrs[HEARTBEAT_ATTR] > self.grace_s]
        never = [(t._trial_id, t.datetime_start) for t in running if HEARTBEAT_ATTR not in t.system_attrs]
        return beat + _silent_since_start(never, self.grace_s)

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_s

    def get_heartbeat_stale_trial_callback(self):
        return None


class Heartbeat:
    """One thread recording a heartbeat for every trial this process is running (one trial in
    process, several in flight on a Ray pool); a trial stops beating when it is told."""

    def __init__(self, study: optuna.Study) -> None:
        self.storage = study._storage
        self.enabled = is_heartbeat_enabled(self.storage)
        self.trials: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = None
        if self.enabled:
            self.interval_s = self.storage.get_heartbeat_interval()
            self.thread = threading.Thread(target=self._run, name="dynaflow-heartbeat", daemon=True)
            self.thread.start()

    def add(self, trial: optuna.Trial) -> None:
        if self.enabled:
            self._beat(trial._trial_id)  # at once: a trial without a heartbeat never goes stale
            with self.lock:
                self.trials.add(trial._trial_id)

    def discard(self, trial: optuna.Trial) -> None:
        with self.lock:
            self.trials.discard(trial._trial_id)

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            with self.lock:
                ids = list(self.trials)
            for trial_id in ids:
                self._beat(trial_id)

    def _beat(self, trial_id: int) -> None:
        try:
            self.storage.record_heartbeat(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # told between reading the set and this write
        except Exception as e:  # a storage hiccup must not kill the tuner; the next beat retries
            warnings.warn(f"heartbeat for trial id {trial_id} failed: {type(e).__name__}: {e}")


def fail_stale_trials(study: optuna.Study) -> None:
    """RUNNING trials whose process stopped beating (killed, crashed) become FAIL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
