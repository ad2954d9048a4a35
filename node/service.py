"""One running node: the SCP, the worker and the deliverer, sharing a spool and a
job database.  ``fracture-node serve`` builds one of these."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from node.config import Config
from node.jobs import node_name, open_job_store
from node.scp import StorageSCP
from node.spool import Spool
from node.worker import Deliverer, Processor, Worker

logger = logging.getLogger(__name__)


class Node:
    """The assembled node.

    Parameters
    ----------
    config
        Resolved configuration.
    processor_factory
        Called once, in :meth:`start`, to build the processing function (so the
        models are loaded once per process and stay warm).
    """

    def __init__(self, config: Config, processor_factory: Callable[[], Processor]) -> None:
        self.config = config
        shared = bool(config.database.url)  # several nodes share spool and database
        self.spool = Spool(config.storage.spool_dir, config.storage.min_free_mb * 2**20,
                           node_name=node_name(config) if shared else None)
        self.jobs = open_job_store(config, as_node=True)
        self.scp = StorageSCP(config, self.spool, self.jobs)
        self._processor_factory = processor_factory
        self.worker: Worker | None = None
        self.deliverer = Deliverer(config, self.spool, self.jobs)
        self._threads: list[threading.Thread] = []
        self.address: tuple[str, int] | None = None

    def start(self) -> tuple[str, int]:
        """Load the processor, start delivering and processing, then listen."""
        processor = self._processor_factory()
        self.worker = Worker(self.config, self.spool, self.jobs, processor,
                             busy_studies=self.scp.tracker.busy_studies)
        for name, target in (("worker", self.worker.run), ("deliverer", self.deliverer.run)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.address = self.scp.start()
        return self.address

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, finish what is in hand, stop the loops, close the database."""
        self.scp.stop(grace_seconds)
        if self.worker is not None:
            self.worker.stop()
        self.deliverer.stop()
        for thread in self._threads:
            thread.join(timeout=grace_seconds + 60)
        self.jobs.close()
        logger.info("node stopped")
