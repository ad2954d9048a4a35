"""The job store, one suite for both backends: SQLite (a file) and PostgreSQL (a real
server started by tests/pgserver.py).

Every test of the interface runs on both (the ``backend`` fixture): recording,
quiet period and busy set, claims, finishing and reopening, retries and dead
letters, delivery bookkeeping, retention, start-up recovery, drain on close,
schema versions (migration in place, a newer schema refused).

The tests after "several nodes" run on PostgreSQL only, because what they test does
not exist in a single-node store: two stores on one database (a study split across
nodes, another node receiving it, rows another node has locked: SQLite has no row
locks, and one process owns its file), leases and their heartbeat (SQLite holds no
leases: ``leases()`` and ``nodes()`` are empty and ``heartbeat`` does nothing),
outbox items leased to one node (a single node has one deliverer), paths relative to
a spool that several nodes mount elsewhere, the take-over limit, and an unreachable
server.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from node.errors import SpoolError
from node.jobs import (
    DEAD,
    DELIVERED,
    FAILED,
    PENDING,
    PROCESSED,
    PROCESSING,
    InstanceRecord,
    JobStore,
    JobStoreBackend,
    JobStoreUnavailableError,
    LeaseLostError,
    OutputFile,
    SQLiteJobStore,
)
from node.jobs.postgres import SCHEMA_VERSION, PostgresJobStore, migrate
from pgserver import shared_server

Factory = Callable[..., JobStoreBackend]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def spool_root(tmp_path: Path) -> Path:
    root = tmp_path / "spool"
    root.mkdir()
    return root


@pytest.fixture
def make_store(backend: str, tmp_path: Path, spool_root: Path) -> Iterator[Factory]:
    """Opens stores on one database: ``make_store("node-a")``, ``make_store("node-b")``."""
    opened: list[JobStoreBackend] = []
    url = shared_server().new_database() if backend == "postgres" else ""

    def make(node_id: str = "node-a#1", lease_seconds: float = 30.0) -> JobStoreBackend:
        store: JobStoreBackend
        if backend == "sqlite":
            store = JobStore(tmp_path / "jobs.sqlite")
        else:
            store = PostgresJobStore(url, spool_root, node_id=node_id,
                                     lease_seconds=lease_seconds, heartbeat_seconds=1.0)
        opened.append(store)
        return store

    make.url = url  # type: ignore[attr-defined]
    yield make
    for store in opened:
        try:
            store.close()
        except Exception:
            pass


@pytest.fixture
def store(make_store: Factory) -> JobStoreBackend:
    return make_store()


def _rec(spool_root: Path, sop: str, study: str = "1.2.3",
         series: str = "1.2.3.1") -> InstanceRecord:
    return InstanceRecord(sop, study, series, "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1",
                          str(spool_root / "incoming" / study / f"{sop}.dcm"), 1000, "TESTSCU",
                          "127.0.0.1:1")


def _out(spool_root: Path, sop: str, kind: str = "sc", study: str = "1.2.3") -> OutputFile:
    area = "reports" if kind == "sr" else "outbox"
    return OutputFile(sop, "1.2.840.10008.5.1.4.1.1.7", kind,
                      spool_root / area / study / f"{sop}.dcm")


def _state(store: JobStoreBackend, study: str = "1.2.3") -> dict[str, Any]:
    return store.query("SELECT * FROM studies WHERE study_instance_uid = ?", [study])[0]


# -- both backends ---------------------------------------------------------------------------


def test_jobstore_name_is_the_sqlite_store() -> None:
    assert JobStore is SQLiteJobStore


def test_record_is_idempotent_and_touches_the_study(store: JobStoreBackend,
                                                     spool_root: Path) -> None:
    assert not store.has_instance("1.9.1")
    assert store.record_instance(_rec(spool_root, "1.9.1"))
    assert store.has_instance("1.9.1")
    assert not store.record_instance(_rec(spool_root, "1.9.1")), "duplicate recorded twice"
    assert store.record_instance(_rec(spool_root, "1.9.2"))
    row = _state(store)
    assert row["state"] == PENDING and row["generation"] == 2
    assert len(store.query("SELECT * FROM instances")) == 2


def test_ignored_instance_does_not_open_a_study(store: JobStoreBackend) -> None:
    store.record_ignored({"sop": "1.9.9", "study": "1.2.3", "series": "1.2.3.9",
                          "sop_class": "1.2.840.10008.5.1.4.1.1.7"}, "ORTHANC", "x:1", "own-output")
    assert store.query("SELECT * FROM studies") == []
    assert not store.has_instance("1.9.9")
    row = store.query("SELECT outcome, reason FROM instances")[0]
    assert (row["outcome"], row["reason"]) == ("ignored", "own-output")


def test_claim_waits_for_quiet_period_and_busy_set(store: JobStoreBackend,
                                                   spool_root: Path) -> None:
    t0 = time.time()
    store.record_instance(_rec(spool_root, "1.9.1"), now=t0)
    store.record_instance(_rec(spool_root, "1.9.2", series="1.2.3.2"), now=t0)
    assert store.claim_ready_study(10.0, now=t0 + 5) is None
    assert store.claim_ready_study(10.0, busy=frozenset({"1.2.3"}), now=t0 + 11) is None
    job = store.claim_ready_study(10.0, now=t0 + 11)
    assert job is not None
    assert job.study_instance_uid == "1.2.3" and job.generation == 2
    assert sorted(i.sop_instance_uid for i in job.instances) == ["1.9.1", "1.9.2"]
    assert [i.path for i in job.instances] == [
        str(spool_root / "incoming" / "1.2.3" / f"{s}.dcm") for s in ("1.9.1", "1.9.2")]
    assert job.previous_report is None
    assert _state(store)["state"] == PROCESSING
    assert store.claim_ready_study(10.0, now=t0 + 12) is None, "claimed twice"


def test_a_settling_study_is_offered_as_it_is_without_being_claimed(store: JobStoreBackend,
                                                                    spool_root: Path) -> None:
    """What an early start works on: a pending study between ``after`` and the quiet
    period, not busy, not skipped, not larger than the room; it stays pending, and its
    claim later holds the same generation and instances."""
    t0 = time.time()
    store.record_instance(_rec(spool_root, "1.9.1"), now=t0)
    store.record_instance(_rec(spool_root, "1.9.2", series="1.2.3.2"), now=t0)
    assert store.settling_study(1.0, 10.0, now=t0 + 0.5) is None, "not yet settled"
    assert store.settling_study(1.0, 10.0, now=t0 + 11) is None, "ready: claimed, not peeked"
    assert store.settling_study(1.0, 10.0, busy=frozenset({"1.2.3"}), now=t0 + 2) is None
    assert store.settling_study(1.0, 10.0, skip=frozenset({"1.2.3"}), now=t0 + 2) is None
    assert store.settling_study(1.0, 10.0, max_instances=1, now=t0 + 2) is None
    assert store.settling_study(1.0, 10.0, skip_generations={"1.2.3": 2}, now=t0 + 2) is None
    early = store.settling_study(1.0, 10.0, skip_generations={"1.2.3": 1}, now=t0 + 2)
    assert early is not None and early.generation == 2, "a generation ago: offered again"
    assert sorted(i.sop_instance_uid for i in early.instances) == ["1.9.1", "1.9.2"]
    assert _state(store)["state"] == PENDING, "an early start claims nothing"
    claimed = store.claim_ready_study(10.0, now=t0 + 11)
    assert claimed is not None
    assert (claimed.generation, claimed.instances) == (early.generation, early.instances)


def test_next_ready_time_is_the_end_of_a_quiet_period_or_a_retry(store: JobStoreBackend,
                                                                spool_root: Path) -> None:
    """What the worker sleeps until: the earliest moment a pending study may be claimed."""
    assert store.next_ready_time(10.0) is None
    t0 = 1000.0
    store.record_instance(_rec(spool_root, "1.9.1"), now=t0)
    store.record_instance(_rec(spool_root, "1.9.4", study="1.2.4"), now=t0 + 3)
    assert store.next_ready_time(10.0) == pytest.approx(t0 + 10)
    job = store.claim_ready_study(10.0, now=t0 + 11)
    assert job is not None and job.study_instance_uid == "1.2.3"
    assert store.next_ready_time(10.0) == pytest.approx(t0 + 13), "a claimed study is not waited for"
    store.fail_study(job, "decoder crashed", retry_after=60.0, now=t0 + 12)
    later = store.claim_ready_study(10.0, now=t0 + 14)
    assert later is not None and later.study_instance_uid == "1.2.4"
    assert store.next_ready_time(10.0) == pytest.approx(t0 + 72), "the retry time counts"


def test_finish_queues_each_output_once_per_destination(store: JobStoreBackend,
                                                         spool_root: Path) -> None:
    store.record_instance(_rec(spool_root, "1.9.1"), now=1000.0)
    job = store.claim_ready_study(1.0, now=1002.0)
    assert job is not None
    outputs = [_out(spool_root, "1.8.1"), _out(spool_root, "1.8.2", "sr")]
    store.finish_study(job, outputs, ["pacs", "backup"], {"1.9.1": ("analysed", "")}, "negative")
    row = _state(store)
    assert (row["state"], row["decision"], row["processed_generation"]) == (PROCESSED,
                                                                           "negative", 1)
    rows = store.query("SELECT destination, sop_instance_uid, state FROM outbox ORDER BY id")
    assert sorted((r["destination"], r["sop_instance_uid"]) for r in rows) == [
        ("backup", "1.8.1"), ("backup", "1.8.2"), ("pacs", "1.8.1"), ("pacs", "1.8.2")]
    assert {r["state"] for r in rows} == {PENDING}
    assert store.queued_everywhere("1.8.1", ["pacs", "backup"])
    assert not store.queued_everywhere("1.8.1", ["pacs", "backup", "third"])
    outcome = store.query("SELECT outcome FROM instances")[0]["outcome"]
    assert outcome == "analysed"

    # a late instance reopens it; the next claim names the SR as predecessor, and
    # finishing again queues the unchanged SC nowhere twice
    store.record_instance(_rec(spool_root, "1.9.2"), now=1010.0)
    assert _state(store)["state"] == PENDING
    job2 = store.claim_ready_study(1.0, now=1012.0)
    assert job2 is not None and job2.generation == 2
    assert job2.previous_report == spool_root / "reports" / "1.2.3" / "1.8.2.dcm"
    store.finish_study(job2, [_out(spool_root, "1.8.1"), _out(spool_root, "1.8.3", "sr")],
                       ["pacs", "backup"], {}, "negative")
    assert len(store.query("SELECT * FROM outbox")) == 6
    assert len(store.query("SELECT * FROM reports")) == 2


def test_instances_arriving_while_processing_reopen_after_finish(store: JobStoreBackend,
                                                                 spool_root: Path) -> None:
    store.record_instance(_rec(spool_root, "1.9.1"), now=1000.0)
    job = store.claim_ready_study(1.0, now=1002.0)
    assert job is not None
    store.record_instance(_rec(spool_root, "1.9.2"), now=1003.0)
    assert _state(store)["state"] == PROCESSING
    store.finish_study(job, [], ["pacs"], {}, "negative")
    assert _state(store)["state"] == PENDING
    job2 = store.claim_ready_study(1.0, now=1005.0)
    assert job2 is not None and len(job2.instances) == 2 and job2.generation == 2


def test_failures_retry_then_fail_and_retry_dead_requeues(store: JobStoreBackend,
                                                           spool_root: Path) -> None:
    store.record_instance(_rec(spool_root, "1.9.1"), now=1000.0)
    job = store.claim_ready_study(1.0, now=1002.0)
    assert job is not None
    store.fail_study(job, "boom", retry_after=5.0, now=1002.0)
    assert store.study_attempts("1.2.3") == 1
    assert store.claim_ready_study(1.0, now=1004.0) is None, "retried before not_before"
    job = store.claim_ready_study(1.0, now=1008.0)
    assert job is not None
    store.fail_study(job, "boom again", retry_after=None)
    row = _state(store)
    assert (row["state"], row["reason"]) == (FAILED, "boom again")
    assert store.retry_dead("1.2.3") == 1
    assert _state(store)["state"] == PENDING


def test_delivery_bookkeeping(store: JobStoreBackend, spool_root: Path) -> None:
    store.record_instance(_rec(spool_root, "1.9.1"), now=1000.0)
    job = store.claim_ready_study(1.0, now=1002.0)
    assert job is not None
    store.finish_study(job, [_out(spool_root, "1.8.1")], ["pacs", "backup"], {}, "x", now=1003.0)
    items = store.due_items(now=1004.0)
    assert [(i.destination, i.sop_instance_uid) for i in items] == [("backup", "1.8.1"),
                                                                   ("pacs", "1.8.1")]
    assert items[0].path == str(spool_root / "outbox" / "1.2.3" / "1.8.1.dcm")
    backup, pacs = items
    assert not store.mark_delivered(backup.id), "file still needed by pacs"
    store.mark_failed(pacs.id, "rejected", dead=False, retry_at=1010.0)
    store.release_items([i.id for i in items])
    assert store.due_items(now=1005.0) == []
    assert store.next_due_time() == 1010.0
    again = store.due_items(now=1011.0)
    assert [i.id for i in again] == [pacs.id] and again[0].attempts == 1
    store.mark_failed(pacs.id, "rejected", dead=True, retry_at=1020.0)
    states = {r["destination"]: r["state"] for r in store.query("SELECT * FROM outbox")}
    assert states == {"backup": DELIVERED, "pacs": DEAD}
    assert store.counts()["outbox"] == {DELIVERED: 1, DEAD: 1}
    assert store.retry_dead() == 1
    item = store.due_items()[0]
    assert store.mark_delivered(item.id), "last destination delivered: file may go"


def test_retention_lists_delivered_studies_once(store: JobStoreBackend,
                                                spool_root: Path) -> None:
    store.record_instance(_rec(spool_root, "1.9.1"), now=1000.0)
    job = store.claim_ready_study(1.0, now=1002.0)
    assert job is not None
    store.finish_study(job, [_out(spool_root, "1.8.1")], ["pacs"], {}, "x", now=1003.0)
    assert store.expired_studies(older_than=2000.0) == [], "undelivered result"
    store.mark_delivered(store.due_items()[0].id)
    assert store.expired_studies(older_than=1002.0) == [], "not old enough"
    assert store.expired_studies(older_than=2000.0) == ["1.2.3"]
    store.forget_sources("1.2.3")
    assert store.expired_studies(older_than=2000.0) == []
    assert not store.has_instance("1.9.1")


def test_recover_resets_a_dead_process_s_claims(backend: str, make_store: Factory,
                                                spool_root: Path) -> None:
    first = make_store("node-a#1", lease_seconds=30.0)
    first.record_instance(_rec(spool_root, "1.9.1"), now=1000.0)
    assert first.claim_ready_study(1.0, now=1002.0) is not None
    if backend == "sqlite":  # one node: whatever is processing was left by a dead process
        assert make_store().recover() == 1
    else:  # shared: only once the lease (server clock, claimed at 1002 + 30) has expired
        assert make_store("node-b#2").recover() == 1
    assert _state(first)["state"] == PENDING


def test_schema_is_versioned_and_reopening_keeps_data(backend: str, make_store: Factory,
                                                      spool_root: Path) -> None:
    store = make_store()
    store.record_instance(_rec(spool_root, "1.9.1"))
    store.close()
    again = make_store()
    assert again.has_instance("1.9.1")
    if backend == "sqlite":
        assert again.query("PRAGMA user_version")[0]["user_version"] == 1
    else:
        rows = again.query("SELECT version FROM schema_version ORDER BY version")
        assert [r["version"] for r in rows] == list(range(1, SCHEMA_VERSION + 1))


def test_a_stopped_node_s_claim_is_free_for_the_next_claimer(backend: str, make_store: Factory,
                                                            spool_root: Path) -> None:
    """Drain on close.  PostgreSQL: ``close`` gives the leases back and marks the node
    stopped, so another live node claims the study at once, without waiting for the
    lease.  SQLite (one node): a stopped process's claim is reset by ``recover`` when
    the node starts again; nothing else can have taken it meanwhile."""
    a = make_store("node-a#1")
    a.record_instance(_rec(spool_root, "1.9.1"), now=time.time() - 10)
    assert a.claim_ready_study(1.0) is not None
    a.close()
    b = make_store("node-b#2")
    if backend == "sqlite":
        assert _state(b)["state"] == PROCESSING, "nothing may touch it before recovery"
        assert b.recover() == 1
    else:
        assert b.leases() == []
        assert {n["node_id"]: n["alive"] for n in b.nodes()} == {"node-a#1": False,
                                                                "node-b#2": True}
        assert b.recover() == 0, "drained: nothing left for recovery"
    assert _state(b)["state"] == PENDING
    job = b.claim_ready_study(1.0)
    assert job is not None, "a drained study was not free at once"
    b.finish_study(job, [_out(spool_root, "1.8.1")], ["pacs"], {}, "x")
    assert _state(b)["state"] == PROCESSED


def test_an_older_schema_is_migrated_in_place(backend: str, make_store: Factory,
                                             tmp_path: Path) -> None:
    """The node migrates the schema itself and keeps the data.  SQLite: a file of the
    node before the schema was versioned (``user_version`` 0) is adopted as version 1.
    PostgreSQL: a version-1 database (one node's tables) gains the lease columns and
    the ``nodes`` and ``receiving`` tables (version 2)."""
    if backend == "sqlite":
        from node.jobs.sqlite import _SCHEMA, SCHEMA_VERSION as SQLITE_VERSION

        con = sqlite3.connect(tmp_path / "jobs.sqlite")
        con.executescript(_SCHEMA)
        con.execute("INSERT INTO studies (study_instance_uid, state, last_received_at, "
                    "updated_at) VALUES ('1.2.3', 'processed', 1, 1)")
        con.commit()
        assert con.execute("PRAGMA user_version").fetchone()[0] == 0
        con.close()
        store = make_store()
        assert _state(store)["state"] == PROCESSED
        assert store.query("PRAGMA user_version")[0]["user_version"] == SQLITE_VERSION
        return
    url = make_store.url  # type: ignore[attr-defined]
    with psycopg.connect(url, autocommit=True) as conn:
        assert migrate(conn, target=1) == 0
        conn.execute("INSERT INTO studies (study_instance_uid, state, last_received_at, "
                     "updated_at) VALUES ('1.2.3', 'processed', 1, 1)")
    store = make_store()
    assert _state(store)["state"] == PROCESSED and _state(store)["owner"] is None
    rows = store.query("SELECT version FROM schema_version ORDER BY version")
    assert [r["version"] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
    assert store.nodes()[0]["node_id"] == "node-a#1", "version 2's nodes table is in use"


def test_a_newer_schema_is_refused_not_written(backend: str, make_store: Factory,
                                              tmp_path: Path) -> None:
    """A database written by a newer node (e.g. after a rolled-back upgrade) is refused
    with a message that says what to do, and left as it was."""
    from node.errors import NodeError

    make_store().close()
    if backend == "sqlite":
        con = sqlite3.connect(tmp_path / "jobs.sqlite")
        con.execute("PRAGMA user_version = 99")
        con.close()
    else:
        with psycopg.connect(make_store.url, autocommit=True) as conn:  # type: ignore[attr-defined]
            conn.execute("INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(NodeError) as info:
        make_store()
    assert "schema version 99 is newer than this node's" in str(info.value)
    assert "upgrade the node" in str(info.value)
    if backend == "sqlite":
        con = sqlite3.connect(tmp_path / "jobs.sqlite")
        assert con.execute("PRAGMA user_version").fetchone()[0] == 99, "written to"
        con.close()


# -- PostgreSQL: several nodes on one database -------------------------------------------------


@pytest.fixture
def pg(make_store: Factory, backend: str) -> Factory:
    if backend != "postgres":
        pytest.skip("several nodes share a database only with PostgreSQL")
    return make_store


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_paths_are_stored_relative_to_the_spool(pg: Factory, spool_root: Path) -> None:
    store = pg()
    store.record_instance(_rec(spool_root, "1.9.1"))
    assert store.query("SELECT path FROM instances")[0]["path"] == "incoming/1.2.3/1.9.1.dcm"
    store.heartbeat(frozenset())  # its association closed
    other_mount = spool_root.parent / "elsewhere"
    reader = PostgresJobStore(pg.url, other_mount, node_id="node-b#2")  # type: ignore[attr-defined]
    try:
        job = reader.claim_ready_study(0.001, now=time.time() + 1)
        assert job is not None
        assert job.instances[0].path == str(other_mount / "incoming" / "1.2.3" / "1.9.1.dcm")
        # results written under the reader's mount are stored relative too, and every
        # node resolves them under its own mount (outbox items, the SR's predecessor)
        reader.finish_study(job, [_out(other_mount, "1.8.1"), _out(other_mount, "1.8.2", "sr")],
                            ["pacs"], {}, "x")
        rows = store.query("SELECT path FROM outbox UNION ALL SELECT path FROM reports")
        assert sorted(r["path"] for r in rows) == [
            "outbox/1.2.3/1.8.1.dcm", "reports/1.2.3/1.8.2.dcm", "reports/1.2.3/1.8.2.dcm"]
        items = store.due_items()  # type: ignore[union-attr]
        assert sorted(i.path for i in items) == [
            str(spool_root / "outbox" / "1.2.3" / "1.8.1.dcm"),
            str(spool_root / "reports" / "1.2.3" / "1.8.2.dcm")]
        store.release_items([i.id for i in items])
        store.record_instance(_rec(spool_root, "1.9.2"))
        store.heartbeat(frozenset())
        again = store.claim_ready_study(0.001, now=time.time() + 1)
        assert again is not None
        assert again.previous_report == spool_root / "reports" / "1.2.3" / "1.8.2.dcm"
    finally:
        reader.close()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_study_split_across_nodes_is_one_job(pg: Factory, spool_root: Path) -> None:
    a, b = pg("node-a#1"), pg("node-b#2")
    t0 = time.time()
    a.record_instance(_rec(spool_root, "1.9.1"), now=t0)
    b.record_instance(_rec(spool_root, "1.9.2"), now=t0 + 4)
    a.record_instance(_rec(spool_root, "1.9.3"), now=t0 + 1)  # late arrival, older clock
    assert len(a.query("SELECT * FROM studies")) == 1
    b.heartbeat(frozenset())  # both associations closed
    # the quiet period runs from the last arrival anywhere (b's), not from a's own
    assert a.claim_ready_study(5.0, now=t0 + 6) is None
    job = a.claim_ready_study(5.0, now=t0 + 9.5)
    assert job is not None and job.generation == 3
    assert sorted(i.sop_instance_uid for i in job.instances) == ["1.9.1", "1.9.2", "1.9.3"]
    assert b.claim_ready_study(5.0, now=t0 + 9.6) is None


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_study_another_node_is_receiving_is_not_claimed(pg: Factory, spool_root: Path) -> None:
    a, b = pg("node-a#1"), pg("node-b#2")
    a.record_instance(_rec(spool_root, "1.9.1"))  # a's association is still open
    a.heartbeat(frozenset({"1.2.3"}))
    assert b.claim_ready_study(0.001, now=time.time() + 1) is None
    a.heartbeat(frozenset())  # a's association closed
    assert b.claim_ready_study(0.001, now=time.time() + 1) is not None


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_claims_skip_rows_another_node_has_locked(pg: Factory, spool_root: Path) -> None:
    a = pg("node-a#1")
    t0 = time.time() - 100
    a.record_instance(_rec(spool_root, "1.9.1", study="1.2.3"), now=t0)
    a.record_instance(_rec(spool_root, "1.9.2", study="1.2.4"), now=t0 + 1)
    with psycopg.connect(pg.url) as other:  # type: ignore[attr-defined]
        # another node in the middle of claiming the older study
        other.execute("SELECT 1 FROM studies WHERE study_instance_uid = '1.2.3' FOR UPDATE")
        started = time.monotonic()
        job = a.claim_ready_study(1.0)
        waited = time.monotonic() - started
        other.rollback()
    assert job is not None and job.study_instance_uid == "1.2.4", "did not skip the locked row"
    assert waited < 20, "waited for the other node's lock instead of skipping it"


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_expired_lease_is_taken_over_and_the_old_owner_discarded(pg: Factory,
                                                                 spool_root: Path) -> None:
    a, b = pg("node-a#1", lease_seconds=5.0), pg("node-b#2", lease_seconds=5.0)
    t0 = time.time()
    a.record_instance(_rec(spool_root, "1.9.1"), now=t0)
    job_a = a.claim_ready_study(1.0, now=t0 + 2)
    assert job_a is not None
    lease = b.leases()
    assert [(x["kind"], x["owner"], x["lease_expires_at"]) for x in lease] == [
        ("study", "node-a#1", t0 + 7)]
    assert b.claim_ready_study(1.0, now=t0 + 6) is None, "taken before the lease expired"
    job_b = b.claim_ready_study(1.0, now=t0 + 8)
    assert job_b is not None and job_b.generation == job_a.generation
    with pytest.raises(LeaseLostError):
        a.finish_study(job_a, [_out(spool_root, "1.8.1")], ["pacs"], {}, "late")
    with pytest.raises(LeaseLostError):
        a.fail_study(job_a, "late", retry_after=1.0)
    b.finish_study(job_b, [_out(spool_root, "1.8.1")], ["pacs"], {}, "negative")
    row = _state(b)
    assert (row["state"], row["decision"], row["processed_by"]) == (PROCESSED, "negative",
                                                                   "node-b#2")
    assert len(b.query("SELECT * FROM outbox")) == 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_heartbeat_renews_and_recovery_spares_live_leases(pg: Factory, spool_root: Path) -> None:
    a, b = pg("node-a#1", lease_seconds=30.0), pg("node-b#2")
    a.record_instance(_rec(spool_root, "1.9.1"), now=time.time() - 10)
    assert a.claim_ready_study(1.0) is not None
    before = a.leases()[0]["lease_expires_at"]
    time.sleep(0.05)
    a.heartbeat()
    assert a.leases()[0]["lease_expires_at"] > before
    assert b.recover() == 0, "recovery took a live node's study"
    assert _state(b)["owner"] == "node-a#1"
    assert {n["node_id"]: n["alive"] for n in b.nodes()} == {"node-a#1": True, "node-b#2": True}


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_outbox_items_are_leased_to_one_node(pg: Factory, spool_root: Path) -> None:
    a, b = pg("node-a#1"), pg("node-b#2")
    a.record_instance(_rec(spool_root, "1.9.1"), now=time.time() - 10)
    job = a.claim_ready_study(1.0)
    assert job is not None
    a.finish_study(job, [_out(spool_root, "1.8.1"), _out(spool_root, "1.8.2")], ["pacs"], {}, "x")
    mine = a.due_items()
    assert len(mine) == 2
    assert b.due_items() == [], "an item leased by a live node was handed out twice"
    a.mark_delivered(mine[0].id)
    a.release_items([i.id for i in mine])
    theirs = b.due_items()
    assert [i.sop_instance_uid for i in theirs] == [mine[1].sop_instance_uid]
    b.mark_delivered(theirs[0].id)
    assert a.due_items() == [] and b.due_items() == []
    by = {r["sop_instance_uid"]: r["delivered_by"]
          for r in a.query("SELECT sop_instance_uid, delivered_by FROM outbox")}
    assert by == {"1.8.1": "node-a#1", "1.8.2": "node-b#2"}


def test_unreachable_database_is_an_out_of_resources_error(spool_root: Path) -> None:
    from orthanc_ctl import free_port

    with pytest.raises(JobStoreUnavailableError) as info:
        PostgresJobStore(f"postgresql://postgres@127.0.0.1:{free_port()}/x", spool_root,
                         connect_timeout=2)
    assert isinstance(info.value, SpoolError), "the SCP would not answer 0xA700"


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("database", "message"),
    [
        ({"url": "mysql://x/y"}, "database.url must be a postgresql:// URL"),
        ({"url": "postgresql://x/y", "lease_seconds": 0}, "database.lease_seconds must be greater"),
        ({"url": "postgresql://x/y", "lease_seconds": 5, "heartbeat_seconds": 5},
         "database.heartbeat_seconds must be shorter"),
        ({"colour": "red"}, "database: unknown key(s) colour"),
    ],
)
def test_invalid_database_section_names_key_and_rule(database: dict[str, Any],
                                                     message: str) -> None:
    from node.config import config_from_dict
    from node.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        config_from_dict({"peers": [{"ae_title": "ORTHANC"}], "database": database}, Path("/tmp"))
    assert message in str(info.value)


def test_database_section_chooses_the_backend(tmp_path: Path) -> None:
    from node.config import config_from_dict, load_config, render_config
    from node.jobs import node_name, open_job_store

    base = {"peers": [{"ae_title": "ORTHANC"}], "keep_results_local": True,
            "storage": {"spool_dir": str(tmp_path / "s"), "database": str(tmp_path / "j.db")}}
    plain = config_from_dict(base, tmp_path)
    sqlite_store = open_job_store(plain)
    assert isinstance(sqlite_store, SQLiteJobStore)
    sqlite_store.close()
    url = shared_server().new_database()
    shared = config_from_dict({**base, "database": {"url": url, "node_name": "a/b c"}}, tmp_path)
    assert node_name(shared) == "a_b_c", "a node name must be safe as a spool directory"
    pg_store = open_job_store(shared, as_node=True)
    try:
        assert isinstance(pg_store, PostgresJobStore)
        assert pg_store.node_id is not None and pg_store.node_id.startswith("a_b_c#")
        assert pg_store.spool_root == tmp_path / "s"
    finally:
        pg_store.close()
    path = tmp_path / "config.toml"
    path.write_text(render_config(shared))
    assert load_config(path, environ={}) == shared
    env = load_config(path, environ={"FRACTURE_NODE_DATABASE_URL": "postgresql://other/db"})
    assert env.database.url == "postgresql://other/db"


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_study_that_keeps_losing_its_node_is_failed_not_handed_on(pg: Factory,
                                                                    spool_root: Path) -> None:
    from node.jobs.postgres import MAX_TAKEOVERS

    a = pg("node-a#1", lease_seconds=5.0)
    t = time.time()
    a.record_instance(_rec(spool_root, "1.9.1"), now=t)
    assert a.claim_ready_study(1.0, now=t + 2) is not None
    for i in range(1, MAX_TAKEOVERS):  # each taker "dies" holding it
        t += 10
        taker = pg(f"node-{i}#{i}", lease_seconds=5.0)
        assert taker.claim_ready_study(1.0, now=t) is not None, f"takeover {i}"
    t += 10
    assert pg("node-z#9").claim_ready_study(1.0, now=t) is None
    row = _state(a)
    assert row["state"] == FAILED and "stopped while processing it" in row["reason"]
    assert a.retry_dead("1.2.3") == 1
    assert a.claim_ready_study(1.0, now=t + 1) is not None, "retry did not requeue it"


def _drop_connection(url: str, node_id: str) -> None:
    """What a database restart does to a node: its session is terminated."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name = %s", [f"fracture-node {node_id}"])


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_work_whose_outcome_could_not_be_recorded_is_not_renewed(pg: Factory,
                                                                 spool_root: Path) -> None:
    """The database went away while a study (and an outbox item) were being worked on:
    the worker's next call fails and it drops the job without recording an outcome.
    The heartbeat must not renew those leases for ever once it reconnects (the study
    would be held with nobody working on it: wedged); they lapse, and another node
    takes the work over.  Before this rule, a 20 s outage wedged a study (the outage
    test in test_scaleout.py)."""
    a, b = pg("node-a#1", lease_seconds=5.0), pg("node-b#2", lease_seconds=5.0)
    a.record_instance(_rec(spool_root, "1.9.1"), now=time.time() - 10)
    a.record_instance(_rec(spool_root, "1.9.5", study="1.2.5"), now=time.time() - 10)
    done = a.claim_ready_study(1.0)
    assert done is not None
    a.finish_study(done, [_out(spool_root, "1.8.1", study=done.study_instance_uid)], ["pacs"],
                   {}, "x")
    item = a.due_items()[0]
    job = a.claim_ready_study(1.0)
    assert job is not None
    before = {x["kind"]: x["lease_expires_at"] for x in b.leases()}
    _drop_connection(pg.url, "node-a#1")  # type: ignore[attr-defined]
    with pytest.raises(JobStoreUnavailableError):  # the worker's next call: job dropped
        a.study_attempts(job.study_instance_uid)
    time.sleep(0.05)
    a.heartbeat()  # reconnects; the node is alive, but works on neither any more
    after = {x["kind"]: x["lease_expires_at"] for x in b.leases()}
    assert after == before, "the heartbeat renewed leases of dropped work"
    assert {n["node_id"]: n["alive"] for n in b.nodes()}["node-a#1"]
    later = time.time() + 6
    taken = b.claim_ready_study(1.0, now=later)
    assert taken is not None and taken.study_instance_uid == job.study_instance_uid
    assert [i.id for i in b.due_items(now=later)] == [item.id]
