"""One running node: the SCP, the worker and the deliverer, sharing a spool and a
job database, and, when configured, the status console with ``/metrics``.
``fracture-node serve`` builds one of these.

Start-up order: the SCP binds its port first (a taken port fails in a second, not
after the models have loaded) and accepts and spools associations at once; the
models load in the worker's thread, and processing starts when they are in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydicom.dataset import Dataset

from node.audit import AuditTrail
from node.builder import BuildProcesses, BuiltElsewhere
from node.config import Config, available_cores
from node.jobs import JobStoreBackend, OutboxItem, StudyJob, node_name, open_job_store
from node.metrics import NodeMetrics
from node.processing import StudyProcessorFactory, output_settings
from node.scp import StorageSCP
from node.spool import Spool
from node.worker import (
    Deliverer,
    EarlyJob,
    Heartbeat,
    PipelinedWorker,
    ProcessedStudy,
    Processor,
    StagedProcessor,
    WholeStudy,
    Worker,
    is_staged,
    limit_malloc_arenas,
)

logger = logging.getLogger(__name__)

SWITCH_INTERVAL = 0.001
"""Seconds a thread may hold the interpreter before another waiting for it gets a turn
(``sys.setswitchinterval``; Python's default is 0.005).  The node's threads mostly wait
for the interpreter, not for the cores: the model thread needs it back between ONNX
Runtime calls (which run without it), the deliverer and the association threads between
PDUs, while a study thread builds result objects in pure Python.  With 1 ms the model
thread keeps its core busier: the median of a burst of 20 studies was lower at 1 ms in
each of 5 alternating pairs of runs (mean 3.04 s against 3.85 s at 5 ms; ``bench/e2e.py``,
``docs/benchmarks.md``)."""


class ObservedStages:
    """A :class:`~node.worker.StagedProcessor` with its study latencies and decisions
    counted in /metrics: the quiet wait when a study is taken up, ``processing`` from
    then to its result objects (queue waits between the stages included), the
    stages' own timings, and the decision (``error`` for a study that failed).  A
    study started early is counted only when its result objects are used."""

    def __init__(self, stages: StagedProcessor, metrics: NodeMetrics,
                 jobs: JobStoreBackend) -> None:
        self.stages = stages
        self.metrics = metrics
        self.jobs = jobs

    def prepare(self, job: StudyJob) -> tuple[StudyJob, float, float | None, Any]:
        rows = self.jobs.query("SELECT last_received_at FROM studies "
                               "WHERE study_instance_uid = ?", [job.study_instance_uid])
        waited = max(0.0, time.time() - float(rows[0]["last_received_at"])) if rows else None
        if waited is not None and not isinstance(job, EarlyJob):
            self.metrics.stage("quiet_wait", waited)
        started = time.perf_counter()
        try:
            return job, started, waited, self.stages.prepare(job)
        except Exception:
            self._error(job)
            raise

    def analyse_many(self, studies: Sequence[tuple[StudyJob, float, float | None, Any]]
                     ) -> list[tuple[StudyJob, float, float | None, Any]]:
        try:
            analysed = self.stages.analyse_many([s[-1] for s in studies])
        except Exception:
            if len(studies) == 1:
                self._error(studies[0][0])
            raise
        return [(*s[:-1], a) for s, a in zip(studies, analysed)]

    def build(self, study: tuple[StudyJob, float, float | None, Any],
              sink: Callable[[str, Dataset], None] | None = None) -> ProcessedStudy:
        """The result objects; counted now, or for a study started early (whose work
        may still be dropped) when the worker uses them (:meth:`result_used`)."""
        job, started, waited, analysed = study
        try:
            result = self.stages.build(analysed, sink)
        except Exception:
            self._error(job)
            raise
        if isinstance(job, EarlyJob):  # its quiet wait is the wait to the early start
            timings = {"processing": time.perf_counter() - started, **result.timings}
            if waited is not None:
                timings["quiet_wait"] = waited
            return dataclasses.replace(result, timings=timings)
        self.metrics.stage("processing", time.perf_counter() - started)
        self.result_used(result)
        return result

    def result_used(self, result: ProcessedStudy) -> None:
        """Count a study's stage timings and decision: here for a study built as claimed,
        and called by the worker for one started early once its objects are written."""
        for stage, seconds in getattr(result, "timings", {}).items():
            self.metrics.stage(stage, seconds)
        self.metrics.studies.labels(decision=result.decision).inc()

    def _error(self, job: StudyJob) -> None:
        if not isinstance(job, EarlyJob):  # early work that fails is only dropped
            self.metrics.studies.labels(decision="error").inc()


class Node:
    """The assembled node.

    Parameters
    ----------
    config
        Resolved configuration.
    processor_factory
        Called once, in the worker's thread after the SCP is listening, to build the
        processing function (so the models are loaded once per process and stay warm).
    """

    def __init__(self, config: Config, processor_factory: Callable[[], Processor]) -> None:
        self.config = config
        shared = bool(config.database.url)  # several nodes share spool and database
        self.spool = Spool(config.storage.spool_dir, config.storage.min_free_mb * 2**20,
                           node_name=node_name(config) if shared else None)
        self.jobs = open_job_store(config, as_node=True)
        self.metrics = NodeMetrics(self.jobs, self.spool)
        self.audit: AuditTrail | None = AuditTrail(config) if config.audit.enabled else None
        self.scp = StorageSCP(config, self.spool, self.jobs, metrics=self.metrics,
                              audit=self.audit)
        self._processor_factory = processor_factory
        self.heartbeat = Heartbeat(self.jobs, self.scp.tracker.busy_studies)
        self.worker: Worker | None = None
        self.build_processes: BuildProcesses | None = None
        """The worker's build processes, when it has them (``[worker] build_processes``)."""
        self.deliverer = Deliverer(config, self.spool, self.jobs, on_outcome=self._delivered)
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.processing = threading.Event()
        """Set once the models are loaded and the worker runs."""
        self.fatal: str | None = None
        """Why the node cannot go on (the models failed to load); ``serve`` exits 2."""
        self.address: tuple[str, int] | None = None
        self.console: object | None = None

    def start(self) -> tuple[str, int]:
        """Listen, start delivering, then load the processor and start processing in
        the worker thread.  Returns the bound (address, port).

        Raises
        ------
        StartError
            The port is taken (or not ours to bind); nothing was loaded.
        """
        sys.setswitchinterval(SWITCH_INTERVAL)
        if "MALLOC_ARENA_MAX" not in os.environ:  # an administrator's own setting wins
            limit_malloc_arenas(available_cores())
        self.address = self.scp.start()
        # beat from the start: while the models load the node already receives, and
        # other nodes must see it alive and its receiving marks
        self.heartbeat.start()
        if self.config.console.enabled:
            from node.console.app import ConsoleServer

            server = ConsoleServer(self.config, self.jobs, self.metrics)
            try:
                server.start()
            except Exception:
                self.scp.stop(0)
                raise
            self.console = server
        self._spawn("deliverer", self.deliverer.run)
        self._spawn("worker", self._load_and_process)
        if self.audit is not None:
            self.audit.application(started=True)
        return self.address

    def _delivered(self, destination: str, outcome: str, seconds: float,
                   item: OutboxItem) -> None:
        self.metrics.delivery(destination, outcome, seconds, item)
        if self.audit is not None and outcome in ("delivered", "dead"):
            dest = self.config.destination(destination)
            self.audit.instances_transferred(
                received=False, peer_ae=dest.ae_title, peer_address=dest.host,
                study_instance_uid=item.study_instance_uid, sop_classes={item.sop_class_uid: 1},
                outcome="0" if outcome == "delivered" else "8")

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _load_and_process(self) -> None:
        started = time.perf_counter()
        builders = self.config.worker.resolved_build_processes
        if builders and isinstance(self._processor_factory, StudyProcessorFactory):
            self._start_build_processes(builders)  # they warm up while the models load
        try:
            processor = self._processor_factory()
        except Exception as exc:
            self.fatal = (f"the models could not be loaded ({type(exc).__name__}: {exc}); "
                          "run fracture-node check-config")
            logger.error("%s; received instances stay in the spool", self.fatal)
            return
        if self._stopping.is_set():
            return
        threads = self.config.worker.resolved_threads
        if threads == 1:
            self.worker = Worker(self.config, self.spool, self.jobs, self._observed(processor),
                                 busy_studies=self.scp.tracker.busy_studies, heartbeat=False,
                                 on_queued=self.deliverer.wake)
        else:
            stages = processor if is_staged(processor) else WholeStudy(processor)
            builders = 0
            if self.build_processes is not None and self._build_processes_ready():
                stages = BuiltElsewhere(processor, self.build_processes)
                builders = self.build_processes.processes
            self.worker = worker = PipelinedWorker(
                self.config, self.spool, self.jobs, ObservedStages(stages, self.metrics,
                                                                   self.jobs),
                # a study thread waits while a build process builds: one more per process
                study_threads=threads - 1 + builders,
                max_images_in_flight=self.config.worker.max_images_in_flight,
                gather_images=self.config.worker.images_per_run,
                busy_studies=self.scp.tracker.busy_studies, heartbeat=False,
                on_queued=self.deliverer.wake, early_start=self.config.early_start,
                on_early=lambda outcome: self.metrics.early_starts.labels(outcome=outcome).inc())
            if isinstance(stages, BuiltElsewhere):  # a study in hand alone is built here
                stages.alone = lambda: worker.in_flight <= 1
        logger.info("processing started (%.1f s after listening; %d worker thread(s)%s)",
                    time.perf_counter() - started, threads,
                    "" if threads == 1 else f": 1 for the models, {threads - 1} for the studies"
                    + (f", {builders} build process(es) for the result objects"
                       if builders else "")
                    + (f"; a study may start {self.worker.early_start:g} s after its last "
                       "instance" if isinstance(self.worker, PipelinedWorker)
                       and self.worker.early_start else ""))
        self.processing.set()
        self.worker.run()

    def _start_build_processes(self, processes: int) -> None:
        try:
            self.build_processes = BuildProcesses(output_settings(self.config), self.spool,
                                                  processes)
        except Exception as exc:
            logger.error("the build processes could not be started (%s: %s); the result "
                         "objects are built in the worker's threads", type(exc).__name__, exc)

    def _build_processes_ready(self) -> bool:
        assert self.build_processes is not None
        try:
            self.build_processes.wait_ready()
            return True
        except Exception as exc:
            logger.error("the build processes did not start (%s: %s); the result objects "
                         "are built in the worker's threads", type(exc).__name__, exc)
            self.build_processes.close()
            self.build_processes = None
            return False

    def _observed(self, processor: Processor) -> Processor:
        """The processor with its study latencies and decisions counted in /metrics."""
        observed = ObservedStages(WholeStudy(processor), self.metrics, self.jobs)

        def process(job: StudyJob) -> ProcessedStudy:
            return observed.build(observed.analyse_many([observed.prepare(job)])[0])

        return process

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, finish what is in hand, stop the loops, close the database."""
        self._stopping.set()
        if self.console is not None:
            self.console.stop()  # type: ignore[attr-defined]
        self.scp.stop(grace_seconds)
        if self.worker is not None:
            self.worker.stop()
        self.deliverer.stop()
        for thread in self._threads:
            if thread.name == "worker" and self.worker is None:
                continue  # still loading the models: a daemon thread, left to exit
            thread.join(timeout=grace_seconds + 60)
        if self.build_processes is not None:
            self.build_processes.close()
        self.heartbeat.stop()
        self.jobs.close()
        if self.audit is not None:
            self.audit.application(started=False)
            self.audit.close()
        logger.info("node stopped")
