"""What ``status``, the console and the metrics read from the job database.

One set of queries over :class:`node.jobs.JobStore` (its ``counts`` and ``query``),
so the command line, the web console and ``/metrics`` show the same state and none
keeps a second copy of it.  Nothing here writes, and :func:`open_existing` never
creates a database that is not there.
"""

from __future__ import annotations

from typing import Any

from node.config import Config
from node.jobs import JobStore, JobStoreBackend, open_job_store


def open_existing(config: Config) -> JobStoreBackend | None:
    """The node's job store, or ``None`` when it is a SQLite file that does not exist
    (a read-only command must not create one).  A shared PostgreSQL store
    (``[database] url``) is opened as it is."""
    if config.database.url:
        return open_job_store(config)
    if not config.storage.database.is_file():
        return None
    return JobStore(config.storage.database)


def status_rows(jobs: JobStoreBackend, limit: int = 50) -> dict[str, Any]:
    """The rows of ``fracture-node status``: counts by state, the latest studies,
    delivery problems (dead letters and retried items) and instances not analysed.

    Parameters
    ----------
    jobs
        An open job store.
    limit
        At most this many rows of each list.
    """
    counts = jobs.counts()
    studies = jobs.query(
        "SELECT study_instance_uid, state, decision, attempts, reason, updated_at, "
        "(SELECT COUNT(*) FROM instances i WHERE i.study_instance_uid = s.study_instance_uid"
        " AND i.path IS NOT NULL) AS instances FROM studies s "
        "ORDER BY updated_at DESC LIMIT ?", [limit])
    problems = jobs.query(
        "SELECT destination, study_instance_uid, sop_instance_uid, kind, state, attempts, "
        "last_error FROM outbox WHERE state = 'dead' OR (state = 'pending' AND attempts > 0) "
        "ORDER BY id LIMIT ?", [limit])
    refused = jobs.query(
        "SELECT study_instance_uid, sop_instance_uid, outcome, reason FROM instances "
        "WHERE outcome IS NOT NULL AND outcome != 'analysed' ORDER BY received_at DESC "
        "LIMIT ?", [limit])
    return {"counts": counts, "studies": studies, "delivery_problems": problems,
            "not_analysed": refused}
