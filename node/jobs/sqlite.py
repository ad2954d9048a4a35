"""The single-node job store: SQLite through sqlite-utils, WAL, synchronous=FULL.

One process owns the file (in the spool by default): it needs no leases, and
:meth:`SQLiteJobStore.recover` puts every study left ``processing`` back to
``pending``, since only a killed earlier process of this node can have left it so.
The schema version is SQLite's ``user_version``.  See :mod:`node.jobs` for the
tables and the interface.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from node.errors import NodeError
from node.jobs import (
    DEAD,
    PENDING,
    InstanceRecord,
    OutboxItem,
    OutputFile,
    StudyJob,
)
from node.jobs.common import (
    CLAIMED_INSTANCES,
    FORGET_SOURCES,
    LATEST_REPORT,
    QUEUE_OUTPUT,
    RECORD_REPORT,
    SET_OUTCOME,
    SharedQueries,
)

#: The schema this code writes (``PRAGMA user_version``); 1 is the original.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT,
    size INTEGER NOT NULL,
    calling_aet TEXT NOT NULL,
    peer TEXT NOT NULL,
    received_at REAL NOT NULL,
    outcome TEXT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    last_received_at REAL NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    processed_generation INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    reason TEXT,
    decision TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    delivered_at REAL,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS reports (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    path TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


def _study_job(conn: sqlite3.Connection, study_uid: str, generation: int) -> StudyJob:
    """A study as it is now in the database: its held instances and latest SR."""
    inst = conn.execute(CLAIMED_INSTANCES, [study_uid]).fetchall()
    report = conn.execute(LATEST_REPORT, [study_uid]).fetchone()
    return StudyJob(
        study_instance_uid=study_uid,
        generation=generation,
        instances=tuple(InstanceRecord(*r) for r in inst),
        previous_report=Path(report[0]) if report else None,
    )


class SQLiteJobStore(SharedQueries):
    """Thread-safe access to the job database of one node.

    One connection guarded by a lock: every method is one short transaction.

    Parameters
    ----------
    path
        The SQLite file (created, mode 0600, with its directory, mode 0700).
    """

    node_id: str | None = None
    """A single-node store holds no leases."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                               timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            conn.close()
            raise NodeError(f"{path.name}: schema version {version} is newer than this "
                            f"node's ({SCHEMA_VERSION}); upgrade the node")
        conn.executescript(_SCHEMA)  # version 1, idempotent (also for files older than it)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(path) + suffix)
            if p.exists():
                p.chmod(0o600)
        self._conn = conn
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()

    @property
    def heartbeat_seconds(self) -> float | None:
        return None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.query(sql, params))

    # -- receiving -----------------------------------------------------------------

    def record_instance(self, rec: InstanceRecord, now: float | None = None) -> bool:
        """Record a received instance and touch its study (reopening it if it was
        processed).  Returns False if the instance was already held (duplicate)."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT path FROM instances WHERE sop_instance_uid = ?", [rec.sop_instance_uid]
            ).fetchone()
            if row is not None and row[0] is not None:
                return False
            conn.execute(
                "INSERT OR REPLACE INTO instances (sop_instance_uid, study_instance_uid, "
                "series_instance_uid, sop_class_uid, transfer_syntax_uid, path, size, "
                "calling_aet, peer, received_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [rec.sop_instance_uid, rec.study_instance_uid, rec.series_instance_uid,
                 rec.sop_class_uid, rec.transfer_syntax_uid, rec.path, rec.size,
                 rec.calling_aet, rec.peer, now],
            )
            conn.execute(
                "INSERT INTO studies (study_instance_uid, state, last_received_at, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(study_instance_uid) DO UPDATE SET "
                "state = CASE WHEN state = 'processing' THEN state ELSE 'pending' END, "
                "generation = generation + 1, last_received_at = excluded.last_received_at, "
                "attempts = 0, not_before = 0, updated_at = excluded.updated_at",
                [rec.study_instance_uid, PENDING, now, now],
            )
        return True

    def record_ignored(
        self, ids: dict[str, str], calling_aet: str, peer: str, reason: str
    ) -> None:
        """Record an instance that is acknowledged but deliberately not kept (the
        node's own output).  Its study is not touched."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO instances (sop_instance_uid, study_instance_uid, "
                "series_instance_uid, sop_class_uid, transfer_syntax_uid, path, size, "
                "calling_aet, peer, received_at, outcome, reason) "
                "VALUES (?,?,?,?,'',NULL,0,?,?,?,'ignored',?)",
                [ids["sop"], ids["study"], ids["series"], ids["sop_class"], calling_aet, peer,
                 time.time(), reason],
            )

    # -- processing ------------------------------------------------------------------

    def recover(self) -> int:
        """After a restart: studies left ``processing`` by a killed process go back
        to ``pending``.  Returns how many."""
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE studies SET state = 'pending', updated_at = ? WHERE state = 'processing'",
                [time.time()],
            )
            return cur.rowcount

    def claim_ready_study(
        self, quiet_seconds: float, busy: frozenset[str] = frozenset(), now: float | None = None
    ) -> StudyJob | None:
        """Claim the oldest study that has been quiet for ``quiet_seconds`` and is not
        being sent by an open association (``busy``)."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            rows = conn.execute(
                "SELECT study_instance_uid, generation FROM studies WHERE state = 'pending' "
                "AND last_received_at <= ? AND not_before <= ? ORDER BY last_received_at",
                [now - quiet_seconds, now],
            ).fetchall()
            chosen = next((r for r in rows if r[0] not in busy), None)
            if chosen is None:
                return None
            study_uid, generation = chosen
            conn.execute(
                "UPDATE studies SET state = 'processing', updated_at = ? "
                "WHERE study_instance_uid = ?",
                [now, study_uid],
            )
            return _study_job(conn, study_uid, generation)

    def settling_study(
        self, after_seconds: float, quiet_seconds: float, busy: frozenset[str] = frozenset(),
        max_instances: int = 16, skip: frozenset[str] = frozenset(),
        skip_generations: Mapping[str, int] | None = None, now: float | None = None,
    ) -> StudyJob | None:
        """The oldest pending study quiet for ``after_seconds`` but not yet for
        ``quiet_seconds``, with at most ``max_instances`` instances, not being sent by an
        open association (``busy``), not in ``skip`` and not at the generation
        ``skip_generations`` gives for it (work already done): what it holds now, *not
        claimed* (its state is unchanged).  The worker may start on it early
        (``[worker] early_start_seconds``) and uses the work only if the study it later
        claims is this one at the same generation."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            rows = conn.execute(
                "SELECT s.study_instance_uid, s.generation, COUNT(i.sop_instance_uid) "
                "FROM studies s JOIN instances i ON i.study_instance_uid = s.study_instance_uid "
                "AND i.path IS NOT NULL WHERE s.state = 'pending' AND s.not_before <= ? "
                "AND s.last_received_at <= ? AND s.last_received_at > ? "
                "GROUP BY s.study_instance_uid, s.generation, s.last_received_at "
                "ORDER BY s.last_received_at",
                [now, now - after_seconds, now - quiet_seconds],
            ).fetchall()
            seen = skip_generations or {}
            chosen = next((r for r in rows if r[0] not in busy and r[0] not in skip
                           and seen.get(r[0]) != r[1] and r[2] <= max_instances), None)
            if chosen is None:
                return None
            study_uid, generation, _ = chosen
            return _study_job(conn, study_uid, generation)

    def finish_study(
        self,
        job: StudyJob,
        outputs: Sequence[OutputFile],
        destinations: Sequence[str],
        outcomes: dict[str, tuple[str, str]],
        decision: str,
        now: float | None = None,
    ) -> None:
        """Record a processed study in one transaction: instance outcomes, the
        outbox rows (one per destination and object; objects already queued for a
        destination are not queued again), the SR version, and the study state.

        If instances arrived while the study was processing (its generation moved
        on), it goes back to ``pending`` and is processed again.
        """
        now = time.time() if now is None else now
        with self.transaction() as conn:
            for sop_uid, (outcome, reason) in outcomes.items():
                conn.execute(SET_OUTCOME, [outcome, reason, sop_uid])
            _queue(conn, job, outputs, destinations, now)
            for out in outputs:
                if out.kind == "sr":
                    conn.execute(RECORD_REPORT,
                                 [out.sop_instance_uid, job.study_instance_uid, job.generation,
                                  str(out.path), now])
            conn.execute(
                "UPDATE studies SET state = CASE WHEN generation = ? THEN 'processed' "
                "ELSE 'pending' END, processed_generation = ?, reason = NULL, decision = ?, "
                "attempts = 0, updated_at = ? WHERE study_instance_uid = ?",
                [job.generation, job.generation, decision, now, job.study_instance_uid],
            )

    def queue_outputs(
        self,
        job: StudyJob,
        outputs: Sequence[OutputFile],
        destinations: Sequence[str],
        now: float | None = None,
    ) -> None:
        """Outbox rows for objects of a study still processing (each as it is written),
        in one transaction; :meth:`finish_study` queues the rest."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            _queue(conn, job, outputs, destinations, now)

    def fail_study(
        self, job: StudyJob, reason: str, retry_after: float | None, now: float | None = None
    ) -> None:
        """A processing attempt raised.  ``retry_after`` seconds later it is tried
        again; ``None`` marks the study ``failed`` (shown by ``status``)."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            if retry_after is None:
                conn.execute(
                    "UPDATE studies SET state = 'failed', reason = ?, attempts = attempts + 1, "
                    "updated_at = ? WHERE study_instance_uid = ?",
                    [reason, now, job.study_instance_uid],
                )
            else:
                conn.execute(
                    "UPDATE studies SET state = 'pending', reason = ?, attempts = attempts + 1, "
                    "not_before = ?, updated_at = ? WHERE study_instance_uid = ?",
                    [reason, now + retry_after, now, job.study_instance_uid],
                )

    def release_study(self, job: StudyJob) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE studies SET state = 'pending', updated_at = ? "
                "WHERE study_instance_uid = ? AND state = 'processing'",
                [time.time(), job.study_instance_uid],
            )

    # -- delivery ---------------------------------------------------------------------

    def due_items(self, limit: int = 64, now: float | None = None) -> list[OutboxItem]:
        now = time.time() if now is None else now
        rows = self.query(
            "SELECT id, destination, study_instance_uid, sop_instance_uid, sop_class_uid, kind, "
            "path, attempts FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? "
            "ORDER BY destination, id LIMIT ?",
            [now, limit],
        )
        return [OutboxItem(**r) for r in rows]

    def mark_delivered(self, item_id: int, now: float | None = None) -> bool:
        """Mark one outbox row delivered.  Returns True when no other destination
        still needs the same file (it may then be deleted)."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            conn.execute(
                "UPDATE outbox SET state = 'delivered', delivered_at = ?, last_error = NULL, "
                "attempts = attempts + 1 WHERE id = ?",
                [now, item_id],
            )
            path = conn.execute("SELECT path FROM outbox WHERE id = ?", [item_id]).fetchone()[0]
            left = conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE path = ? AND state != 'delivered'", [path]
            ).fetchone()[0]
        return left == 0

    def mark_failed(
        self, item_id: int, error: str, *, dead: bool, retry_at: float, now: float | None = None
    ) -> None:
        now = time.time() if now is None else now
        with self.transaction() as conn:
            conn.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?, "
                "next_attempt_at = ? WHERE id = ?",
                [DEAD if dead else PENDING, error, retry_at, item_id],
            )

    def retry_dead(self, study_instance_uid: str | None = None) -> int:
        """Requeue dead letters (all, or one study's).  Returns how many."""
        now = time.time()
        with self.transaction() as conn:
            sql = ("UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ? "
                   "WHERE state = 'dead'")
            params: list[Any] = [now]
            if study_instance_uid:
                sql += " AND study_instance_uid = ?"
                params.append(study_instance_uid)
            n = conn.execute(sql, params).rowcount
            sql = ("UPDATE studies SET state = 'pending', attempts = 0, not_before = 0, "
                   "updated_at = ? WHERE state = 'failed'")
            params = [now]
            if study_instance_uid:
                sql += " AND study_instance_uid = ?"
                params.append(study_instance_uid)
            n += conn.execute(sql, params).rowcount
        return n

    # -- retention ----------------------------------------------------------------------

    def forget_sources(self, study_instance_uid: str) -> None:
        with self.transaction() as conn:
            conn.execute(FORGET_SOURCES, [study_instance_uid])

    # -- leases (none: one node) --------------------------------------------------------

    def heartbeat(self, busy: frozenset[str] = frozenset()) -> None:
        """Nothing to extend: a single-node store holds no leases."""

    def release_items(self, item_ids: Sequence[int]) -> None:
        """Nothing to release: outbox items are not leased here."""

    def leases(self) -> list[dict[str, Any]]:
        """No leases in a single-node store (``status`` shows the states)."""
        return []

    def nodes(self) -> list[dict[str, Any]]:
        """A single-node store knows no other nodes."""
        return []


def _queue(conn: sqlite3.Connection, job: StudyJob, outputs: Sequence[OutputFile],
           destinations: Sequence[str], now: float) -> None:
    """One pending outbox row per destination and object (none for a pair already
    queued)."""
    for out in outputs:
        for dest in destinations:
            conn.execute(QUEUE_OUTPUT, [dest, job.study_instance_uid, out.sop_instance_uid,
                                        out.sop_class_uid, out.kind, str(out.path), PENDING,
                                        now, now])
