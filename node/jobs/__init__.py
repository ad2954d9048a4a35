"""The job store: one interface, two databases.

Every step of a study is a row state in the job database, so ``status`` can show what
is waiting, processing, delivered or failed and why, and a restarted node resumes
where the last process stopped.  Every change is one transaction: a kill at any
instant leaves the database at the last committed state, never in between.

Backends
--------
:class:`~node.jobs.sqlite.SQLiteJobStore` (also importable as :class:`JobStore`)
    One node, one file in the spool, nothing to install: the default.
:class:`~node.jobs.postgres.PostgresJobStore`
    Several nodes share one PostgreSQL database (``[database] url`` in
    ``config.toml``) and one spool directory.  Work is claimed with
    ``SELECT ... FOR UPDATE SKIP LOCKED``; every claim is a lease that the claiming
    node's heartbeat extends; a study or outbox item whose node stopped heart-beating
    is reclaimed by another node once the lease has expired.

:func:`open_job_store` picks the backend from the configuration.

Tables (the same in both)
-------------------------
``instances``  one row per received SOP Instance (its spool path, who sent it, what
               the pipeline made of it).
``studies``    one row per Study Instance UID: ``pending`` (receiving or waiting for
               the quiet period), ``processing``, ``processed``, ``failed``.
``outbox``     one row per (destination, result object): ``pending``, ``delivered``,
               ``dead`` (a dead letter, see ``retry``).
``reports``    the SR versions written for a study (for the Predecessor Documents
               Sequence of the next version).

PostgreSQL adds ``nodes`` (who is alive), ``receiving`` (which node has an open
association sending which study) and lease columns on ``studies`` and ``outbox``.

Paths: the records the methods return carry absolute paths on this node's mount of
the spool.  The ``path`` columns that :meth:`JobStoreBackend.query` returns raw are
absolute in SQLite but *relative to the spool root* in PostgreSQL: resolve them with
:func:`spool_absolute` (``config.storage.spool_dir``) before opening a file.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from node.errors import NodeError, SpoolError

if TYPE_CHECKING:
    from node.config import Config

# states
PENDING = "pending"
PROCESSING = "processing"
PROCESSED = "processed"
FAILED = "failed"
DELIVERED = "delivered"
DEAD = "dead"


class JobStoreUnavailableError(SpoolError):
    """The job database cannot be reached (PostgreSQL down, connection lost).

    A :class:`~node.errors.SpoolError`, so the SCP answers 0xA700 (out of
    resources) and acknowledges nothing it could not record.
    """


class LeaseLostError(NodeError):
    """This node's lease on a study expired and another node claimed it; the result
    of this node's attempt is discarded (the other node's counts)."""


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    calling_aet: str
    peer: str


@dataclass(frozen=True)
class StudyJob:
    """A study claimed by the worker: what to process, as of ``generation``."""

    study_instance_uid: str
    generation: int
    instances: tuple[InstanceRecord, ...]
    previous_report: Path | None
    """The latest SR written for this study, if any (predecessor of the next)."""


@dataclass(frozen=True)
class OutboxItem:
    id: int
    destination: str
    study_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    kind: str
    path: str
    attempts: int


@dataclass(frozen=True)
class OutputFile:
    """A result object written to the spool, ready to enter the outbox."""

    sop_instance_uid: str
    sop_class_uid: str
    kind: str
    """``sc``, ``sr``, ``pdf`` ..."""
    path: Path


class JobStoreBackend(Protocol):
    """What the SCP, the worker, the deliverer and ``status`` need from a job store.

    ``node_id`` is ``None`` for a store opened by a tool (``status``, ``retry``) and
    for the single-node SQLite store; a PostgreSQL store opened by a running node
    has one and holds leases under it.
    """

    node_id: str | None

    @property
    def heartbeat_seconds(self) -> float | None:
        """How often :meth:`heartbeat` must run, or ``None`` if it need not."""
        ...

    def close(self) -> None: ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """A read-only SQL query with ``?`` placeholders (portable SQL only)."""
        ...

    # receiving
    def has_instance(self, sop_instance_uid: str) -> bool: ...

    def record_instance(self, rec: InstanceRecord, now: float | None = None) -> bool: ...

    def record_ignored(
        self, ids: dict[str, str], calling_aet: str, peer: str, reason: str
    ) -> None: ...

    # processing
    def recover(self) -> int: ...

    def claim_ready_study(
        self, quiet_seconds: float, busy: frozenset[str] = frozenset(), now: float | None = None
    ) -> StudyJob | None: ...

    def settling_study(
        self, after_seconds: float, quiet_seconds: float, busy: frozenset[str] = frozenset(),
        max_instances: int = 16, skip: frozenset[str] = frozenset(),
        skip_generations: Mapping[str, int] | None = None, now: float | None = None,
    ) -> StudyJob | None: ...

    def queue_outputs(
        self,
        job: StudyJob,
        outputs: Sequence[OutputFile],
        destinations: Sequence[str],
        now: float | None = None,
    ) -> None:
        """Queue result objects of a study still processing for delivery at once (each
        as it is written, while the study is the only one in hand, so that one travels
        while the next is built).  :meth:`finish_study` queues the rest; an object already
        queued for a destination is not queued again.  The group store raises
        :class:`LeaseLostError` when this node no longer holds the study."""
        ...

    def finish_study(
        self,
        job: StudyJob,
        outputs: Sequence[OutputFile],
        destinations: Sequence[str],
        outcomes: dict[str, tuple[str, str]],
        decision: str,
        now: float | None = None,
    ) -> None: ...

    def fail_study(
        self, job: StudyJob, reason: str, retry_after: float | None, now: float | None = None
    ) -> None: ...

    def release_study(self, job: StudyJob) -> None:
        """Give back a study claimed and not yet started (a stopping worker): pending
        again at once, no attempt counted, for this or any node to claim."""
        ...

    def queued_everywhere(self, sop_instance_uid: str, destinations: Sequence[str]) -> bool: ...

    def study_attempts(self, study_instance_uid: str) -> int: ...

    def next_ready_time(self, quiet_seconds: float) -> float | None: ...

    # delivery
    def due_items(self, limit: int = 64, now: float | None = None) -> list[OutboxItem]: ...

    def next_due_time(self) -> float | None: ...

    def mark_delivered(self, item_id: int, now: float | None = None) -> bool: ...

    def mark_failed(
        self, item_id: int, error: str, *, dead: bool, retry_at: float, now: float | None = None
    ) -> None: ...

    def release_items(self, item_ids: Sequence[int]) -> None: ...

    def retry_dead(self, study_instance_uid: str | None = None) -> int: ...

    # retention
    def expired_studies(self, older_than: float) -> list[str]: ...

    def forget_sources(self, study_instance_uid: str) -> None: ...

    # leases and status
    def heartbeat(self, busy: frozenset[str] = frozenset()) -> None: ...

    def counts(self) -> dict[str, dict[str, int]]: ...

    def leases(self) -> list[dict[str, Any]]: ...

    def nodes(self) -> list[dict[str, Any]]: ...


_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def node_name(config: Config) -> str:
    """This node's name among the nodes sharing a database: ``[database] node_name``,
    else ``<host name>-<port>``.  Safe as a file name (the spool's per-node ``tmp/``)."""
    name = config.database.node_name or f"{socket.gethostname()}-{config.node.port}"
    return _NAME_UNSAFE.sub("_", name)


def open_job_store(config: Config, *, as_node: bool = False) -> JobStoreBackend:
    """The job store the configuration names.

    Parameters
    ----------
    config
        ``[database] url`` set (``postgresql://...``): the shared PostgreSQL store;
        absent: the SQLite file ``[storage] database``.
    as_node
        Open it for a running node: with PostgreSQL the process registers in
        ``nodes`` under ``<node name>#<pid>`` and may hold leases.  Tools such as
        ``status`` leave it false.
    """
    if not config.database.url:
        return SQLiteJobStore(config.storage.database)
    from node.jobs.postgres import PostgresJobStore

    node_id = f"{node_name(config)}#{os.getpid()}" if as_node else None
    return PostgresJobStore(
        config.database.url,
        spool_root=config.storage.spool_dir,
        node_id=node_id,
        lease_seconds=config.database.lease_seconds,
        heartbeat_seconds=config.database.heartbeat_seconds or config.database.lease_seconds / 3,
        ae_title=config.node.ae_title,
    )


def spool_relative(root: Path, path: str | Path) -> str:
    """``path`` relative to the spool root when it lies under it (the form stored in
    a shared database, since every node may mount the spool elsewhere)."""
    p = Path(path)
    if p.is_absolute():
        try:
            return str(p.relative_to(root))
        except ValueError:
            return str(p)
    return str(p)


def spool_absolute(root: Path, path: str) -> str:
    """The inverse of :func:`spool_relative` for this node's mount point."""
    p = Path(path)
    return str(p if p.is_absolute() else root / p)


# The single-node backend is the historical ``JobStore``: ``from node.jobs import
# JobStore`` and ``JobStore(path)`` keep working.  Imported last: it uses the names
# above.
from node.jobs.sqlite import SQLiteJobStore  # noqa: E402

JobStore = SQLiteJobStore

__all__ = [
    "DEAD", "DELIVERED", "FAILED", "PENDING", "PROCESSED", "PROCESSING",
    "InstanceRecord", "JobStore", "JobStoreBackend", "JobStoreUnavailableError",
    "LeaseLostError", "OutboxItem", "OutputFile", "SQLiteJobStore", "StudyJob",
    "node_name", "open_job_store", "spool_absolute", "spool_relative",
]
