"""The result objects of a study built in other processes (``[worker] build_processes``).

Building a study's Secondary Captures, SR, PDF and KO is Python under the interpreter
lock (pydicom, highdicom, ReportLab), so in the node's process it cannot use a core
the models and the network leave free: ``bench/e2e.py`` saw the node keep 0.92 of
two cores busy during a burst.  :class:`BuiltElsewhere` is the node's
:class:`~node.processing.StudyProcessor` with its build stage sent to
:class:`BuildProcesses`, a pool of processes (spawned, not forked: the node's process
has threads) started before the models load:

* the analysed study (its findings, heat maps and source datasets) is pickled to a
  build process, which runs :meth:`StudyProcessor.build` on it exactly as the worker's
  thread would and writes each object into the spool as it is made (an SC at a time,
  so a large study never holds all its heat maps at once), atomically and fsynced
  like the node's own writes, under the same deterministic path; it sends back what
  it wrote, never the objects;
* the worker then records them (outcomes, outbox rows) in the job database: only the
  node's process talks to the database, so a build process that dies loses nothing
  but its attempt — the study is retried (``[worker]``'s attempts) with a fresh pool;
* the log lines of a build go back with its result and are logged by the node, with
  their study UID, as if written there.

A build process ignores SIGINT and SIGTERM: stopping is the node's decision (it
drains, then shuts the pool down); it exits when the node's process is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from dicom_out.common import OutputSettings
from node.spool import Spool
from node.worker import (EarlyJob, EncodedObject, ProcessedStudy, WrittenFile, encode,
                         output_path, release_memory)

logger = logging.getLogger(__name__)

_BUILD_LOGGERS = ("node", "dicom_out", "pipeline", "highdicom", "pydicom")
"""Loggers a build may write to."""

_LOG_EXTRAS = ("study_uid", "sop_uid", "series_uid")
"""Record attributes the node's log formatter and JSON log use, carried across."""


@dataclass(frozen=True)
class _ModelInfos:
    """What :meth:`StudyProcessor.build` reads of the analyser: the two models' info."""

    router_info: Any
    classifier_info: Any


class _Collect(logging.Handler):
    """Keeps the log records of one build, to be sent back to the node."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, int, str, dict[str, str]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        extra = {k: str(getattr(record, k)) for k in _LOG_EXTRAS if hasattr(record, k)}
        self.lines.append((record.name, record.levelno, message, extra))


@dataclass(frozen=True)
class _Built:
    """What a build process sends back: everything but the objects."""

    written: tuple[WrittenFile, ...]
    """The objects written into the spool (a build for a claimed study)."""
    encoded: tuple[tuple[str, EncodedObject], ...]
    """The objects encoded, not written (a study started early: held until its claim)."""
    outcomes: dict[str, tuple[str, str]]
    decision: str
    timings: dict[str, float]
    logs: tuple[tuple[str, int, str, dict[str, str]], ...]
    error: BaseException | None = None
    """The exception the build raised (with the build process's traceback as a note)."""


def _lowest_level() -> int:
    """The lowest level the node logs at for any logger a build may write to: what
    a build process collects (the node's own levels then filter what it relays)."""
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in _BUILD_LOGGERS]
    return min([logging.getLogger(n).getEffectiveLevel() for n in names]
               + [logging.getLogger().getEffectiveLevel()])


_STATE: dict[str, Any] = {}
"""The build process's processor, spool and log collector (set by :func:`_start`)."""


def _exit_with(node_pid: int, every_seconds: float = 0.5) -> None:
    """Exit when the node's process is gone (this process is then re-parented).  A pool
    worker would otherwise wait for work for ever: it holds both ends of its task pipe."""
    while os.getppid() == node_pid:
        time.sleep(every_seconds)
    os._exit(0)


