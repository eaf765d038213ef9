"""The catalog: profiles of a store's variants in ``STORE/catalog.sqlite``.

SQLite in WAL mode, so a ``memadapt show`` can read while a profile run
writes. The schema is versioned with ``PRAGMA user_version`` and grown by the
``MIGRATIONS`` list (never edit an applied migration: append a new one).
Every measurement is written in its own transaction as soon as it completes,
so an interrupted run keeps what it finished; rows are upserted, so
re-profiling replaces a row in place.

Keys: per-batch results by (variant key, device fingerprint, backend, batch);
accuracy by (variant key, device type, backend, eval set), because accuracy
depends on the numerics of the device type and backend, not on the machine.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from profiler.device import DeviceInfo
from profiler.errors import ProfilerError
from profiler.memory import MemoryFit

log = logging.getLogger(__name__)

#: statuses that count as done: a resumed run skips them (an "error" is retried)
DONE_STATUSES = ("ok", "oom")

BATCH_COLUMNS = (
    "variant_key", "variant", "device_fp", "device_type", "backend", "batch", "status",
    "error", "baseline_bytes", "static_memory_bytes", "load_peak_bytes", "peak_memory_bytes",
    "memory_method", "allocator", "latency_p50_s", "latency_p95_s", "latency_p99_s",
    "latency_mean_s", "latency_std_s", "throughput", "runs", "threads", "load_cold_s",
    "load_warm_s", "seconds", "measured_at",
)
GROUP_FIDELITY_COLUMNS = (
    "group_name", "variant_key", "variant", "reference_key", "reference", "device_type",
    "backend", "eval_set", "samples", "fidelity", "fidelity_metric", "measured_at",
)
ACCURACY_COLUMNS = (
    "variant_key", "variant", "device_type", "backend", "eval_set", "device_fp", "status",
    "error", "samples", "accuracy", "fidelity", "fidelity_metric", "seconds", "measured_at",
)

MIGRATIONS: list[Sequence[str]] = [
    # 1: the initial schema
    (
        """CREATE TABLE devices (
            fingerprint TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            cpu TEXT NOT NULL,
            gpu TEXT,
            driver TEXT,
            versions TEXT NOT NULL,
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL)""",
        """CREATE TABLE batch_profiles (
            variant_key TEXT NOT NULL,
            variant TEXT NOT NULL,
            device_fp TEXT NOT NULL REFERENCES devices(fingerprint),
            device_type TEXT NOT NULL,
            backend TEXT NOT NULL,
            batch INTEGER NOT NULL,
            status TEXT NOT NULL,
            error TEXT,
            baseline_bytes INTEGER,
            static_memory_bytes INTEGER,
            load_peak_bytes INTEGER,
            peak_memory_bytes INTEGER,
            memory_method TEXT,
            allocator TEXT,
            latency_p50_s REAL,
            latency_p95_s REAL,
            latency_p99_s REAL,
            latency_mean_s REAL,
            latency_std_s REAL,
            throughput REAL,
            runs INTEGER,
            threads INTEGER,
            load_cold_s REAL,
            load_warm_s REAL,
            seconds REAL,
            measured_at TEXT NOT NULL,
            PRIMARY KEY (variant_key, device_fp, backend, batch))""",
        """CREATE TABLE accuracy (
            variant_key TEXT NOT NULL,
            variant TEXT NOT NULL,
            device_type TEXT NOT NULL,
            backend TEXT NOT NULL,
            eval_set TEXT NOT NULL,
            device_fp TEXT,
            status TEXT NOT NULL,
            error TEXT,
            samples INTEGER,
            accuracy REAL,
            fidelity REAL,
            fidelity_metric TEXT,
            seconds REAL,
            measured_at TEXT NOT NULL,
            PRIMARY KEY (variant_key, device_type, backend, eval_set))""",
        """CREATE TABLE memory_fits (
            variant_key TEXT NOT NULL,
            device_fp TEXT NOT NULL,
            backend TEXT NOT NULL,
            static_bytes REAL NOT NULL,
            per_sample_bytes REAL NOT NULL,
            residual_bytes REAL NOT NULL,
            batches TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (variant_key, device_fp, backend))""",
        "CREATE INDEX batch_profiles_device ON batch_profiles (device_type, backend)",
    ),
    # 2: fidelity of a group's members to the group's most accurate member (variants.groups)
    (
        """CREATE TABLE group_fidelity (
            group_name TEXT NOT NULL,
            variant_key TEXT NOT NULL,
            variant TEXT NOT NULL,
            reference_key TEXT NOT NULL,
            reference TEXT NOT NULL,
            device_type TEXT NOT NULL,
            backend TEXT NOT NULL,
            eval_set TEXT NOT NULL,
            samples INTEGER,
            fidelity REAL,
            fidelity_metric TEXT,
            measured_at TEXT NOT NULL,
            PRIMARY KEY (group_name, variant_key, reference_key, device_type, backend,
                         eval_set))""",
    ),
]


def schema_version() -> int:
    """The schema version this code writes (the number of migrations)."""
    return len(MIGRATIONS)


def now() -> str:
    # microseconds: tests and resumed runs tell rows apart by when they were written
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


class Catalog:
    """An open catalog database. Use as a context manager; one per thread."""

    def __init__(self, path: str | Path, *, timeout: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT)
        self.conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        try:
            mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("catalog %s: journal mode %s, not WAL (file system without "
                            "shared memory?); readers may wait for writers", self.path, mode)
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise ProfilerError(f"{self.path} is not a usable catalog ({e}); move it away and "
                                f"profile again") from None

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    @property
    def version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        have = self.version
        want = schema_version()
        if have > want:
            raise ProfilerError(f"catalog {self.path} has schema version {have}, newer than this "
                                f"memadapt understands ({want}); upgrade memadapt")
        for v in range(have, want):
            with self.transaction():
                # another process may have migrated between our check and the lock
                if self.version > v:
                    continue
                for stmt in MIGRATIONS[v]:
                    self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version = {v + 1}")
            log.info("catalog %s: migrated to schema version %d", self.path, v + 1)

    def transaction(self):
        """``with cat.transaction():`` one atomic write (BEGIN IMMEDIATE ... COMMIT)."""
        return _Transaction(self.conn)

    # -- writes: each one its own transaction ---------------------------------------------

    def record_device(self, info: DeviceInfo) -> None:
        t = now()
        with self.transaction():
            self.conn.execute(
                """INSERT INTO devices (fingerprint, type, cpu, gpu, driver, versions, first_seen,
                   last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(fingerprint) DO UPDATE SET last_seen = excluded.last_seen""",
                (info.fingerprint, info.type, info.cpu, info.gpu, info.driver,
                 json.dumps(dict(info.versions), sort_keys=True), t, t))

    def upsert_batch(self, row: dict[str, Any]) -> None:
        self._upsert("batch_profiles", BATCH_COLUMNS,
                     ("variant_key", "device_fp", "backend", "batch"), row)

    def upsert_accuracy(self, row: dict[str, Any]) -> None:
        self._upsert("accuracy", ACCURACY_COLUMNS,
                     ("variant_key", "device_type", "backend", "eval_set"), row)

    def upsert_group_fidelity(self, row: dict[str, Any]) -> None:
        self._upsert("group_fidelity", GROUP_FIDELITY_COLUMNS,
                     ("group_name", "variant_key", "reference_key", "device_type", "backend",
                      "eval_set"), row)

    def group_fidelity_rows(self, device_type: str, backend: str) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM group_fidelity WHERE device_type = ? AND "
                                 "backend = ? ORDER BY measured_at",
                                 (device_type, backend)).fetchall()

    def upsert_fit(self, variant_key: str, device_fp: str, backend: str,
                   fit: MemoryFit | None) -> None:
        with self.transaction():
            if fit is None:
                self.conn.execute("DELETE FROM memory_fits WHERE variant_key = ? AND "
                                  "device_fp = ? AND backend = ?",
                                  (variant_key, device_fp, backend))
                return
            self.conn.execute(
                """INSERT INTO memory_fits VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(variant_key, device_fp, backend) DO UPDATE SET
                   static_bytes = excluded.static_bytes,
                   per_sample_bytes = excluded.per_sample_bytes,
                   residual_bytes = excluded.residual_bytes, batches = excluded.batches,
                   updated_at = excluded.updated_at""",
                (variant_key, device_fp, backend, fit.static_bytes, fit.per_sample_bytes,
                 fit.residual_bytes, json.dumps(list(fit.batches)), now()))

    def _upsert(self, table: str, columns: Sequence[str], key: Sequence[str],
                row: dict[str, Any]) -> None:
        unknown = set(row) - set(columns)
        if unknown:
            raise ProfilerError(f"unknown {table} columns {sorted(unknown)}")
        row = {"measured_at": now(), **row}
        cols = [c for c in columns if c in row]
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in key)
        sql = (f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
               f"({', '.join('?' for _ in cols)}) ON CONFLICT({', '.join(key)}) "
               f"DO UPDATE SET {updates}")
        with self.transaction():
            self.conn.execute(sql, [row[c] for c in cols])

    # -- reads -----------------------------------------------------------------------------

    def devices(self, device_type: str | None = None) -> list[sqlite3.Row]:
        sql = "SELECT * FROM devices"
        args: tuple = ()
        if device_type:
            sql, args = sql + " WHERE type = ?", (device_type,)
        return self.conn.execute(sql + " ORDER BY last_seen DESC", args).fetchall()

    def batch_rows(self, device_fp: str, backend: str,
                   keys: Iterable[str] | None = None) -> list[sqlite3.Row]:
        rows = self.conn.execute("SELECT * FROM batch_profiles WHERE device_fp = ? AND "
                                 "backend = ? ORDER BY variant, batch",
                                 (device_fp, backend)).fetchall()
        if keys is not None:
            wanted = set(keys)
            rows = [r for r in rows if r["variant_key"] in wanted]
        return rows

    def accuracy_rows(self, device_type: str, backend: str) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM accuracy WHERE device_type = ? AND backend = ? "
                                 "ORDER BY measured_at", (device_type, backend)).fetchall()

    def fits(self, device_fp: str, backend: str) -> dict[str, MemoryFit]:
        out = {}
        for r in self.conn.execute("SELECT * FROM memory_fits WHERE device_fp = ? AND "
                                   "backend = ?", (device_fp, backend)):
            out[r["variant_key"]] = MemoryFit(r["static_bytes"], r["per_sample_bytes"],
                                              r["residual_bytes"],
                                              tuple(json.loads(r["batches"])))
        return out

    def done_batches(self, device_fp: str, backend: str,
                     allocator: str = "pinned") -> set[tuple[str, int]]:
        """(variant key, batch) pairs a resumed run must not measure again (a row measured
        under another allocator setting is measured again and replaced)."""
        q = ("SELECT variant_key, batch FROM batch_profiles WHERE device_fp = ? AND backend = ? "
             f"AND status IN ({', '.join('?' for _ in DONE_STATUSES)}) "
             "AND allocator = ?")
        return {(r[0], int(r[1])) for r in
                self.conn.execute(q, (device_fp, backend, *DONE_STATUSES, allocator))}

    def done_accuracy(self, device_type: str, backend: str) -> set[tuple[str, str]]:
        """(variant key, eval set) pairs with a finished accuracy measurement."""
        q = ("SELECT variant_key, eval_set FROM accuracy WHERE device_type = ? AND backend = ? "
             "AND status = 'ok'")
        return {(r[0], r[1]) for r in self.conn.execute(q, (device_type, backend))}


class _Transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
        return False
