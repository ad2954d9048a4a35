"""The worker loop (ready study -> processing function -> outbox) and the
deliverer loop (outbox -> C-STORE to every destination, with retries).

Both run as threads of ``fracture-node serve`` and keep all their state in the job
database, so a node killed at any point resumes on restart.  With a shared job
database (PostgreSQL) the worker also runs the node's :class:`Heartbeat`, which
renews the leases of the studies and outbox items this node holds.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pydicom

from node.config import Config, DestinationConfig
from node.jobs import JobStoreBackend, LeaseLostError, OutboxItem, OutputFile, StudyJob
from node.scu import Peer, Timeouts, store_files
from node.spool import Spool
from node.tls import client_context

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessedStudy:
    """What a processing function made of a study."""

    outputs: Sequence[tuple[str, pydicom.Dataset]]
    """(kind, dataset) of every result object: kind is ``sc``, ``sr``, ``pdf`` ..."""
    outcomes: Mapping[str, tuple[str, str]]
    """SOP Instance UID -> (outcome, reason) for every source instance."""
    decision: str
    """The study-level answer, for ``status``."""
    timings: Mapping[str, float] = field(default_factory=dict)
    """Seconds per stage (``decode``, ``inference``, ``build``), for ``/metrics``."""


class Processor(Protocol):
    """Turns a claimed study into result objects.  Bad images must come back as
    outcomes with a reason, not as exceptions; an exception means the study could
    not be processed at all (it is retried, then marked failed)."""

    def __call__(self, job: StudyJob) -> ProcessedStudy: ...


def encode(ds: pydicom.Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file (strict: ``enforce_file_format``)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Heartbeat:
    """Renews this node's leases every ``jobs.heartbeat_seconds`` in its own thread
    (and publishes which studies its open associations are receiving).

    A beat that fails (database unreachable) is logged and retried at the next one:
    the leases then lapse only if the outage outlasts them.
    """

    def __init__(self, jobs: JobStoreBackend,
                 busy_studies: Callable[[], frozenset[str]] = frozenset) -> None:
        self.jobs = jobs
        self.busy_studies = busy_studies
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        if self.jobs.heartbeat_seconds is None:
            return
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        interval = self.jobs.heartbeat_seconds
        assert interval is not None
        while not self._stop.wait(interval):
            try:
                self.jobs.heartbeat(self.busy_studies())
                if self._failing:
                    logger.info("heartbeat restored")
                self._failing = False
            except Exception as exc:  # keep beating; the leases say how long we may miss
                if not self._failing:
                    logger.warning("heartbeat failed: %s", exc)
                self._failing = True


class Worker:
    """Processes studies that are ready, one at a time, in this thread."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        jobs: JobStoreBackend,
        processor: Processor,
        busy_studies: Callable[[], frozenset[str]] = frozenset,
        max_attempts: int = 3,
        heartbeat: bool = True,
    ) -> None:
        self.config = config
        self.spool = spool
        self.jobs = jobs
        self.processor = processor
        self.busy_studies = busy_studies
        self.max_attempts = max_attempts
        self.heartbeat = heartbeat
        """Run the node's :class:`Heartbeat` while processing (``False`` when the
        service beats from start-up, before the models are loaded)."""
        self._stop = threading.Event()
        self._last_cleanup = 0.0

    def stop(self) -> None:
        self._stop.set()

    def run(self, poll_seconds: float = 0.2) -> None:
        heartbeat = Heartbeat(self.jobs, self.busy_studies)
        if self.heartbeat:
            heartbeat.start()
        try:
            self._recover()
            while not self._stop.is_set():
                try:
                    busy = self.run_once()
                    self.cleanup()
                except Exception:  # keep the loop alive; the state is in the database
                    logger.exception("worker loop error; retrying in 5 s")
                    busy = False
                    self._stop.wait(5.0)
                if not busy:
                    self._stop.wait(poll_seconds)
        finally:
            heartbeat.stop()

    def _recover(self) -> None:
        while not self._stop.is_set():
            try:
                recovered = self.jobs.recover()
            except Exception:  # e.g. the job database is not reachable yet
                logger.exception("start-up recovery failed; retrying in 5 s")
                self._stop.wait(5.0)
                continue
            if recovered:
                logger.info("resuming %d study(ies) left in processing by a stopped process",
                            recovered)
            return

    def run_once(self) -> bool:
        """Process one ready study, if any.  Returns whether one was processed."""
        job = self.jobs.claim_ready_study(self.config.study.quiet_seconds, self.busy_studies())
        if job is None:
            return False
        extra = {"study_uid": job.study_instance_uid}
        started = time.perf_counter()
        logger.info("processing study %s (%d instance(s))",
                    job.study_instance_uid, len(job.instances), extra=extra)
        try:
            result = self.processor(job)
            files = self._write_outputs(job, result)
        except Exception as exc:
            attempts = self.jobs.study_attempts(job.study_instance_uid) + 1
            retry = None if attempts >= self.max_attempts else 5.0 * attempts
            logger.exception("study %s could not be processed (attempt %d of %d)",
                             job.study_instance_uid, attempts, self.max_attempts, extra=extra)
            try:
                self.jobs.fail_study(job, f"{type(exc).__name__}: {exc}", retry)
            except LeaseLostError as lost:
                logger.warning("%s; this attempt is discarded", lost, extra=extra)
            return True
        names = [d.name for d in self.config.destinations]
        try:
            self.jobs.finish_study(job, files, names, dict(result.outcomes), result.decision)
        except LeaseLostError as lost:
            # Another node took the study over after our lease expired; its run counts.
            # Our files in the spool have the same deterministic UIDs as its own.
            logger.warning("%s; this result is discarded", lost, extra=extra)
            return True
        logger.info("study %s processed: %s, %d result object(s) %s (%.0f ms)",
                    job.study_instance_uid, result.decision, len(files),
                    f"queued for {', '.join(names)}" if names
                    else "kept in the spool (keep_results_local)",
                    (time.perf_counter() - started) * 1000, extra=extra)
        return True

    def _write_outputs(self, job: StudyJob, result: ProcessedStudy) -> list[OutputFile]:
        """Write the result objects to the spool.  One already queued for every
        destination (an SC of a reopened study) is neither written nor queued again."""
        files: list[OutputFile] = []
        names = [d.name for d in self.config.destinations]
        for kind, ds in result.outputs:
            if self.jobs.queued_everywhere(str(ds.SOPInstanceUID), names):
                continue
            area = "reports" if kind == "sr" else "outbox"
            path = self.spool.path(area, job.study_instance_uid, str(ds.SOPInstanceUID))
            if not path.exists():
                self.spool.write(path, encode(ds))
            files.append(OutputFile(str(ds.SOPInstanceUID), str(ds.SOPClassUID), kind, path))
        return files

    def cleanup(self, every_seconds: float = 60.0) -> None:
        """Retention: delete the sources of studies delivered long enough ago."""
        now = time.time()
        if now - self._last_cleanup < every_seconds:
            return
        self._last_cleanup = now
        cutoff = now - self.config.storage.retain_sources_hours * 3600
        for study_uid in self.jobs.expired_studies(cutoff):
            self.jobs.forget_sources(study_uid)
            self.spool.remove_study("incoming", study_uid)
            logger.info("retention: sources of study %s deleted", study_uid,
                        extra={"study_uid": study_uid})