def _start(settings: OutputSettings, spool_root: str, min_free_bytes: int, tmp: str,
           level: int, node_pid: int) -> None:
    """Initialiser of a build process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(node_pid,), name="node-watch", daemon=True).start()
    from dicom_out import warm_up

    warm_up()
    collect = _Collect()
    root = logging.getLogger()
    root.handlers[:] = [collect]
    root.setLevel(level)
    _STATE["settings"] = settings
    _STATE["spool"] = Spool(Path(spool_root), min_free_bytes, tmp_dir=Path(tmp))
    _STATE["collect"] = collect


def _ready() -> int:
    """A task that returns once the process is up (the pool is started ahead of use)."""
    return os.getpid()


def _build(study: Any, models: _ModelInfos, hold: bool = False) -> _Built:
    """Build and write the result objects of one analysed study (in a build process);
    with ``hold``, encode them and send them back instead of writing them."""
    from node.processing import StudyProcessor

    processor = StudyProcessor(models, _STATE["settings"])
    spool, collect = _STATE["spool"], _STATE["collect"]
    collect.lines = []
    job = study.prepared.job
    written: list[WrittenFile] = []
    encoded: list[tuple[str, EncodedObject]] = []

    def write(kind: str, ds: pydicom.Dataset) -> None:
        if hold:
            encoded.append((kind, EncodedObject.of(ds)))
            return
        path = output_path(spool, job.study_instance_uid, kind, str(ds.SOPInstanceUID))
        new = not path.exists()
        if new:
            spool.write(path, encode(ds))
        written.append(WrittenFile(kind, str(ds.SOPInstanceUID), str(ds.SOPClassUID), path, new))

    try:
        result = processor.build(study, write)
        for kind, ds in result.outputs:
            write(kind, ds)
    except Exception as exc:
        exc.add_note("in the build process:\n" + "".join(traceback.format_exception(exc)))
        return _Built(tuple(written), (), {}, "", {}, tuple(collect.lines), error=exc)
    finally:
        release_memory()
    return _Built(tuple(written), tuple(encoded), dict(result.outcomes), result.decision,
                  dict(result.timings), tuple(collect.lines))


class BuildProcesses:
    """A pool of build processes writing into the node's spool.

    Started before the models load (its processes import and warm up meanwhile);
    :class:`BuiltElsewhere` sends it the studies.

    Parameters
    ----------
    settings
        The result objects' settings (``[outputs]``).
    spool
        The node's spool: the build processes write into it, their partial files in
        its ``tmp`` directory (which the node empties at start-up).
    processes
        Size of the pool.
    """

    def __init__(self, settings: OutputSettings, spool: Spool, processes: int) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.settings = settings
        self.spool = spool
        self.processes = processes
        self._lock = threading.Lock()
        self._pool, self._started = self._new_pool()

    def _new_pool(self) -> tuple[ProcessPoolExecutor, list[Future[int]]]:
        args = (self.settings, str(self.spool.root), self.spool.min_free_bytes,
                str(self.spool.tmp), _lowest_level(), os.getpid())
        pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start, initargs=args)
        # start them now, not with the first study
        return pool, [pool.submit(_ready) for _ in range(self.processes)]

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until every build process has started and warmed up."""
        for started in self._started:
            started.result(timeout=timeout)

    def pids(self) -> list[int]:
        """Process ids of the build processes now running (for memory figures)."""
        with self._lock:
            processes = getattr(self._pool, "_processes", None) or {}
            return sorted(p.pid for p in processes.values() if p.pid is not None)

    def build(self, study: Any, models: _ModelInfos, hold: bool = False) -> ProcessedStudy:
        """The result objects of ``study`` built and written by a build process,
        returned as :attr:`ProcessedStudy.written`; with ``hold`` (a study started
        early) built and encoded there, and returned as its ``outputs``, unwritten."""
        with self._lock:
            pool = self._pool
        try:
            built: _Built = pool.submit(_build, study, models, hold).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:  # the first to see it starts a new pool
                    logger.error("a build process died; starting a new one (the study "
                                 "%s is retried)", study.prepared.job.study_instance_uid,
                                 extra={"study_uid": study.prepared.job.study_instance_uid})
                    self._pool, self._started = self._new_pool()
                    pool.shutdown(wait=False, cancel_futures=True)
            raise
        for name, level, message, extra in built.logs:
            logging.getLogger(name).log(level, "%s", message, extra=extra)
        if built.error is not None:  # what it wrote waits in the spool for the retry, as
            raise built.error        # after a failed build in the worker's thread
        return ProcessedStudy(outputs=built.encoded, outcomes=built.outcomes,
                              decision=built.decision, timings=built.timings,
                              written=built.written)

    def close(self) -> None:
        """Shut the pool down, waiting for a build still running."""
        with self._lock:
            self._pool.shutdown(wait=True)


class BuiltElsewhere:
    """A :class:`~node.worker.StagedProcessor`: ``stages``' prepare and models in the
    node's process, its build stage in ``builders`` — except for a study the worker
    holds alone (``alone()``), which is built in the worker's thread: with nothing
    else to do there, a second process only adds the trip to it (``bench/e2e.py``:
    one study every 1.5 s took 0.46 s built in the thread, 0.52 s in a build process).
    Both build the same objects (``tests/test_worker.py``)."""

    def __init__(self, stages: Any, builders: BuildProcesses,
                 alone: Callable[[], bool] = lambda: False) -> None:
        self.stages = stages
        self.builders = builders
        self.alone = alone
        self._models = _ModelInfos(stages.analyser.router_info, stages.analyser.classifier_info)

    def prepare(self, job: Any) -> Any:
        return self.stages.prepare(job)

    def analyse_many(self, studies: Sequence[Any]) -> Sequence[Any]:
        return self.stages.analyse_many(studies)

    def build(self, study: Any,
              sink: Callable[[str, pydicom.Dataset], None] | None = None) -> ProcessedStudy:
        """Built and written by a build process (``sink`` is not needed: every object is
        written as it is made), or here when the study is alone.  For a study started
        early (:class:`~node.worker.EarlyJob`: its objects are held until it is claimed)
        the build process sends the objects back encoded, unwritten."""
        if self.alone():
            return self.stages.build(study, sink)
        return self.builders.build(study, self._models,
                                   hold=isinstance(study.prepared.job, EarlyJob))
