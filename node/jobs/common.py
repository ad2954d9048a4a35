"""What the two job stores share: the portable SQL and the methods built only on it.

Both backends have the same tables (see :mod:`node.jobs`) and a ``query`` method
that takes SQLite-style ``?`` placeholders, so every read that needs neither leases
nor a backend's own dialect is written once, here.  The statements a backend runs on
its own cursor are kept here too, with ``?``; :mod:`node.jobs.postgres` turns them
into psycopg's ``%s`` with :func:`node.jobs.postgres._placeholders`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: The columns of :class:`~node.jobs.InstanceRecord`, in its order.
INSTANCE_COLUMNS = ("sop_instance_uid, study_instance_uid, series_instance_uid, sop_class_uid, "
                    "transfer_syntax_uid, path, size, calling_aet, peer")

#: A claimed study's instances (those still held in the spool), in processing order.
CLAIMED_INSTANCES = (f"SELECT {INSTANCE_COLUMNS} FROM instances WHERE study_instance_uid = ? "
                     "AND path IS NOT NULL ORDER BY series_instance_uid, received_at")

#: The latest SR written for a study (the predecessor of the next version).
LATEST_REPORT = ("SELECT path FROM reports WHERE study_instance_uid = ? "
                 "ORDER BY generation DESC, created_at DESC LIMIT 1")

#: Record one instance's outcome (``finish_study``).
SET_OUTCOME = "UPDATE instances SET outcome = ?, reason = ? WHERE sop_instance_uid = ?"

#: Queue one result object for one destination (``finish_study``); an object already
#: queued for that destination stays as it is (a retry re-records the same UIDs).
QUEUE_OUTPUT = ("INSERT INTO outbox (destination, study_instance_uid, sop_instance_uid, "
                "sop_class_uid, kind, path, state, next_attempt_at, created_at) "
                "VALUES (?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (destination, sop_instance_uid) DO NOTHING")

#: Record an SR version of a study (``finish_study``; the predecessor of the next).
RECORD_REPORT = ("INSERT INTO reports (sop_instance_uid, study_instance_uid, generation, "
                 "path, created_at) VALUES (?,?,?,?,?) "
                 "ON CONFLICT (sop_instance_uid) DO UPDATE SET "
                 "study_instance_uid = excluded.study_instance_uid, "
                 "generation = excluded.generation, path = excluded.path, "
                 "created_at = excluded.created_at")

#: Retention has deleted a study's sources.
FORGET_SOURCES = "UPDATE instances SET path = NULL WHERE study_instance_uid = ?"

class SharedQueries:
    """The read-only methods of :class:`~node.jobs.JobStoreBackend` that both backends
    answer with the same SQL through their ``query``."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether the instance is held (received and still in the spool)."""
        return bool(self.query(
            "SELECT 1 FROM instances WHERE sop_instance_uid = ? AND path IS NOT NULL",
            [sop_instance_uid]))

    def queued_everywhere(self, sop_instance_uid: str, destinations: Sequence[str]) -> bool:
        """True when the result object is already in the outbox of every destination."""
        if not destinations:
            return False
        rows = self.query(
            "SELECT COUNT(DISTINCT destination) AS n FROM outbox WHERE sop_instance_uid = ?",
            [sop_instance_uid],
        )
        return int(rows[0]["n"]) >= len(destinations)

    def study_attempts(self, study_instance_uid: str) -> int:
        rows = self.query(
            "SELECT attempts FROM studies WHERE study_instance_uid = ?", [study_instance_uid]
        )
        return int(rows[0]["attempts"]) if rows else 0

    def next_due_time(self) -> float | None:
        rows = self.query("SELECT MIN(next_attempt_at) AS t FROM outbox WHERE state = 'pending'")
        value = rows[0]["t"] if rows else None
        return float(value) if value is not None else None

    def next_ready_time(self, quiet_seconds: float) -> float | None:
        """When the next pending study will have been quiet for ``quiet_seconds`` and
        past its retry time (epoch seconds on the store's clock), or ``None``."""
        rows = self.query(
            "SELECT MIN(CASE WHEN last_received_at + ? > not_before THEN last_received_at + ? "
            "ELSE not_before END) AS t FROM studies WHERE state = 'pending'",
            [quiet_seconds, quiet_seconds],
        )
        value = rows[0]["t"] if rows else None
        return float(value) if value is not None else None

    def expired_studies(self, older_than: float) -> list[str]:
        """Processed studies whose every outbox row is delivered and that have been
        quiet since ``older_than`` (epoch seconds): their sources may go."""
        rows = self.query(
            "SELECT s.study_instance_uid AS uid FROM studies s WHERE s.state = 'processed' "
            "AND s.updated_at <= ? AND NOT EXISTS (SELECT 1 FROM outbox o WHERE "
            "o.study_instance_uid = s.study_instance_uid AND o.state != 'delivered') "
            "AND EXISTS (SELECT 1 FROM instances i WHERE "
            "i.study_instance_uid = s.study_instance_uid AND i.path IS NOT NULL)",
            [older_than],
        )
        return [r["uid"] for r in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """How many studies and outbox rows are in each state (``status``)."""
        out: dict[str, dict[str, int]] = {}
        for table in ("studies", "outbox"):
            rows = self.query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            out[table] = {r["state"]: int(r["n"]) for r in rows}
        return out
