"""The worker loop (ready study -> processing function -> outbox) and the
deliverer loop (outbox -> C-STORE to every destination, with retries).

Both run as threads of ``fracture-node serve`` and keep all their state in the job
database, so a node killed at any point resumes on restart.  With a shared job
database (PostgreSQL) the worker also runs the node's :class:`Heartbeat`, which
renews the leases of the studies and outbox items this node holds.
"""

from __future__ import annotations

import collections
import io
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pydicom

from node.config import Config, DestinationConfig
from node.jobs import (JobStoreBackend, JobStoreUnavailableError, LeaseLostError, OutboxItem,
                       OutputFile, StudyJob)
from node.scu import Peer, StoreAssociation, Timeouts
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
    written: Sequence[WrittenFile] = ()
    """Result objects already in the spool (built in a build process, :mod:`node.builder`),
    to be recorded like ``outputs``."""


@dataclass(frozen=True)
class WrittenFile:
    """A result object a build process wrote into the spool."""

    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    new: bool
    """Whether this build wrote it (``False``: the file was there already)."""


@dataclass(frozen=True)
class EncodedObject:
    """A result object already encoded (Part 10 bytes), held until its study is ready:
    the two attributes the outbox needs, named as in the dataset, and the bytes."""

    SOPInstanceUID: str
    SOPClassUID: str
    data: bytes

    @classmethod
    def of(cls, ds: pydicom.Dataset) -> "EncodedObject":
        return cls(str(ds.SOPInstanceUID), str(ds.SOPClassUID), encode(ds))


@dataclass(frozen=True)
class EarlyJob(StudyJob):
    """A study the worker started on before its quiet period ended: what it held then
    (:meth:`JobStoreBackend.settling_study`), not claimed.  Its work is used only for
    a later claim of the same study at the same generation (:func:`same_study`)."""


def same_study(early: StudyJob, claimed: StudyJob) -> bool:
    """Whether a claimed study is exactly what an early start worked on: the same
    generation, instances and previous SR."""
    return (early.study_instance_uid == claimed.study_instance_uid
            and early.generation == claimed.generation
            and early.instances == claimed.instances
            and early.previous_report == claimed.previous_report)


def output_path(spool: Spool, study_instance_uid: str, kind: str, sop_instance_uid: str) -> Path:
    """Where a result object of ``kind`` lives in the spool: an SR in ``reports``, the
    others in ``outbox``."""
    return spool.path("reports" if kind == "sr" else "outbox", study_instance_uid,
                      sop_instance_uid)


class Processor(Protocol):
    """Turns a claimed study into result objects.  Bad images must come back as
    outcomes with a reason, not as exceptions; an exception means the study could
    not be processed at all (it is retried, then marked failed)."""

    def __call__(self, job: StudyJob) -> ProcessedStudy: ...


def _libc_malloc_trim() -> Callable[[], None]:
    """``malloc_trim(0)`` of glibc, or a no-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return lambda: None

    def release() -> None:
        trim(0)

    return release


def limit_malloc_arenas(count: int) -> bool:
    """At most ``count`` glibc malloc arenas for the threads created from now on
    (``mallopt(M_ARENA_MAX)``, what ``MALLOC_ARENA_MAX`` sets; glibc's default is 8 per
    core).  Every association, stage and runtime thread otherwise gets an arena of its
    own, and each keeps the pages of the largest study it touched: under the 16 x 50
    load of ``bench/reliability.py`` the node's peak was 608 and 627 MB with the default
    and 572 MB with 2.  Returns whether glibc took it."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-8, max(1, count)))  # M_ARENA_MAX
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


release_memory = _libc_malloc_trim()
"""Hand the heap's free pages back to the system after a study: a study's decoded
images and result objects are freed, but glibc keeps the pages in each thread's arena,
so without this the resident size ratchets up with the threads and the largest study
(``bench/reliability.py``)."""


