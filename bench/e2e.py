"""End-to-end benchmark: N real studies through a real Orthanc and the node.

Studies of 2-4 real radiographs (MURA validation studies of the humerus and forearm
from ../shared/data/msk, wrapped into CR DICOM in a temporary folder) are stored into
Orthanc with DCMTK storescu; Orthanc's routing rule sends each stable study to the
node, which sends its results back.  For every study the node's job database gives:

* ``received``  first and last instance received by the node (Orthanc routed it);
* ``ready``     last received + the node's quiet period (the study is complete);
* ``processed`` results written and queued (pipeline + dicom_out);
* ``delivered`` the last result acknowledged by Orthanc.

Printed per study and as medians: processing (ready -> processed, the node's share),
delivery (processed -> delivered, mostly Orthanc storing), and the total after the
quiet period (ready -> delivered), plus throughput and lost studies.

Each arrival pattern (a burst of all studies; one study every 1.5 s) runs three times
back to back: with ``[worker] threads = 1`` (one study at a time: the worker before
issue 15, the reference), with the default (stages side by side, studies batched, the
result objects built in the study threads) and with one build process for the result
objects (``build_processes = 1``).  The node's CPU seconds include its build
processes'.  ``--early-start 0,default`` runs each setting without and with early starts
(``[worker] early_start_seconds``: a study's results made during its quiet period, sent
when it ends).  Targets (issue 15): burst median <= 1.5 s, one every 1.5 s median <= 0.5 s,
no study lost.  The load average is printed with each run, Orthanc's CPU seconds, and
how many of the machine's cores were busy (every process) from the first study ready to
the last result stored: whether the cores were the limit.  Usage::

    .venv/bin/python bench/e2e.py [--studies 20] [--intervals 0,1.5]
                                  [--threads 1,default,default/1] [--streams 1,2]
                                  [--keep-open 0,default] [--early-start 0,default]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MSK = ROOT.parent / "shared" / "data" / "msk"
sys.path.insert(0, str(ROOT))


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


orthanc_ctl = _load("orthanc_ctl", ROOT / "orthanc-test" / "orthanc_ctl.py")
demo_data = _load("make_demo_data", ROOT / "scripts" / "make_demo_data.py")


def make_studies(directory: Path, count: int) -> dict[str, list[Path]]:
    """``count`` MURA validation studies with 2-4 images each, as CR DICOM."""
    directory.mkdir(parents=True, exist_ok=True)
    by_study: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in csv.DictReader((MSK / "manifest.csv").open()):
        if row["dataset"] == "MURA-v1.1" and row["split"] == "val" and \
                row["body_part"] in ("HUMERUS", "FOREARM"):
            by_study[row["study_id"]].append(row)
    chosen = [(k, v) for k, v in sorted(by_study.items()) if 2 <= len(v) <= 4][:count]
    studies: dict[str, list[Path]] = {}
    for i, (key, rows) in enumerate(chosen):
        from pydicom.uid import generate_uid

        study_uid = generate_uid(entropy_srcs=[key, "bench-e2e"])
        patient = {"PatientName": f"BENCH^{i:03d}", "PatientID": f"BENCH-{i:03d}",
                   "PatientBirthDate": "19700101", "PatientSex": "O"}
        paths = []
        for n, row in enumerate(rows, start=1):
            ds = demo_data.wrap(MSK / row["path"], row["body_part"], 1, n, study_uid, patient)
            if row["body_part"] == "FOREARM":
                ds.BodyPartExamined = "ARM"
            path = directory / f"{i:03d}_{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        studies[study_uid] = paths
    return studies


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of running processes (the node's build processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _machine_busy_seconds() -> float:
    """CPU seconds this machine's cores have been busy since boot (``/proc/stat``: user,
    nice, system, irq, softirq and steal; not idle nor iowait), over all its cores."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class _BusySampler:
    """Samples :func:`_machine_busy_seconds` every 50 ms in a thread, so that the cores
    busy over a window found afterwards (first study ready to last result stored) can
    be read back."""

    def __init__(self, every: float = 0.05) -> None:
        import threading

        self.samples: list[tuple[float, float]] = [(time.time(), _machine_busy_seconds())]
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, name="busy-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.samples.append((time.time(), _machine_busy_seconds()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), _machine_busy_seconds()))

    def cores_busy(self, start: float, end: float) -> float:
        """Mean busy cores from the last sample at or before ``start`` to the first at or
        after ``end``."""
        before = [s for s in self.samples if s[0] <= start] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= end] or self.samples[-1:]
        (t0, b0), (t1, b1) = before[-1], after[0]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else float("nan")