class Deliverer:
    """Sends outbox items to their destinations with exponential back-off."""

    def __init__(self, config: Config, spool: Spool, jobs: JobStoreBackend,
                 on_outcome: Callable[[str, str, float, OutboxItem], None] | None = None
                 ) -> None:
        self.config = config
        self.spool = spool
        self.jobs = jobs
        self.on_outcome = on_outcome
        """Called per item with (destination, ``delivered``/``retry``/``dead``, seconds
        the association took, the item), by the node's metrics and audit trail."""
        self._stop = threading.Event()
        self._wake = threading.Event()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def backoff(self, attempts: int) -> float:
        d = self.config.delivery
        delay = min(d.backoff_max_seconds, d.backoff_initial_seconds * 2 ** max(0, attempts))
        return delay * random.uniform(0.8, 1.2)

    def run(self, poll_seconds: float = 0.2) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # keep the loop alive; the state is in the database
                logger.exception("delivery loop error; retrying in 5 s")
                busy = False
                self._stop.wait(5.0)
            if not busy:
                self._wake.wait(poll_seconds)
                self._wake.clear()

    def run_once(self) -> bool:
        """Try every due item once.  Returns whether anything was due."""
        items = self.jobs.due_items()
        if not items:
            return False
        by_dest: dict[str, list[OutboxItem]] = {}
        for item in items:
            by_dest.setdefault(item.destination, []).append(item)
        try:
            for name, batch in by_dest.items():
                if self._stop.is_set():
                    break
                try:
                    dest: DestinationConfig = self.config.destination(name)
                except Exception:
                    for item in batch:
                        self.jobs.mark_failed(item.id, f"destination {name!r} no longer "
                                              "configured", dead=True, retry_at=time.time())
                    continue
                self._deliver(dest, batch)
        finally:
            # Items claimed (leased) and not tried, e.g. after an error or at stop:
            # give them back at once rather than holding them until the lease runs out.
            # Items already marked are not ours any more, and are left as they are.
            self.jobs.release_items([i.id for i in items])
        return True

    def _deliver(self, dest: DestinationConfig, batch: list[OutboxItem]) -> None:
        context = client_context(self.config.tls) if dest.tls else None
        peer = Peer(dest.ae_title, dest.host, dest.port, context)
        paths = [Path(item.path) for item in batch]
        missing = [item for item, p in zip(batch, paths) if not p.exists()]
        for item in missing:
            self.jobs.mark_failed(item.id, "result file missing from the spool", dead=True,
                                  retry_at=time.time())
        batch = [item for item, p in zip(batch, paths) if p.exists()]
        if not batch:
            return
        limits = self.config.limits
        timeouts = Timeouts(limits.connection_timeout, limits.acse_timeout,
                            limits.dimse_timeout, limits.network_timeout)
        started = time.perf_counter()
        outcomes = store_files(self.config.node.ae_title, peer, [Path(i.path) for i in batch],
                               timeouts, self.config.node.max_pdu or 262144)
        seconds = time.perf_counter() - started
        retry_logged = False
        for item, outcome in zip(batch, outcomes):
            extra = {"study_uid": item.study_instance_uid, "sop_uid": item.sop_instance_uid}
            if outcome.ok:
                all_done = self.jobs.mark_delivered(item.id)
                logger.info("delivered %s %s to %s", item.kind, item.sop_instance_uid, dest.name,
                            extra=extra)
                if all_done and item.kind != "sr":
                    self.spool.remove(Path(item.path))
                if self.on_outcome is not None:
                    self.on_outcome(dest.name, "delivered", seconds, item)
                continue
            err = outcome.error
            assert err is not None
            attempts = item.attempts + 1
            dead = err.permanent and attempts >= self.config.delivery.max_attempts
            retry_at = time.time() + self.backoff(attempts - 1)
            self.jobs.mark_failed(item.id, str(err), dead=dead, retry_at=retry_at)
            if self.on_outcome is not None:
                self.on_outcome(dest.name, "dead" if dead else "retry", seconds, item)
            if dead:
                logger.error("delivery of %s %s to %s failed (attempt %d), dead letter: %s",
                             item.kind, item.sop_instance_uid, dest.name, attempts, err,
                             extra=extra)
            elif not retry_logged:  # one line per attempt of the batch, not one per object
                retry_logged = True
                waiting = sum(1 for o in outcomes if not o.ok)
                logger.warning(
                    "delivery to %s failed (attempt %d, %d object(s) waiting): %s; next attempt "
                    "at %s", dest.name, attempts, waiting, err,
                    time.strftime("%H:%M:%S", time.localtime(retry_at)), extra=extra)


