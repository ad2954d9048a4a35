"""Scale-out benchmark: SQLite vs PostgreSQL job store, one vs two nodes, fail-over.

Three measurements, in one run, on this machine:

1. **Cost per received instance** with the SQLite store and with the PostgreSQL
   store (same node code, same instances, same run, alternating rounds): a real
   pynetdicom SCU C-STOREs small CR images (64 x 64) over one association, so the
   job-store write dominates; the quiet period is long, so nothing is processed
   meanwhile.
2. **End-to-end throughput** of one node and of two nodes on one PostgreSQL and one
   spool: studies of one image each, sent alternately to the nodes, processed by the
   tests' copy-and-report function (not the models) and delivered to DCMTK storescp;
   time from the first C-STORE to the last result received.
3. **Fail-over time**: a node is SIGKILLed while it holds a study; the time until the
   other node's first delivery of that study, against the configured lease.  It
   includes the processing delay of the stand-in function (``--delay``).

Run: ``.venv/bin/python bench/scaleout.py [--instances 300] [--studies 40]``.
The machine has 2 cores: two node processes share them with PostgreSQL and
storescp, so (2) shows the overhead of coordination, not a speed-up from more
hardware.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port, wait_for, write_config  # noqa: E402
from nodeharness import CopyProcessor  # noqa: E402
from pgserver import PostgresServer  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from test_scaleout import ServedNode, StoreSCP, cr, sql, store  # noqa: E402

from node.config import load_config  # noqa: E402
from node.service import Node  # noqa: E402


def receive_cost(workdir: Path, url: str | None, n: int) -> float:
    """Seconds per received instance (C-STORE round trip, spool + job store)."""
    extra = f'[database]\nurl = "{url}"\nnode_name = "bench"\n' if url else ""
    workdir.mkdir(parents=True)
    config = load_config(write_config(workdir, free_port(), quiet_seconds=3600, extra=extra))
    node = Node(config, CopyProcessor)
    port = node.start()[1]
    try:
        study = generate_uid()
        datasets = [cr(study) for _ in range(n)]
        store(port, datasets[:5])  # warm up: connection, first study row
        started = time.perf_counter()
        statuses = store(port, datasets[5:])
        elapsed = time.perf_counter() - started
        assert set(statuses) == {0}, statuses
        return elapsed / (n - 5)
    finally:
        node.stop(grace_seconds=2)


def throughput(workdir: Path, url: str, nodes: int, studies: int) -> float:
    """Studies per second, first C-STORE to last result received."""
    pacs = StoreSCP(workdir / "pacs")
    group = [ServedNode(workdir, f"node-{i}", url, workdir / "spool", pacs.port).start()
             for i in range(nodes)]
    try:
        uids = [generate_uid() for _ in range(studies)]
        started = time.perf_counter()
        for i, uid in enumerate(uids):
            store(group[i % nodes].port, [cr(uid)])
        wait_for(lambda: len(pacs.received()) == 2 * studies, timeout=600, interval=0.1)
        return studies / (time.perf_counter() - started)
    finally:
        for n in group:
            n.stop()
        pacs.stop()


def failover(workdir: Path, url: str, lease: float, delay: float) -> float:
    """Seconds from SIGKILL of the holder to the other node's first delivery."""
    import test_scaleout

    test_scaleout.LEASE = lease
    pacs = StoreSCP(workdir / "pacs")
    a = ServedNode(workdir, "node-a", url, workdir / "spool", pacs.port, delay=delay).start()
    b = ServedNode(workdir, "node-b", url, workdir / "spool", pacs.port, delay=delay).start()
    try:
        study = generate_uid()
        store(a.port, [cr(study)])
        owner = wait_for(lambda: sql(url, "SELECT owner FROM studies WHERE owner IS NOT NULL"),
                         timeout=60, interval=0.01)[0]["owner"]
        holder = a if owner.startswith("node-a#") else b  # any node may claim it
        killed = time.time()
        holder.signal(signal.SIGKILL)
        rows = wait_for(lambda: sql(url, "SELECT min(delivered_at) AS t FROM outbox WHERE "
                                         "study_instance_uid = %s AND state = 'delivered'",
                                    [study])[0]["t"], timeout=120, interval=0.05)
        return float(rows) - killed
    finally:
        a.stop()
        b.stop()
        pacs.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--leases", default="3,10")
    args = parser.parse_args(argv)
    server = PostgresServer()
    try:
        with tempfile.TemporaryDirectory(prefix="scaleout-") as tmp:
            work = Path(tmp)
            costs: dict[str, list[float]] = {"sqlite": [], "postgres": []}
            for r in range(args.rounds):
                for name in ("sqlite", "postgres"):
                    url = server.new_database() if name == "postgres" else None
                    costs[name].append(receive_cost(work / f"recv-{name}-{r}", url,
                                                    args.instances))
            sq, pg = statistics.median(costs["sqlite"]), statistics.median(costs["postgres"])
            print("| job store | ms per received instance (median of rounds) |")
            print("| --- | --- |")
            print(f"| SQLite | {sq * 1000:.2f} |")
            print(f"| PostgreSQL | {pg * 1000:.2f} |")
            print(f"| ratio PostgreSQL / SQLite | {pg / sq:.2f} |\n")

            print("| nodes | studies/s (copy + report, no models) |")
            print("| --- | --- |")
            for count in (1, 2):
                rate = throughput(work / f"tp-{count}", server.new_database(), count,
                                  args.studies)
                print(f"| {count} | {rate:.1f} |")
            print()
            print(f"| lease s | SIGKILL -> first delivery by the other node, s "
                  f"(includes {args.delay} s processing) |")
            print("| --- | --- |")
            for lease in (float(x) for x in args.leases.split(",")):
                seconds = failover(work / f"fo-{lease}", server.new_database(), lease,
                                   args.delay)
                print(f"| {lease:g} | {seconds:.1f} |")
    finally:
        server.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