MODEL_SETS = {"fp32": ("bodypart-router", "fracture-classifier"),
              "bf16": ("bodypart-router-bf16", "fracture-classifier-bf16")}
"""``--models``: the shipped fp32 pair, or the same graphs served in bf16 (models of
their own, ``models/eval/bf16/report.md``)."""


def runnable(model_sets: list[str]) -> list[str]:
    """``model_sets`` less the bf16 pair on a CPU without bfloat16 instructions (the node
    refuses to serve it there), saying so."""
    from models.runtime import bf16_supported, no_bf16_reason

    if "bf16" in model_sets and not bf16_supported():
        print(f"bf16 models: not run, {no_bf16_reason()}: the node refuses them here", flush=True)
        return [m for m in model_sets if m != "bf16"]
    return model_sets


def model_config(shipped: Any, which: str) -> Any:
    """``[models]`` of the shipped config with the router and classifier of ``which``."""
    import dataclasses

    router, classifier = MODEL_SETS[which]
    return dataclasses.replace(shipped.models, router=router, classifier=classifier)


def run(studies: dict[str, list[Path]], work: Path, threads: int | None, interval: float,
        quiet_seconds: float, stable_age: int, model_threads: int | None = None,
        build_processes: int | None = None, models: str = "fp32",
        streams: int | None = None, keep_open: float | None = None,
        early_start: float | None = None) -> dict[str, object]:
    """One run: a fresh Orthanc and node (``[worker] threads``, ``model_streams``), the studies pushed into
    Orthanc ``interval`` seconds apart (0: a burst), until every result is stored."""
    from node.config import (
        Config,
        DeliveryConfig,
        DestinationConfig,
        NodeConfig,
        PeerConfig,
        StorageConfig,
        StudyConfig,
        WorkerConfig,
        load_config,
        render_config,
    )
    from node.processing import processor_factory
    from node.service import Node

    work.mkdir(parents=True)
    n_images = sum(len(v) for v in studies.values())
    node_port = orthanc_ctl.free_port()
    orthanc = orthanc_ctl.Orthanc(work / "orthanc", node_port=node_port, route=True,
                                  stable_age=stable_age).start()
    shipped = load_config(ROOT / "config.toml", environ={})
    cfg = work / "node.toml"
    cfg.write_text(render_config(Config(
        node=NodeConfig(port=node_port),
        peers=(PeerConfig("ORTHANC", "127.0.0.1"),),
        destinations=(DestinationConfig("pacs", "ORTHANC", "127.0.0.1", orthanc.dicom_port),),
        storage=StorageConfig(spool_dir=work / "spool", database=work / "node.sqlite"),
        study=StudyConfig(quiet_seconds=quiet_seconds),
        worker=WorkerConfig(threads=threads, model_streams=streams,
                            early_start_seconds=early_start, **(
            {} if build_processes is None else {"build_processes": build_processes})),
        models=model_config(shipped, models),
        delivery=DeliveryConfig() if keep_open is None else DeliveryConfig(
            keep_open_seconds=keep_open),
    )))
    config = load_config(cfg, environ={})
    node = Node(config, processor_factory(config, model_threads))
    node.start()
    try:
        deadline = time.monotonic() + 120
        while not node.processing.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        load_before = os.getloadavg()
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        builders = node.build_processes.pids() if node.build_processes is not None else []
        builders_before = _cpu_seconds(builders)
        orthanc_pids = [orthanc.process.pid] if orthanc.process else []
        orthanc_before = _cpu_seconds(orthanc_pids)
        sampler = _BusySampler()
        started = time.time()
        for n, paths in enumerate(studies.values()):
            if n and interval:
                time.sleep(interval)
            subprocess.run(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "-xe",
                            "127.0.0.1", str(orthanc.dicom_port), *map(str, paths)],
                           check=True, capture_output=True,
                           env=dict(os.environ, TCP_NODELAY="1"))
        pushed = time.time()
        deadline = time.monotonic() + 120 + 10 * len(studies)
        while time.monotonic() < deadline:
            done = node.jobs.query(
                "SELECT COUNT(*) AS n FROM studies s WHERE state = 'processed' AND NOT "
                "EXISTS (SELECT 1 FROM outbox o WHERE o.study_instance_uid = "
                "s.study_instance_uid AND o.state != 'delivered')")[0]["n"]
            if done >= len(studies):
                break
            time.sleep(0.2)
        finished = time.time()
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        builders_cpu = _cpu_seconds(builders) - builders_before
        orthanc_cpu = _cpu_seconds(orthanc_pids) - orthanc_before
        sampler.stop()
        load_after = os.getloadavg()
        rows = node.jobs.query(
            "SELECT s.study_instance_uid AS uid, s.updated_at AS processed, "
            "(SELECT MIN(received_at) FROM instances i WHERE i.study_instance_uid = "
            " s.study_instance_uid) AS first, "
            "(SELECT MAX(received_at) FROM instances i WHERE i.study_instance_uid = "
            " s.study_instance_uid) AS last, "
            "(SELECT MAX(delivered_at) FROM outbox o WHERE o.study_instance_uid = "
            " s.study_instance_uid) AS delivered, "
            "(SELECT COUNT(*) FROM outbox o WHERE o.study_instance_uid = s.study_instance_uid)"
            " AS results FROM studies s")
    finally:
        node.stop(grace_seconds=2)
        orthanc.stop()
    processing, delivery, total = [], [], []
    readies = [r["last"] + quiet_seconds for r in rows if r["delivered"] is not None]
    delivered = [r["delivered"] for r in rows if r["delivered"] is not None]
    busy = sampler.cores_busy(min(readies), max(delivered)) if readies else float("nan")
    for r in rows:
        if r["delivered"] is None:
            continue
        ready = r["last"] + quiet_seconds
        processing.append(r["processed"] - ready)
        delivery.append(r["delivered"] - r["processed"])
        total.append(r["delivered"] - ready)
    return {
        "threads": config.worker.resolved_threads,
        "model_threads": model_threads or config.worker.model_threads,
        "streams": config.worker.resolved_model_streams,
        "keep_open": config.delivery.keep_open_seconds,
        # what the worker ran with: 0 when off, and with one thread or build processes
        "early_start": getattr(node.worker, "early_start", 0.0),
        "models": models,
        "interval": interval, "studies": len(studies), "completed": len(total),
        "lost": len(studies) - len(total),
        "median": statistics.median(total) if total else float("nan"),
        "max": max(total) if total else float("nan"),
        "processing": statistics.median(processing) if processing else float("nan"),
        "delivery": statistics.median(delivery) if delivery else float("nan"),
        "images_s": n_images / (finished - started), "push_s": pushed - started,
        # CPU seconds of this process (the node runs in it) over the run: how many cores
        # it kept busy, and what it cost per study whatever the other jobs took
        "cpu_s": (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        + builders_cpu,  # the node's process and its build processes
        "build_processes": config.worker.resolved_build_processes,
        # the same window for the archive and the whole machine (every process, this
        # benchmark's storescu pushes and anything else running included): whether the
        # cores were the limit
        "orthanc_cpu_s": orthanc_cpu, "machine_cores_busy": busy, "cores": os.cpu_count(),
        "wall_s": finished - started,
        "load": (load_before[0], load_after[0]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--quiet-seconds", type=float, default=1.0)
    parser.add_argument("--stable-age", type=int, default=1)
    parser.add_argument("--intervals", default="0,1.5",
                        help="seconds between two studies, one run each (0: all at once, a burst)")
    parser.add_argument("--threads", default="1,default,default/1",
                        help="[worker] threads, one run each; 1 (one study at a time, the worker "
                             "before issue 15) is the reference; 'default': the cores; TxM: T "
                             "threads with M intra-op threads per graph instead of the derived "
                             "number; T/B: with B build processes ([worker] build_processes, "
                             "default 0: the staged worker builds in its threads)")
    parser.add_argument("--models", default="fp32",
                        help="comma-separated model sets, one run each per thread setting: "
                             + ", ".join(MODEL_SETS))
    parser.add_argument("--streams", default="default",
                        help="[worker] model_streams, comma-separated, one run each per thread "
                             "setting (1: the images of a model run one at a time; 'default': "
                             "the key left out)")
    parser.add_argument("--keep-open", default="default",
                        help="[delivery] keep_open_seconds, comma-separated, one run each per "
                             "thread setting (0: an association per round of sends)")
    parser.add_argument("--early-start", default="default",
                        help="[worker] early_start_seconds, comma-separated, one run each per "
                             "thread setting (0: off, each study starts when its quiet period "
                             "ends; 'default': the key left out)")
    parser.add_argument("--log", help="append the node's log (INFO) to this file")
    args = parser.parse_args(argv)
    model_sets = args.models.split(",")
    for which in model_sets:
        if which not in MODEL_SETS:
            parser.error(f"--models: {which!r} is not one of {', '.join(MODEL_SETS)}")
    model_sets = runnable(model_sets)
    intervals = [float(x) for x in args.intervals.split(",")]
    streams = [None if x == "default" else int(x) for x in args.streams.split(",")]
    keep_open = [None if x == "default" else float(x) for x in args.keep_open.split(",")]
    early = [None if x == "default" else float(x) for x in args.early_start.split(",")]
    threads: list[tuple[int | None, int | None, int | None]] = []
    for t in args.threads.split(","):
        t, _, builders = t.partition("/")
        count, _, model = t.partition("x")
        threads.append((None if count == "default" else int(count), int(model) if model else None,
                        int(builders) if builders else None))
    if args.log:
        import logging

        handler = logging.FileHandler(args.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(name)s %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)

    work = Path(tempfile.mkdtemp(prefix="e2e-bench-"))
    try:
        studies = make_studies(work / "studies", args.studies)
        n_images = sum(len(v) for v in studies.values())
        print(f"{len(studies)} studies, {n_images} images; Orthanc StableAge {args.stable_age} s, node "
              f"quiet period {args.quiet_seconds} s; times from the end of the quiet period to the last "
              "result stored in Orthanc", flush=True)
        results = []
        for interval in intervals:
            # the reference and the new worker (and model sets) back to back, same load
            for (t, m, b), which, k, o, e in itertools.product(threads, model_sets, streams,
                                                            keep_open, early):
                r = run(studies, work / f"run-{len(results)}-{interval}-{t}-{m}-{b}-{which}-{k}-{e}", t, interval,
                        args.quiet_seconds, args.stable_age, m, b, which, k, o, e)
                print(r, flush=True)
                results.append(r)
        print("\n| arrival | models | worker threads (model intra-op) / build processes | model streams | keep open s | early start s | median s | max s | processing s | delivery s "
              "| lost | images/s | node CPU s per study (with its build processes) | cores busy (CPU / wall) "
              "| Orthanc CPU s per study | machine: cores busy from the first study ready to the last "
              "result stored | load average (start, end) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            arrival = "all at once (burst)" if not r["interval"] else f"one study every {r['interval']} s"
            print(f"| {arrival} | {r['models']} | {r['threads']} ({r['model_threads']}) / {r['build_processes']} | {r['streams']} | {r['keep_open']:g} | {r['early_start']:g} | {r['median']:.2f} | {r['max']:.2f} | "
                  f"{r['processing']:.2f} | {r['delivery']:.2f} | {r['lost']} | {r['images_s']:.2f} | "
                  f"{r['cpu_s'] / r['studies']:.2f} | {r['cpu_s'] / r['wall_s']:.2f} | "
                  f"{r['orthanc_cpu_s'] / r['studies']:.2f} | "
                  f"{r['machine_cores_busy']:.2f} of {r['cores']} | "
                  f"{r['load'][0]:.1f}, {r['load'][1]:.1f} |")
        lost = sum(int(r["lost"]) for r in results)  # type: ignore[call-overload]
        for r in results:
            target = 1.5 if not r["interval"] else 0.5
            label = "burst of 20" if not r["interval"] else f"one every {r['interval']} s"
            print(f"target {label}, median <= {target} s ({r['models']} models, {r['threads']} thread(s), "
                  f"{r['streams']} model stream(s), {r['build_processes']} build process(es), "
                  f"keep_open_seconds {r['keep_open']:g}, early start {r['early_start']:g} s): "
                  f"{'met' if r['median'] <= target else 'MISSED'} ({r['median']:.2f} s)")
        print(f"target no study lost: {'met' if lost == 0 else 'MISSED'} ({lost} lost)")
        return 0 if lost == 0 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
