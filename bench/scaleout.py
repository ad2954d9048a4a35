"""Scale-out benchmark: SQLite vs PostgreSQL job store, one vs two nodes, fail-over.

Three measurements, in one run, on this machine (the load average is printed with
each, since other work shares the cores):

1. **Cost per received instance** with the SQLite store and with the PostgreSQL
   store (same node code, same instances, same run, alternating rounds): a real
   pynetdicom SCU C-STOREs small CR images (64 x 64) over one association, so the
   spool and job-store writes dominate; the quiet period is long, so nothing is
   processed meanwhile.
2. **End-to-end throughput** of one node and of two nodes on one PostgreSQL and one
   spool, with the real shipped models: ``fracture-node serve`` processes, MURA
   validation studies (2-4 radiographs each, as CR DICOM, as bench/e2e.py makes them)
   sent in a burst with DCMTK storescu (alternately to the nodes), results delivered
   to DCMTK storescp.  Time from the first C-STORE to the last result acknowledged.
3. **Fail-over time** with the real models: two ``serve`` nodes; the node that
   claims a study is SIGKILLed while it processes it; the time until the other
   node's first delivery of that study, against the configured lease.

Run: ``.venv/bin/python bench/scaleout.py [--instances 300] [--studies 24]``.

What a 2-core machine can and cannot show: two node processes here share the same
two cores with PostgreSQL, storescu, storescp and whatever else runs, and each
node's ONNX Runtime already uses both cores for one image.  So (2) measures what
coordinating two nodes through the database costs (or, if the second process
overlaps one node's I/O waits with the other's inference, what that overlap gains),
not the speed-up a second machine would bring; that one scales with the CPUs added,
since the nodes share nothing but rows and files.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from conftest import free_port, wait_for, write_config  # noqa: E402
from nodeharness import CopyProcessor  # noqa: E402
from pgserver import PostgresServer  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from test_scaleout import StoreSCP, cr, sql, store  # noqa: E402

from node.config import load_config  # noqa: E402
from node.service import Node  # noqa: E402

EXE = ROOT / ".venv" / "bin" / "fracture-node"


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


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


class ServeNode:
    """``fracture-node serve`` with the shipped models, on the shared database and spool."""

    def __init__(self, workdir: Path, name: str, url: str, pacs_port: int,
                 lease: float = 30.0) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        self.name = name
        self.port = free_port()
        self.log = self.dir / "node.log"
        self.config = write_config(
            self.dir, self.port, quiet_seconds=1.0, spool_dir=workdir / "spool",
            destinations=[{"name": "pacs", "ae_title": "PACS", "port": pacs_port}],
            extra=(f'[database]\nurl = "{url}"\nlease_seconds = {lease}\n'
                   f'node_name = "{name}"\n'))
        self.proc = subprocess.Popen(
            [str(EXE), "--config", str(self.config), "serve", "--ready-file",
             str(self.dir / "ready")], stderr=self.log.open("ab"),
            env=dict(os.environ, TCP_NODELAY="1"))

    def wait_processing(self) -> None:
        """Until the models are loaded and the worker runs."""
        wait_for(lambda: "processing started" in self.log.read_text(), timeout=300,
                 interval=0.2)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)


def send(port: int, paths: list[Path]) -> None:
    subprocess.run(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "FRACTURE_NODE", "-xe",
                    "127.0.0.1", str(port), *map(str, paths)], check=True, capture_output=True,
                   env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, timeout=300)


def settled(url: str, studies: int) -> bool:
    rows = sql(url, "SELECT count(*) AS n FROM studies s WHERE state = 'processed' AND NOT "
                    "EXISTS (SELECT 1 FROM outbox o WHERE o.study_instance_uid = "
                    "s.study_instance_uid AND o.state != 'delivered')")
    return int(rows[0]["n"]) >= studies


def processing_ms(log: Path) -> list[float]:
    """Per-study processing times a node logged (``processed: ... (N ms)``)."""
    return [float(line.rsplit("(", 1)[1].split(" ms")[0])
            for line in log.read_text().splitlines() if "processed:" in line and " ms)" in line]


def throughput(workdir: Path, url: str, count: int, studies: dict[str, list[Path]]
               ) -> tuple[float, float, dict[str, int], float, float, str]:
    """(studies/s, images/s, studies processed per node, median processing ms per
    study, seconds the workers were busy / wall seconds, load) from the first C-STORE
    to the last result acknowledged, real models."""
    pacs = StoreSCP(workdir / "pacs")
    group = [ServeNode(workdir, f"node-{i}", url, pacs.port) for i in range(count)]
    try:
        for n in group:
            n.wait_processing()
        before = load()
        started = time.time()
        for i, paths in enumerate(studies.values()):
            send(group[i % count].port, paths)
        wait_for(lambda: settled(url, len(studies)), timeout=600, interval=0.1)
        last = float(sql(url, "SELECT max(delivered_at) AS t FROM outbox")[0]["t"])
        seconds = last - started
        images = sum(len(p) for p in studies.values())
        by = Counter(r["processed_by"].split("#")[0]
                     for r in sql(url, "SELECT processed_by FROM studies"))
        times = [t for n in group for t in processing_ms(n.log)]
        busy = sum(times) / 1000 / seconds  # 1.0: one worker busy all along
        return (len(studies) / seconds, images / seconds, dict(by), statistics.median(times),
                busy, before)
    finally:
        for n in group:
            n.stop()
        pacs.stop()


def failover(workdir: Path, server: PostgresServer, lease: float,
             study: list[Path], tries: int = 3) -> tuple[float, float, str]:
    """(seconds from SIGKILL of the holder to the other node's first delivery of the
    study, seconds the study took to process on the survivor, load)."""
    for attempt in range(tries):
        url = server.new_database()
        work = workdir / f"try-{attempt}"
        pacs = StoreSCP(work / "pacs")
        a = ServeNode(work, "node-a", url, pacs.port, lease=lease)
        b = ServeNode(work, "node-b", url, pacs.port, lease=lease)
        try:
            a.wait_processing()
            b.wait_processing()
            before = load()
            send(a.port, study)
            owner = wait_for(lambda: sql(url, "SELECT owner FROM studies WHERE owner IS NOT "
                                              "NULL"), timeout=60, interval=0.005)[0]["owner"]
            holder, other = (a, b) if owner.startswith("node-a#") else (b, a)
            killed = time.time()
            holder.kill()
            t = wait_for(lambda: sql(url, "SELECT min(delivered_at) AS t FROM outbox WHERE "
                                          "state = 'delivered'")[0]["t"], timeout=300,
                         interval=0.02)
            row = sql(url, "SELECT processed_by FROM studies")[0]
            if not str(row["processed_by"]).startswith(other.name + "#"):
                print(f"  (try {attempt + 1}: the holder finished before the kill; again)",
                      flush=True)
                continue
            took = processing_ms(other.log)
            return float(t) - killed, took[-1] / 1000 if took else float("nan"), before
        finally:
            a.stop()
            b.stop()
            pacs.stop()
    raise RuntimeError("the holder always finished before it could be killed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--leases", default="3,10")
    parser.add_argument("--skip", default="", help="comma list of: receive,throughput,failover")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (logs)")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    from e2e import make_studies  # bench/e2e.py: MURA validation studies as CR DICOM

    print(f"start: {load()}, {os.cpu_count()} CPUs", flush=True)
    server = PostgresServer()
    try:
        with tempfile.TemporaryDirectory(prefix="scaleout-") as tmp:
            work = Path(tmp)
            if args.keep:
                args.keep.mkdir(parents=True)
                work = args.keep
            if "receive" not in skip:
                costs: dict[str, list[float]] = {"sqlite": [], "postgres": []}
                before = load()
                for r in range(args.rounds):
                    for name in ("sqlite", "postgres"):
                        url = server.new_database() if name == "postgres" else None
                        costs[name].append(receive_cost(work / f"recv-{name}-{r}", url,
                                                        args.instances))
                sq, pg = statistics.median(costs["sqlite"]), statistics.median(costs["postgres"])
                print(f"\nreceive cost ({args.rounds} alternating rounds of "
                      f"{args.instances} instances; {before}, after: {load()})")
                print("| job store | ms per received instance (median of rounds) | rounds |")
                print("| --- | --- | --- |")
                print(f"| SQLite | {sq * 1000:.2f} | "
                      f"{', '.join(f'{c * 1000:.1f}' for c in costs['sqlite'])} |")
                print(f"| PostgreSQL | {pg * 1000:.2f} | "
                      f"{', '.join(f'{c * 1000:.1f}' for c in costs['postgres'])} |")
                print(f"| ratio PostgreSQL / SQLite | {pg / sq:.2f} | |", flush=True)

            if "throughput" not in skip:
                studies = make_studies(work / "studies", args.studies)
                images = sum(len(v) for v in studies.values())
                print(f"\nthroughput, real models: {len(studies)} studies, {images} images, "
                      "burst, quiet period 1 s")
                print("| nodes | studies/s | images/s | studies per node | median ms per "
                      "study (processing) | workers busy / wall | load before |")
                print("| --- | --- | --- | --- | --- | --- | --- |")
                for count in (1, 2):
                    s_rate, i_rate, by, median, busy, before = throughput(
                        work / f"tp-{count}", server.new_database(), count, studies)
                    print(f"| {count} | {s_rate:.2f} | {i_rate:.2f} | "
                          f"{', '.join(f'{k}: {v}' for k, v in sorted(by.items()))} | "
                          f"{median:.0f} | {busy:.2f} | {before} |", flush=True)

            if "failover" not in skip:
                if "throughput" in skip:
                    studies = make_studies(work / "studies", 1)
                study = next(iter(studies.values()))
                print(f"\nfail-over, real models ({len(study)}-image study)")
                print("| lease s | SIGKILL -> first delivery by the other node, s | "
                      "of which processing on the survivor, s | load before |")
                print("| --- | --- | --- | --- |")
                for lease in (float(x) for x in args.leases.split(",")):
                    seconds, took, before = failover(work / f"fo-{lease:g}", server, lease,
                                                     study)
                    print(f"| {lease:g} | {seconds:.1f} | {took:.2f} | {before} |", flush=True)
    finally:
        server.destroy()
    print(f"\nend: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
