"""Prometheus metrics of one node (``prometheus-client``), served at ``/metrics`` by
the console's HTTP server.

Counters and histograms are counted where things happen (the SCP, the worker's
processing function, the deliverer); queue depths and spool free space are read
from the job database and the spool at each scrape, through the same queries as
``status`` (:mod:`node.status`), so they never disagree with it.  Each node has its
own :class:`~prometheus_client.CollectorRegistry` (no process-wide globals).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node.jobs import JobStore
from node.spool import Spool

logger = logging.getLogger(__name__)

#: Stage latency buckets (seconds): from a 5 ms C-STORE to a minutes-long quiet wait.
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                 120.0, 300.0, 900.0)

#: Stages timed: receive (one C-STORE, spool write included), quiet_wait (last instance
#: to processing), processing (the whole study), decode, inference, build (its parts),
#: delivery (one C-STORE association to a destination).
STAGES = ("receive", "quiet_wait", "processing", "decode", "inference", "build", "delivery")


class _StateCollector(Collector):
    """Queue depths and spool free space, read at scrape time."""

    def __init__(self, jobs: JobStore, spool: Spool) -> None:
        self.jobs = jobs
        self.spool = spool

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("fracture_node_queue_depth",
                                  "Rows of the job database by table and state",
                                  labels=["table", "state"])
        try:
            counts = self.jobs.counts()
        except Exception as exc:  # a closed database at shutdown: no sample, no crash
            logger.debug("queue depth not read: %s", exc)
            counts = {}
        for table, states in counts.items():
            for state, n in states.items():
                depth.add_metric([table, state], float(n))
        yield depth
        free = GaugeMetricFamily("fracture_node_spool_free_bytes",
                                 "Free bytes on the spool's file system")
        free.add_metric([], float(self.spool.free_bytes()))
        yield free
        floor = GaugeMetricFamily("fracture_node_spool_floor_bytes",
                                  "Free-space floor below which C-STOREs get 0xA700")
        floor.add_metric([], float(self.spool.min_free_bytes))
        yield floor


class NodeMetrics:
    """The node's metrics.

    Parameters
    ----------
    jobs, spool
        Read at each scrape for queue depths and free space.
    """

    def __init__(self, jobs: JobStore, spool: Spool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.associations = Counter(
            "fracture_node_associations", "Associations requested of the SCP, by result "
            "(accepted, rejected) and reason", ["result", "reason"], registry=r)
        self.instances = Counter(
            "fracture_node_instances", "C-STORE requests by outcome (stored, duplicate, "
            "own_output, refused) and the status answered", ["outcome", "status"], registry=r)
        self.studies = Counter(
            "fracture_node_studies", "Studies processed, by decision", ["decision"],
            registry=r)
        self.deliveries = Counter(
            "fracture_node_deliveries", "Result objects sent to a destination, by outcome "
            "(delivered, retry, dead)", ["destination", "outcome"], registry=r)
        self.early_starts = Counter(
            "fracture_node_early_starts", "Studies started before their quiet period ended, "
            "by outcome: used (written when ready), dropped (an instance arrived meanwhile; "
            "made again), failed (made again when ready), expired (never claimed here)",
            ["outcome"], registry=r)
        self.stage_seconds = Histogram(
            "fracture_node_stage_seconds", "Latency of each stage, seconds", ["stage"],
            buckets=STAGE_BUCKETS, registry=r)
        r.register(_StateCollector(jobs, spool))

    def stage(self, stage: str, seconds: float) -> None:
        """Observe one latency of ``stage`` (one of :data:`STAGES`)."""
        self.stage_seconds.labels(stage=stage).observe(seconds)

    def delivery(self, destination: str, outcome: str, seconds: float,
                 item: object = None) -> None:
        """One result object's delivery attempt (the deliverer's ``on_outcome``)."""
        self.deliveries.labels(destination=destination, outcome=outcome).inc()
        self.stage("delivery", seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition format."""
        return generate_latest(self.registry)