def log_survived(where: str, exc: BaseException, then: str = "retrying in 5 s") -> None:
    """Log an error that a loop or stage thread survives: one line while the job
    database is unreachable (an outage, said again at each retry until it is back),
    the traceback for anything else."""
    if isinstance(exc, JobStoreUnavailableError):
        logger.warning("%s: job database unavailable (%s); %s", where, exc, then)
    else:
        logger.error("%s error; %s", where, then,
                     exc_info=(type(exc), exc, exc.__traceback__))


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
    """Processes studies that are ready, one at a time, in this thread (``[worker]
    threads = 1``; :class:`PipelinedWorker` runs several)."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        jobs: JobStoreBackend,
        processor: Processor,
        busy_studies: Callable[[], frozenset[str]] = frozenset,
        max_attempts: int = 3,
        heartbeat: bool = True,
        on_queued: Callable[[], None] = lambda: None,
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
        self.on_queued = on_queued
        """Called when a study's results are queued (the node wakes its deliverer)."""
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
            self._start_stages()
            while not self._stop.is_set():
                try:
                    busy = self._step()
                    self.cleanup()
                except Exception as exc:  # keep the loop alive; the state is in the database
                    log_survived("worker loop", exc)
                    busy = False
                    self._stop.wait(5.0)
                if not busy:
                    self._stop.wait(self._idle_wait(poll_seconds))
            self._drain()
        finally:
            self._stop_stages()
            heartbeat.stop()

    def _idle_wait(self, poll_seconds: float) -> float:
        """How long to wait for work: until the next pending study is ready to claim
        (so a study is claimed when its quiet period ends, not up to a poll later),
        at most ``poll_seconds``.  A study that is ready but not claimed (still being
        received on an open association) waits the poll."""
        try:
            ready = self.jobs.next_ready_time(self.config.study.quiet_seconds)
        except Exception:  # the loop's next claim reports a lost database
            return poll_seconds
        if ready is None:
            return poll_seconds
        due = ready - time.time()
        return poll_seconds if due <= 0 else min(poll_seconds, due + 0.002)

    def _step(self) -> bool:
        """One turn of :meth:`run`'s loop; whether there was work (no poll wait)."""
        return self.run_once()

    def _start_stages(self) -> None:
        """Start the threads beside :meth:`run`'s loop (none here)."""

    def _drain(self) -> None:
        """Wait for the work in hand after :meth:`stop` (none is left here)."""

    def _stop_stages(self) -> None:
        """Stop what :meth:`_start_stages` started."""

    def _recover(self) -> None:
        while not self._stop.is_set():
            try:
                recovered = self.jobs.recover()
            except Exception as exc:  # e.g. the job database is not reachable yet
                log_survived("start-up recovery", exc)
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
        started = time.perf_counter()
        logger.info("processing study %s (%d instance(s))",
                    job.study_instance_uid, len(job.instances),
                    extra={"study_uid": job.study_instance_uid})
        try:
            result = self.processor(job)
            files = self._write_outputs(job, result)
        except Exception as exc:
            self._fail(job, exc)
            return True
        self._finish(job, result, files, started)
        return True

    def _fail(self, job: StudyJob, exc: BaseException) -> None:
        """A study that could not be processed at all: retried later, then failed."""
        extra = {"study_uid": job.study_instance_uid}
        attempts = self.jobs.study_attempts(job.study_instance_uid) + 1
        retry = None if attempts >= self.max_attempts else 5.0 * attempts
        logger.error("study %s could not be processed (attempt %d of %d)",
                     job.study_instance_uid, attempts, self.max_attempts, extra=extra,
                     exc_info=(type(exc), exc, exc.__traceback__))
        try:
            self.jobs.fail_study(job, f"{type(exc).__name__}: {exc}", retry)
        except LeaseLostError as lost:
            logger.warning("%s; this attempt is discarded", lost, extra=extra)

    def _finish(self, job: StudyJob, result: ProcessedStudy, files: list[OutputFile],
                started: float, how: str = "") -> None:
        """Record a processed study (outcomes, outbox rows, state) in the job store."""
        extra = {"study_uid": job.study_instance_uid}
        names = [d.name for d in self.config.destinations]
        try:
            self.jobs.finish_study(job, files, names, dict(result.outcomes), result.decision)
        except LeaseLostError as lost:
            # Another node took the study over after our lease expired; its run counts.
            # Our files in the spool have the same deterministic UIDs as its own.
            logger.warning("%s; this result is discarded", lost, extra=extra)
            return
        release_memory()
        if names and files:
            self.on_queued()
        logger.info("study %s processed: %s, %d result object(s) %s (%.0f ms%s)",
                    job.study_instance_uid, result.decision, len(files),
                    f"queued for {', '.join(names)}" if names
                    else "kept in the spool (keep_results_local)",
                    (time.perf_counter() - started) * 1000, how, extra=extra)

    def _write_outputs(self, job: StudyJob, result: ProcessedStudy) -> list[OutputFile]:
        """Write the result objects to the spool.  One already queued for every
        destination (an SC of a reopened study) is neither written nor queued again."""
        files: list[OutputFile] = []
        names = [d.name for d in self.config.destinations]
        for w in result.written:
            if self.jobs.queued_everywhere(w.sop_instance_uid, names):
                if w.new:  # as if never written, like an SC built here below
                    self.spool.remove(w.path)
                continue
            files.append(OutputFile(w.sop_instance_uid, w.sop_class_uid, w.kind, w.path))
        for kind, ds in result.outputs:
            if self.jobs.queued_everywhere(str(ds.SOPInstanceUID), names):
                continue
            path = output_path(self.spool, job.study_instance_uid, kind, str(ds.SOPInstanceUID))
            if not path.exists():
                self.spool.write(path, ds.data if isinstance(ds, EncodedObject) else encode(ds))
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


class StagedProcessor(Protocol):
    """A processing function split into stages that may run in different threads:
    :meth:`prepare` (decode and normalise one study), :meth:`analyse_many` (the models
    on several prepared studies at once) and :meth:`build` (the result objects of one
    study).  ``build(analyse_many([prepare(job)])[0])`` must equal the whole function;
    :class:`node.processing.StudyProcessor` is the node's."""

    def prepare(self, job: StudyJob) -> Any: ...

    def analyse_many(self, studies: Sequence[Any]) -> Sequence[Any]: ...

    def build(self, study: Any,
              sink: Callable[[str, pydicom.Dataset], None] | None = None) -> ProcessedStudy:
        """The result objects; those handed to ``sink`` (written and queued for delivery
        at once by the worker) are left out of the returned ``outputs``."""
        ...


def is_staged(processor: object) -> bool:
    """Whether ``processor`` offers the stages of :class:`StagedProcessor`."""
    return all(callable(getattr(processor, name, None))
               for name in ("prepare", "analyse_many", "build"))


class WholeStudy:
    """A plain :class:`Processor` as a :class:`StagedProcessor` whose whole work is the
    build stage (the node-core tests' processing functions)."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    def prepare(self, job: StudyJob) -> StudyJob:
        return job

    def analyse_many(self, studies: Sequence[Any]) -> Sequence[Any]:
        return list(studies)

    def build(self, study: Any,
              sink: Callable[[str, pydicom.Dataset], None] | None = None) -> ProcessedStudy:
        return self.processor(study)


EARLY_HOLD_SECONDS = 30.0
"""How long past its quiet period a study started early may stay held unclaimed."""

_BUILD, _PREPARE, _STOP = 0, 1, 2
"""The study threads' tasks."""


class _StudyTasks:
    """What the study threads do next: build the result objects of an analysed study
    (``_BUILD``), decode and normalise a claimed one (``_PREPARE``), or stop.

    Builds come first — finish studies before starting new ones — except while the
    model thread has no prepared study waiting: then a prepare comes first.  It is
    short, and it gives the models their next study to run while the build that
    follows holds the interpreter (the models run without it); taking the builds
    first left the models idle for every build.  A stop comes after everything queued.
    """

    def __init__(self, models_waiting: Callable[[], bool]) -> None:
        self._models_waiting = models_waiting
        self._cond = threading.Condition()
        self._builds: collections.deque[object] = collections.deque()
        self._prepares: collections.deque[object] = collections.deque()
        self._stops = 0

    def put(self, kind: int, payload: object = None) -> None:
        with self._cond:
            if kind == _BUILD:
                self._builds.append(payload)
            elif kind == _PREPARE:
                self._prepares.append(payload)
            else:
                self._stops += 1
            self._cond.notify()

    def get(self) -> tuple[int, object]:
        with self._cond:
            while True:
                if self._prepares and (not self._builds or not self._models_waiting()):
                    return _PREPARE, self._prepares.popleft()
                if self._builds:
                    return _BUILD, self._builds.popleft()
                if self._stops:
                    self._stops -= 1
                    return _STOP, None
                self._cond.wait()

    def take_prepares(self) -> list[object]:
        """Remove and return every prepare not yet started."""
        with self._cond:
            taken = list(self._prepares)
            self._prepares.clear()
            return taken


@dataclass(frozen=True)
class _Held:
    """A study's result made early, in a ``_BUILD`` task of its claim: write it."""

    result: ProcessedStudy


@dataclass
class _Early:
    """A study started early (:attr:`PipelinedWorker.early_start`): running, then held
    with its result objects until it is claimed."""

    job: EarlyJob
    size: int
    claimed: StudyJob | None = None
    """The claim of this study that came while the early work was still running."""
    held: ProcessedStudy | None = None
    """The finished work (its objects encoded), waiting for the study to be ready."""
    held_at: float = 0.0


class PipelinedWorker(Worker):
    """Several studies in flight, their stages side by side (``[worker] threads`` > 1).

    One claiming loop (this thread) claims a ready study when its images fit beside
    those in hand (at most ``max_images_in_flight``; a larger study alone, or beside
    studies in hand that have all been prepared: :meth:`_room_for`);
    ``study_threads`` threads decode and normalise claimed studies and build the
    result objects of analysed ones (builds first, but a prepare first while the model
    thread has no study waiting: :class:`_StudyTasks`); one model thread takes the next
    prepared study, with the ones waiting behind it while their images fit in one
    model run (``gather_images``, the node passes ``[worker] batch_images``; a study is
    never split), and analyses them together.  Gathering more than one run takes does
    not make the graphs faster (they run ``batch_images`` at a time) and holds every
    gathered study back until the last of them is analysed: a burst of 20 studies had
    a median of 2.89 s with one study per model call against 3.90 s when the thread
    gathered up to 16 images (means of 4 alternating runs, ``bench/e2e.py``).  The
    queues between the stages hold only claimed studies, so the in-flight bound
    bounds them all and no stage ever blocks on a full queue.

    The claim, lease, finish and fail calls are the job store's, exactly as for
    :class:`Worker`; a study in hand is ``processing`` in the database, so a process
    killed at any point leaves nothing that :meth:`JobStoreBackend.recover` (or another
    node, after the lease) does not take up again.  :meth:`stop` stops claiming, gives
    back the claimed studies no stage has started (:meth:`JobStoreBackend.release_study`)
    and lets every study in hand finish (drain) before :meth:`run` returns.

    **Early starts** (``early_start`` seconds, ``[worker] early_start_seconds``): when
    no study is ready to claim, the claiming loop takes a study that has been quiet
    for ``early_start`` (no association still sending it, at most the room left of
    ``max_images_in_flight`` images) as it is, *without claiming it*
    (:meth:`JobStoreBackend.settling_study`), and runs it through the same stages; its
    result objects are encoded and held in memory.  When the study is claimed (its
    quiet period over) and is still exactly what was worked on (:func:`same_study`),
    the held objects are written and queued at once; otherwise (an instance arrived
    meanwhile) they are dropped and the study is processed as claimed.  Nothing of an
    early start reaches the spool or the job database before the claim, so a stop or a
    kill loses only the early work, and a failure of it is not counted as an attempt.
    Held results not claimed within the quiet period and :data:`EARLY_HOLD_SECONDS`
    (another node claimed the study) are dropped.
    """

    def __init__(
        self,
        config: Config,
        spool: Spool,
        jobs: JobStoreBackend,
        processor: StagedProcessor,
        study_threads: int,
        max_images_in_flight: int = 16,
        gather_images: int = 1,
        busy_studies: Callable[[], frozenset[str]] = frozenset,
        max_attempts: int = 3,
        heartbeat: bool = True,
        on_queued: Callable[[], None] = lambda: None,
        early_start: float = 0.0,
        on_early: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        super().__init__(config, spool, jobs, processor.build, busy_studies, max_attempts,
                         heartbeat, on_queued)
        self.early_start = early_start if 0 < early_start < config.study.quiet_seconds else 0.0
        self.on_early = on_early
        """Called with the outcome of each early start: ``used``, ``dropped``, ``failed``,
        ``expired`` (the node counts them in /metrics)."""
        if study_threads < 1:
            raise ValueError("study_threads must be at least 1")
        self.stages = processor
        self.study_threads = study_threads
        self.max_images_in_flight = max(1, max_images_in_flight)
        self.gather_images = max(1, gather_images)
        self._to_models: queue.Queue[tuple[StudyJob, Any, float] | None] = queue.Queue()
        self._tasks = _StudyTasks(models_waiting=lambda: not self._to_models.empty())
        self._cond = threading.Condition()
        self._in_flight: dict[str, int] = {}
        self._unprepared: set[str] = set()
        """Studies in hand whose decode and normalisation has not finished."""
        self._early: dict[str, _Early] = {}
        """Studies started early, by Study Instance UID (under ``self._cond``)."""
        self._early_failed: dict[str, float] = {}
        """Studies whose early work failed, with the monotonic time it failed: not started
        early again before their claim.  A record older than the quiet period and
        :data:`EARLY_HOLD_SECONDS` is dropped like a held result (another node claimed
        the study, or it never settled), so the records stay bounded."""
        self._handed_back: collections.deque[StudyJob] = collections.deque()
        """Claims that came during early work that could not be used: claimed again by
        the claiming loop, through the in-flight bound (under ``self._cond``)."""
        self._threads: list[threading.Thread] = []

    @property
    def in_flight(self) -> int:
        """Studies claimed and not yet finished or failed."""
        with self._cond:
            return len(self._in_flight)

    def _images_in_flight(self) -> int:
        return sum(self._in_flight.values())

    def _room_for(self, size: int) -> bool:
        """Whether a study of ``size`` images may start beside those in hand (under
        ``self._cond``): when nothing is in hand, when it fits in the bound, or beyond
        the bound when every study in hand has been prepared and fewer than
        ``study_threads + 1`` are in hand.  The last case keeps the stages overlapping
        on studies larger than the bound (the next one decodes while the models analyse
        the last one), at the cost of holding two of them: a 16 x 50-image load took
        63.6 s with every 50-image study alone (``bench/reliability.py``)."""
        if not self._in_flight or self._images_in_flight() + size <= self.max_images_in_flight:
            return True
        return not self._unprepared and len(self._in_flight) < self.study_threads + 1

    def _step(self) -> bool:
        return self._claim_one()

    def _claim_one(self) -> bool:
        """Claim one ready study if there is room.  Returns whether one was claimed."""
        with self._cond:
            if self._in_flight and self._images_in_flight() >= self.max_images_in_flight and (
                    self._unprepared or len(self._in_flight) >= self.study_threads + 1):
                self._cond.wait(0.5)
                return True  # busy: loop again without the poll wait
        with self._cond:
            job = self._handed_back.popleft() if self._handed_back else None
        if job is None:
            job = self.jobs.claim_ready_study(self.config.study.quiet_seconds,
                                              self.busy_studies())
            if job is None:
                return self._start_early()
            self._early_failed.pop(job.study_instance_uid, None)
            if self._claimed_early(job):
                return True
        size = max(1, len(job.instances))
        with self._cond:
            # claimed (and leased): it waits here, unstarted, until it fits beside the
            # studies in hand; a study larger than the bound goes alone
            while not self._room_for(size) and not self._stop.is_set():
                self._cond.wait(0.5)
            if self._stop.is_set():  # stopping while it waited: not started, given back
                self._release(job)
                return True
            self._in_flight[job.study_instance_uid] = size
            self._unprepared.add(job.study_instance_uid)
        logger.info("processing study %s (%d instance(s); %d study(ies) in hand)",
                    job.study_instance_uid, len(job.instances), self.in_flight,
                    extra={"study_uid": job.study_instance_uid})
        self._tasks.put(_PREPARE, (job, time.perf_counter()))
        return True

    def _idle_wait(self, poll_seconds: float) -> float:
        """As :meth:`Worker._idle_wait`, and with early starts on, at most until the next
        pending study has been quiet for :attr:`early_start`."""
        wait = super()._idle_wait(poll_seconds)
        if not self.early_start:
            return wait
        try:
            settled = self.jobs.next_ready_time(self.early_start)
        except Exception:
            return wait
        due = None if settled is None else settled - time.time()
        return wait if due is None or due <= 0 else min(wait, due + 0.002)

    def _start_early(self) -> bool:
        """Start on a settling study (see the class docstring), if early starts are on
        and there is room.  Returns whether one was started."""
        if not self.early_start:
            return False
        # older than this, a held result or a failure record is of a study claimed by
        # another node, or one that never settled
        stale_before = time.monotonic() - (self.config.study.quiet_seconds + EARLY_HOLD_SECONDS)
        with self._cond:
            expired = [uid for uid, e in self._early.items()
                       if e.held is not None and e.held_at < stale_before]
            for uid in expired:
                del self._early[uid]
            for uid in [uid for uid, at in self._early_failed.items() if at < stale_before]:
                del self._early_failed[uid]
            held = {uid: e.job.generation for uid, e in self._early.items() if e.held is not None}
            room = self.max_images_in_flight - self._images_in_flight() - sum(
                self._early[uid].size for uid in held)
            skip = (frozenset(self._in_flight) | frozenset(self._early_failed)
                    | frozenset(uid for uid in self._early if uid not in held))
        for _ in expired:
            self.on_early("expired")
        if room < 1:
            return False
        found = self.jobs.settling_study(self.early_start, self.config.study.quiet_seconds,
                                         self.busy_studies(), max_instances=room, skip=skip,
                                         skip_generations=held)
        if found is None or not found.instances:
            return False
        job = EarlyJob(found.study_instance_uid, found.generation, found.instances,
                       found.previous_report)
        size = len(job.instances)
        with self._cond:
            stale = self._early.pop(job.study_instance_uid, None)  # held, a generation ago
            self._early[job.study_instance_uid] = _Early(job, size)
            self._in_flight[job.study_instance_uid] = size
            self._unprepared.add(job.study_instance_uid)
        if stale is not None:
            self._dropped(job.study_instance_uid, "starting early again")
        logger.info("starting early on study %s (%d instance(s)), before its quiet period "
                    "ends", job.study_instance_uid, size,
                    extra={"study_uid": job.study_instance_uid})
        self._tasks.put(_PREPARE, (job, time.perf_counter()))
        return True

    def _claimed_early(self, job: StudyJob) -> bool:
        """A claimed study that was started early: its held objects are written now if
        it is still the same study; a claim during the early work is handed to it.
        Returns whether the claim is taken care of (``False``: process it as usual)."""
        uid = job.study_instance_uid
        with self._cond:
            early = self._early.get(uid)
            if early is None:
                return False
            if early.held is None:  # still running: it finishes with this claim
                early.claimed = job
                return True
            del self._early[uid]
            changed = not same_study(early.job, job)
            if not changed:
                self._in_flight[uid] = early.size  # written at once, beside the bound
        if changed:
            self._dropped(uid, "processing it again")
            return False
        self._tasks.put(_BUILD, (job, _Held(early.held), time.perf_counter()))
        return True

    def _early_done(self, job: EarlyJob, held: ProcessedStudy | None) -> None:
        """The early work on ``job`` ended (``held``: its result; ``None``: it failed).
        Without a claim yet the result is held; with one, it is written now if the
        claim is the same study, else the claim goes back to the claiming loop (which
        takes it up when it fits in the in-flight bound, or gives it back when
        stopping)."""
        uid = job.study_instance_uid
        with self._cond:
            early = self._early.get(uid)
            if early is None or early.job is not job:
                return
            claimed = early.claimed
            if claimed is None:
                if held is None:
                    del self._early[uid]
                else:
                    early.held, early.held_at = held, time.monotonic()
                self._in_flight.pop(uid, None)
                self._unprepared.discard(uid)
                self._cond.notify_all()
                return
            del self._early[uid]
            again = held is None or not same_study(job, claimed)
            if again:
                self._in_flight.pop(uid, None)
                self._unprepared.discard(uid)
                self._handed_back.append(claimed)
                self._cond.notify_all()
        if not again:
            self._tasks.put(_BUILD, (claimed, _Held(held), time.perf_counter()))
        elif held is not None:
            self._dropped(uid, "processing it again")

    def _dropped(self, uid: str, then: str) -> None:
        """Early work on ``uid`` is dropped: an instance arrived after it."""
        logger.info("study %s changed after its early start; %s", uid, then,
                    extra={"study_uid": uid})
        self.on_early("dropped")

    def _give_up(self, job: StudyJob, exc: BaseException) -> None:
        """This attempt at ``job`` failed in a stage: record the failure (a retry or
        the end of its attempts) and make room for the next study, even if recording
        it fails.  Early work that fails is only dropped: the study is processed when
        it is ready, and that attempt counts."""
        if isinstance(job, EarlyJob):
            logger.info("the early start of study %s failed (%s: %s); it is processed when "
                        "ready", job.study_instance_uid, type(exc).__name__, exc,
                        extra={"study_uid": job.study_instance_uid})
            self.on_early("failed")
            with self._cond:
                self._early_failed[job.study_instance_uid] = time.monotonic()
            self._early_done(job, None)
            return
        try:
            self._fail(job, exc)
        finally:
            self._done(job)

    def _done(self, job: StudyJob) -> None:
        with self._cond:
            self._in_flight.pop(job.study_instance_uid, None)
            self._unprepared.discard(job.study_instance_uid)
            self._cond.notify_all()

    def _prepared(self, job: StudyJob) -> None:
        with self._cond:
            self._unprepared.discard(job.study_instance_uid)
            self._cond.notify_all()

    def _release(self, job: StudyJob) -> None:
        """Give back a claimed study that no stage has started (stopping)."""
        try:
            self.jobs.release_study(job)
        except Exception as exc:  # its lease lapses on its own, or recover() takes it up
            log_survived("releasing a claimed study", exc, "it is taken up after its lease "
                         "or at the next start")

    def _release_unstarted(self) -> int:
        """Stopping: give back every claimed study still waiting to be prepared, so
        another node (or the next start) takes it at once.  Returns how many."""
        released = 0
        for payload in self._tasks.take_prepares():
            job = payload[0]  # type: ignore[index]
            if isinstance(job, EarlyJob):  # never claimed; a claim it took is given back
                with self._cond:
                    early = self._early.pop(job.study_instance_uid, None)
                if early is not None and early.claimed is not None:
                    self._release(early.claimed)
                    released += 1
            else:
                self._release(job)
                released += 1
            self._done(job)
        return released + self._release_handed_back()

    def _release_handed_back(self) -> int:
        """Stopping: give back the claims early work handed back (see
        :meth:`_early_done`).  Returns how many."""
        with self._cond:
            claims = list(self._handed_back)
            self._handed_back.clear()
        for job in claims:
            self._release(job)
        return len(claims)

    def _drain(self) -> None:
        """Give back the claimed studies not yet started; wait until every study in
        hand is finished (or failed)."""
        released = self._release_unstarted()
        if released:
            logger.info("stopping: released %d claimed study(ies) not yet started", released)
        with self._cond:
            if self._in_flight:
                logger.info("stopping: finishing %d study(ies) in hand", len(self._in_flight))
            while self._in_flight and all(t.is_alive() for t in self._threads):
                self._cond.wait(0.5)
        released = self._release_handed_back()  # early work that ended during the drain
        if released:
            logger.info("stopping: released %d claimed study(ies) not yet started", released)

    def _start_stages(self) -> None:
        self._threads = [threading.Thread(target=self._model_loop, name="worker-models",
                                          daemon=True)]
        self._threads += [threading.Thread(target=self._study_loop, name=f"worker-study-{i}",
                                           daemon=True) for i in range(self.study_threads)]
        for thread in self._threads:
            thread.start()

    def _stop_stages(self) -> None:
        self._to_models.put(None)
        for _ in range(self.study_threads):
            self._tasks.put(_STOP)
        for thread in self._threads:
            thread.join(timeout=60)

    def _study_loop(self) -> None:
        while True:
            priority, payload = self._tasks.get()
            if priority == _STOP:
                return
            try:
                if priority == _PREPARE:
                    self._prepare_task(*payload)  # type: ignore[misc]
                else:
                    self._build_task(*payload)  # type: ignore[misc]
            except Exception as exc:  # keep the thread alive; the state is in the database
                log_survived("worker stage", exc, "the study stays processing until the next "
                             "start or the end of its lease")

    def _prepare_task(self, job: StudyJob, started: float) -> None:
        try:
            prepared = self.stages.prepare(job)
        except Exception as exc:
            self._give_up(job, exc)
            return
        self._prepared(job)
        self._to_models.put((job, prepared, started))

    def _build_task(self, job: StudyJob, analysed: Any, started: float) -> None:
        if isinstance(job, EarlyJob):
            self._build_early(job, analysed)
            return
        if isinstance(analysed, _Held):  # built early, claimed now: write it
            analysed = analysed.result
            try:
                files = self._write_outputs(job, analysed)
            except Exception as exc:
                self._give_up(job, exc)
                return
            try:
                self._finish(job, analysed, files, started, ", made before its quiet period "
                             "ended")
                count = getattr(self.stages, "result_used", None)  # ObservedStages
                if count is not None:
                    count(analysed)
                self.on_early("used")
            finally:
                self._done(job)
            return
        files: list[OutputFile] = []
        names = [d.name for d in self.config.destinations]

        def sink(kind: str, ds: pydicom.Dataset) -> None:
            # Written now.  Queued now too while this study is the only one in hand, so
            # that the PACS stores it while the rest is built (bench/e2e.py: one study
            # every 1.5 s 0.41-0.47 s against 0.46-0.54 s); with others in hand the
            # deliverer has their results to send meanwhile, and queueing object by
            # object only cost CPU (a burst: 0.54-0.76 s a study against 0.46-0.65 s),
            # so finish_study queues it with the rest.  If the build fails later, the
            # retry rebuilds it under the same UID and finds it queued.
            written = self._write_outputs(job, ProcessedStudy([(kind, ds)], {}, ""))
            files.extend(written)
            if names and written and self.in_flight <= 1:
                self.jobs.queue_outputs(job, written, names)
                self.on_queued()

        try:
            result = self.stages.build(analysed, sink)
            files.extend(self._write_outputs(job, result))
        except Exception as exc:
            self._give_up(job, exc)
            return
        try:
            self._finish(job, result, files, started)
        finally:
            self._done(job)

    def _build_early(self, job: EarlyJob, analysed: Any) -> None:
        """Build an early study's result objects and encode them, to hold until it is
        claimed (nothing is written)."""
        try:
            result = self.stages.build(analysed, None)
            if result.written:  # written into the spool: not something to hold
                raise RuntimeError("the early build wrote into the spool")
            held = ProcessedStudy(
                outputs=[(kind, ds if isinstance(ds, EncodedObject) else EncodedObject.of(ds))
                         for kind, ds in result.outputs],
                outcomes=result.outcomes, decision=result.decision, timings=result.timings)
        except Exception as exc:
            self._give_up(job, exc)
            return
        self._early_done(job, held)

    def _model_loop(self) -> None:
        while True:
            first = self._to_models.get()
            if first is None:
                return
            batch = [first]
            images = max(1, len(first[0].instances))
            stop_after = False
            while images < self.gather_images:
                try:
                    nxt = self._to_models.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop_after = True
                    break
                batch.append(nxt)
                images += max(1, len(nxt[0].instances))
            try:
                self._analyse(batch)
            except Exception as exc:  # keep the thread alive; the state is in the database
                log_survived("worker model stage", exc, "the studies stay processing until "
                             "the next start or the end of their lease")
            if stop_after:
                return

    def _analyse(self, batch: list[tuple[StudyJob, Any, float]]) -> None:
        try:
            analysed = list(self.stages.analyse_many([prepared for _, prepared, _ in batch]))
            if len(analysed) != len(batch):
                raise RuntimeError(f"{len(analysed)} results for {len(batch)} studies")
            done = list(zip(batch, analysed))
        except Exception as exc:
            if len(batch) == 1:
                self._give_up(batch[0][0], exc)
                return
            logger.exception("a batch of %d studies failed in the models; one by one",
                             len(batch))
            for item in batch:
                try:
                    self._analyse([item])
                except Exception:
                    logger.exception("worker model stage error")
            return
        for (job, _, started), result in done:
            self._tasks.put(_BUILD, (job, result, started))


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
        self._senders: dict[tuple[str, str, str, int, bool], StoreAssociation] = {}
        """The open association of each destination (by its name and address)."""

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def close_idle(self, now: float | None = None) -> float | None:
        """Release the associations nothing was sent on for ``keep_open_seconds``;
        the seconds until the next one is due to close (None: none left open)."""
        now = time.monotonic() if now is None else now
        keep = self.config.delivery.keep_open_seconds
        due: float | None = None
        for key, sender in list(self._senders.items()):
            left = sender.last_used + keep - now
            if left <= 0 or not sender.is_open:
                self._close(key)
            else:
                due = left if due is None else min(due, left)
        return due

    def close_all(self) -> None:
        for key in list(self._senders):
            self._close(key)

    def _close(self, key: tuple[str, str, str, int, bool]) -> None:
        sender = self._senders.pop(key)
        try:
            sender.close()
        except Exception as exc:  # the peer went away meanwhile: nothing to release
            logger.debug("releasing the association with %s: %s", key[0], exc)

    def backoff(self, attempts: int) -> float:
        d = self.config.delivery
        delay = min(d.backoff_max_seconds, d.backoff_initial_seconds * 2 ** max(0, attempts))
        return delay * random.uniform(0.8, 1.2)

    def run(self, poll_seconds: float = 0.2) -> None:
        try:
            while not self._stop.is_set():
                try:
                    busy = self.run_once()
                except Exception as exc:  # keep the loop alive; the state is in the database
                    log_survived("delivery loop", exc)
                    busy = False
                    self.close_all()
                    self._stop.wait(5.0)
                if not busy:
                    closing = self.close_idle()
                    self._wake.wait(poll_seconds if closing is None
                                    else min(poll_seconds, closing + 0.01))
                    self._wake.clear()
        finally:
            self.close_all()

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
        paths = [Path(item.path) for item in batch]
        missing = [item for item, p in zip(batch, paths) if not p.exists()]
        for item in missing:
            self.jobs.mark_failed(item.id, "result file missing from the spool", dead=True,
                                  retry_at=time.time())
        batch = [item for item, p in zip(batch, paths) if p.exists()]
        if not batch:
            return
        key = (dest.name, dest.ae_title, dest.host, dest.port, dest.tls)
        sender = self._senders.get(key)
        if sender is None:
            limits = self.config.limits
            context = client_context(self.config.tls) if dest.tls else None
            sender = StoreAssociation(
                self.config.node.ae_title, Peer(dest.ae_title, dest.host, dest.port, context),
                Timeouts(limits.connection_timeout, limits.acse_timeout, limits.dimse_timeout,
                         limits.network_timeout),
                self.config.node.max_pdu or 262144)
            self._senders[key] = sender
        started = time.perf_counter()
        try:
            outcomes = sender.store([Path(i.path) for i in batch])
        finally:
            if self.config.delivery.keep_open_seconds <= 0 or not sender.is_open:
                self._close(key)
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


