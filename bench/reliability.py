"""Reliability figures: load held, faults survived, bad inputs tried, fuzzing.

Re-run it to regenerate ``docs/reliability.md``::

    .venv/bin/python bench/reliability.py [--associations 16] [--per-association 50]
                                          [--fuzz-seconds 120] [--write docs/reliability.md]
                                          [--threads 1,default] [--streams 1,2] [--load-only]

The load runs once per ``--threads`` value (``[worker] threads``, ``T/B`` with ``B``
build processes, whose memory is counted with the node's; 1 is the worker
before issue 15, the reference) and prints, beside the load average, the targets of
issue 15: node RSS at rest (models loaded, nothing received) <= 400 MB, peak <= 600 MB,
all results of the 16 x 50 instances delivered <= 30 s after the first was sent.

1. **Load**: a real Orthanc and ``fracture-node serve`` (real models) as separate
   processes; N concurrent DCMTK ``storescu`` associations each send M real
   radiographs (MURA validation images wrapped into CR DICOM, one study per
   association).  While they run, one more association is attempted: it must be
   refused (A-ASSOCIATE-RJ, transient, local limit exceeded), not accepted and
   dropped.  Then every acknowledged instance is accounted for (analysed or refused
   with a reason, results delivered to Orthanc).  Peak RSS of the node (VmHWM).
2. **Faults**: runs the fault tests (SIGKILL in receive / inference / delivery,
   archive down, disk full, aborted association, kill during heavy writes) and
   records each outcome.
3. **Bad inputs**: runs the hostile-input tests and counts the generated cases.
4. **Fuzzing**: ``bench/fuzz_decode.py`` for a bounded time.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
MSK = ROOT.parent / "shared" / "data" / "msk"
PY = ROOT / ".venv" / "bin" / "python"
EXE = ROOT / ".venv" / "bin" / "fracture-node"
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
sys.path.insert(0, str(ROOT / "bench"))
from e2e import MODEL_SETS, model_config, runnable  # noqa: E402


def make_load(directory: Path, associations: int, per: int) -> list[list[Path]]:
    from pydicom.uid import generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    rows = [r for r in csv.DictReader((MSK / "manifest.csv").open())
            if r["dataset"] == "MURA-v1.1" and r["split"] == "val"]
    sets = []
    k = 0
    for a in range(associations):
        study_uid = generate_uid()
        patient = {"PatientName": f"LOAD^{a:02d}", "PatientID": f"LOAD-{a:02d}",
                   "PatientBirthDate": "19700101", "PatientSex": "O"}
        files = []
        for n in range(per):
            row = rows[k % len(rows)]
            k += 1
            ds = demo_data.wrap(MSK / row["path"], row["body_part"], 1, n + 1, study_uid, patient)
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = directory / f"{a:02d}_{n:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        sets.append(files)
    return sets


def _vmhwm_mb(pid: int, field: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _descendants(pid: int) -> list[int]:
    """The node's child processes and theirs (its build processes and the pool's helper)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += [c for c in children if c not in out]
            todo += children
    return out


def _tree_mb(pid: int, field: str = "VmHWM") -> tuple[float, float]:
    """``field`` of the node's process, and summed over it and its descendants (for
    VmHWM the sum of each one's peak: an upper bound of their peak together)."""
    own = _vmhwm_mb(pid, field)
    total = own
    for child in _descendants(pid):
        try:
            total += _vmhwm_mb(child, field)
        except OSError:
            pass
    return own, total


def run_load(associations: int, per: int, threads: int | None = None,
             batch_images: int | None = None, build_processes: int | None = None,
             models: str = "fp32", streams: int | None = None,
             early_start: float | None = None) -> dict[str, object]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from node.config import (
        Config,
        DestinationConfig,
        LimitsConfig,
        NodeConfig,
        PeerConfig,
        StorageConfig,
        StudyConfig,
        WorkerConfig,
        load_config,
        render_config,
    )

    work = Path(tempfile.mkdtemp(prefix="load-"))
    try:
        sets = make_load(work / "data", associations, per)
        total_bytes = sum(p.stat().st_size for s in sets for p in s)
        node_port = orthanc_ctl.free_port()
        orthanc = orthanc_ctl.Orthanc(work / "orthanc", node_port=node_port).start()
        shipped = load_config(ROOT / "config.toml", environ={})
        cfg = work / "node.toml"
        cfg.write_text(render_config(Config(
            node=NodeConfig(port=node_port),
            peers=(PeerConfig("STORESCU", "127.0.0.1"), PeerConfig("PROBE")),
            destinations=(DestinationConfig("pacs", "ORTHANC", "127.0.0.1", orthanc.dicom_port),),
            storage=StorageConfig(spool_dir=work / "spool", database=work / "node.sqlite"),
            study=StudyConfig(quiet_seconds=2),
            limits=LimitsConfig(max_associations=associations),
            worker=WorkerConfig(threads=threads, build_processes=build_processes or 0,
                                model_streams=streams, early_start_seconds=early_start, **(
                {"batch_images": batch_images} if batch_images else {})),
            models=model_config(shipped, models),
        )))
        ready = work / "ready"
        node = subprocess.Popen([str(EXE), "--config", str(cfg), "serve", "--ready-file",
                                 str(ready)], stderr=(work / "node.log").open("wb"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
                ready.exists() and "processing started" in (work / "node.log").read_text(errors="replace")):
            if node.poll() is not None:
                lines = (work / "node.log").read_text(errors="replace").strip().splitlines()
                raise SystemExit(f"fracture-node serve exited ({node.returncode}) before it was ready: "
                                 + (lines[-1] if lines else "(no log)"))
            time.sleep(0.1)
        time.sleep(2.0)  # at rest: models loaded and warmed up, nothing received yet
        rest_own, rest_rss = _tree_mb(node.pid, "VmRSS")
        load_before = __import__("os").getloadavg()
        try:
            started = time.monotonic()
            procs = [subprocess.Popen(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "FRACTURE_NODE",
                                       "-xe", "127.0.0.1", str(node_port), *map(str, files)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                     for files in sets]
            # one association more than the limit, once all of them are established
            # (counted from the node's "accepted" log lines: pynetdicom counts
            # associations still negotiating against the limit too)
            open_now = 0
            wait_until = time.monotonic() + 20
            while time.monotonic() < wait_until:
                log = (work / "node.log").read_text(errors="replace")
                open_now = log.count("association from STORESCU") - log.count("rejected")
                if log.count(" accepted") >= associations:
                    break
                time.sleep(0.01)
            ae = AE(ae_title="PROBE")
            ae.add_requested_context(Verification)
            probe = ae.associate("127.0.0.1", node_port, ae_title="FRACTURE_NODE")
            extra_refused = probe.is_rejected
            reason = None
            if probe.is_rejected:
                rsp = probe.acceptor.primitive
                reason = (rsp.result_str, rsp.source_str, rsp.reason_str)
            elif probe.is_established:
                probe.release()
            failures = sum(1 for p in procs if p.wait() != 0)
            received = time.monotonic() - started
            import sqlite3

            def q(sql: str) -> list[tuple]:  # type: ignore[type-arg]
                con = sqlite3.connect(work / "node.sqlite", timeout=30)
                try:
                    return con.execute(sql).fetchall()
                finally:
                    con.close()

            n_studies = q("SELECT COUNT(DISTINCT study_instance_uid) FROM instances")[0][0]
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                done = q("SELECT COUNT(*) FROM studies WHERE state = 'processed'")[0][0]
                pending = q("SELECT COUNT(*) FROM outbox WHERE state != 'delivered'")[0][0]
                if done >= n_studies and pending == 0:
                    break
                time.sleep(1)
            finished = time.monotonic() - started
            peak_own, peak = _tree_mb(node.pid)
            load_after = __import__("os").getloadavg()
            acknowledged = q("SELECT COUNT(*) FROM instances")[0][0]
            outcomes = dict(q("SELECT outcome, COUNT(*) FROM instances GROUP BY outcome"))
            results = q("SELECT COUNT(*) FROM outbox WHERE state = 'delivered'")[0][0]
            in_orthanc = len(orthanc.get("/instances"))
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(120)
            orthanc.stop()
        sent = sum(len(s) for s in sets)
        return {
            "associations": associations, "per_association": per, "sent": sent,
            "storescu_failures": failures, "acknowledged": acknowledged,
            "outcomes": outcomes, "unaccounted": acknowledged - sum(outcomes.values()),
            "results_delivered": results, "results_in_orthanc": in_orthanc,
            "receive_seconds": round(received, 1),
            "receive_mb_s": round(total_bytes / 2**20 / received, 1),
            "receive_images_s": round(sent / received, 1),
            "all_results_seconds": round(finished, 1),
            "analysed_images_s": round(sent / finished, 2),
            "peak_rss_mb": round(peak), "rest_rss_mb": round(rest_rss),
            "peak_rss_node_process_mb": round(peak_own), "rest_rss_node_process_mb": round(rest_own),
            "build_processes": WorkerConfig(
                threads=threads, build_processes=build_processes or 0).resolved_build_processes,
            "worker_threads": threads or "default",
            "streams": WorkerConfig(model_streams=streams).resolved_model_streams,
            "models": models,
            "early_start": "default" if early_start is None else early_start,
            "batch_images": batch_images or WorkerConfig().batch_images,
            "load_average": [round(load_before[0], 1), round(load_after[0], 1)],
            "extra_association_refused": extra_refused, "refusal": reason,
            "open_when_probed": open_now,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


FAULT_TESTS = {
    "SIGKILL during receive": "tests/test_faults.py::test_sigkill_then_restart_loses_nothing[receive]",
    "SIGKILL during inference": "tests/test_faults.py::test_sigkill_then_restart_loses_nothing[inference]",
    "SIGKILL during delivery": "tests/test_faults.py::test_sigkill_then_restart_loses_nothing[delivery]",
    "SIGKILL mid-study (node core)": "tests/test_node.py::test_sigkill_mid_study_loses_nothing_and_delivers_once",
    "Orthanc stopped during delivery": "tests/test_node.py::test_delivery_waits_for_orthanc_to_come_back",
    "destination refuses (dead letter)": "tests/test_node.py::test_destination_that_rejects_becomes_dead_letter",
    "disk full (tmpfs spool)": "tests/test_node.py::test_disk_full_answers_out_of_resources_then_recovers",
    "association aborted mid-instance": "tests/test_hostile.py::test_association_aborted_mid_instance_keeps_nothing_partial",
    "kill during heavy SQLite writes": "tests/test_node.py::test_kill_during_heavy_writes_keeps_database_intact",
}
BAD_INPUT_TESTS = {
    "byte mutations of a real CR (truncation, flips, lengths, undefined lengths, random)":
        "tests/test_hostile.py::test_mutated_instances_get_a_status_and_neighbours_survive",
    "unknown transfer syntax, non-image SOP class":
        "tests/test_hostile.py::test_unknown_transfer_syntax_and_non_image_class_are_not_accepted",
    "declared 60000 x 60000":
        "tests/test_hostile.py::test_absurd_declared_size_is_kept_for_the_pipeline_to_refuse",
    "missing Study Instance UID": "tests/test_node.py::test_missing_study_uid_gets_failure_status_and_neighbours_survive",
}


#: what a passing test shows, where "nothing lost" is not the whole story
OUTCOME = {
    "destination refuses (dead letter)": "dead letter after max_attempts, never reported as "
                                         "delivered; shown by status",
    "disk full (tmpfs spool)": "0xA700, no partial file, no lost neighbour; accepts again "
                               "once space is freed",
    "Orthanc stopped during delivery": "results wait with back-off, delivered when it returns",
    "kill during heavy SQLite writes": "integrity_check ok, every committed row present",
}


#: inputs each bad-input test sends (the hypothesis test: its max_examples)
CASES = {
    "byte mutations of a real CR (truncation, flips, lengths, undefined lengths, random)": 60,
    "unknown transfer syntax, non-image SOP class": 2,
    "declared 60000 x 60000": 1,
    "missing Study Instance UID": 1,
}


def run_tests(ids: dict[str, str]) -> dict[str, str]:
    out = subprocess.run([str(PY), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                          *ids.values()], cwd=ROOT, capture_output=True, text=True)
    results = {}
    for name, test_id in ids.items():
        if f"PASSED {test_id}" in out.stdout:
            results[name] = OUTCOME.get(name, "survived, nothing lost, nothing delivered twice")
        elif f"FAILED {test_id}" in out.stdout or f"ERROR {test_id}" in out.stdout:
            results[name] = "FAILED (see pytest output)"
        else:
            results[name] = "not run"
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--associations", type=int, default=16)
    parser.add_argument("--per-association", type=int, default=50)
    parser.add_argument("--fuzz-seconds", type=int, default=120)
    parser.add_argument("--write", help="write the markdown report here")
    parser.add_argument("--threads", default="1,default",
                        help="[worker] threads of the load runs, one run each; 1 (one study at a "
                             "time, the worker before issue 15) is the reference; T/B: with B "
                             "build processes ([worker] build_processes); the last is reported")
    parser.add_argument("--batch-images", type=int, help="[worker] batch_images of the load runs "
                        "(default: the node's default)")
    parser.add_argument("--models", default="fp32",
                        help="comma-separated model sets (bench/e2e.py MODEL_SETS: fp32, bf16), "
                             "one load run each per --threads value")
    parser.add_argument("--streams", default="default",
                        help="[worker] model_streams of the load runs, comma-separated, one run "
                             "each per --threads value ('default': the key left out)")
    parser.add_argument("--early-start", default="default",
                        help="[worker] early_start_seconds of the load runs, comma-separated, one "
                             "run each per --threads value (0: off; 'default': the key left out)")
    parser.add_argument("--load-only", action="store_true",
                        help="only the load runs and the issue 15 targets (no faults, bad inputs, fuzzing)")
    args = parser.parse_args(argv)

    runs = []
    model_sets = args.models.split(",")
    for which in model_sets:
        if which not in MODEL_SETS:
            parser.error(f"--models: {which!r} is not one of {', '.join(MODEL_SETS)}")
    for spec, which, k, e in itertools.product(args.threads.split(","), runnable(model_sets),
                                               [None if x == "default" else int(x)
                                                for x in args.streams.split(",")],
                                               [None if x == "default" else float(x)
                                                for x in args.early_start.split(",")]):
        print(f"load, worker threads {spec}, model streams {k or 'default'}, early start "
              f"{'default' if e is None else e}, {which} models ...", flush=True)
        t, _, b = spec.partition("/")
        runs.append(run_load(args.associations, args.per_association,
                             None if t == "default" else int(t), args.batch_images,
                             int(b) if b else None, which, k, e))
        print(json.dumps(runs[-1], indent=1), flush=True)
    print(f"\nMALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', '(unset)')}")
    print("\n| models | worker threads (batch_images) / build processes | model streams | early start s | RSS at rest MB (node process) | peak RSS MB (node process) | all results s | receive s | "
          "analysed / refused / unaccounted | results delivered | load average (start, end) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        o = r["outcomes"]
        print(f"| {r['models']} | {r['worker_threads']} ({r['batch_images']}) / {r['build_processes']} | {r['streams']} | {r['early_start']} | {r['rest_rss_mb']} ({r['rest_rss_node_process_mb']}) | {r['peak_rss_mb']} ({r['peak_rss_node_process_mb']}) | {r['all_results_seconds']} | "
              f"{r['receive_seconds']} | {o.get('analysed', 0)} / {o.get('refused', 0)} / "  # type: ignore[union-attr]
              f"{r['unaccounted']} | {r['results_delivered']} | {r['load_average'][0]}, "  # type: ignore[index]
              f"{r['load_average'][1]} |")  # type: ignore[index]
    for r in runs:
        n = int(r["sent"])  # type: ignore[call-overload]
        print(f"targets ({r['models']} models, {r['worker_threads']} worker threads, "
              f"{r['streams']} model stream(s)): RSS at rest <= 400 MB: "
              f"{'met' if r['rest_rss_mb'] <= 400 else 'MISSED'} ({r['rest_rss_mb']} MB); "  # type: ignore[operator]
              f"peak <= 600 MB: {'met' if r['peak_rss_mb'] <= 600 else 'MISSED'} ({r['peak_rss_mb']} MB); "  # type: ignore[operator]
              f"all {n} results <= 30 s: {'met' if r['all_results_seconds'] <= 30 else 'MISSED'} "  # type: ignore[operator]
              f"({r['all_results_seconds']} s); unaccounted {r['unaccounted']}")
    if args.load_only:
        return 0
    if not runs:
        raise SystemExit("no load run (see above): the report needs one")
    load = runs[-1]
    print("load ...", flush=True)
    print("faults ...", flush=True)
    faults = run_tests(FAULT_TESTS)
    print(json.dumps(faults, indent=1), flush=True)
    print("bad inputs ...", flush=True)
    bad = run_tests(BAD_INPUT_TESTS)
    print("fuzzing ...", flush=True)
    fuzz_json = Path(tempfile.mkstemp(suffix=".json")[1])
    subprocess.run([str(PY), str(ROOT / "bench" / "fuzz_decode.py"), "--seconds",
                    str(args.fuzz_seconds), "--report", str(fuzz_json)], cwd=tempfile.gettempdir(),
                   capture_output=True, text=True)
    fuzz = json.loads(fuzz_json.read_text() or "{}")

    lines = [
        "# Reliability figures", "",
        f"Produced by `bench/reliability.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f" (2-core CPU, loopback, real Orthanc, DCMTK storescu, real models).", "",
        "## Load", "",
        "| associations x instances | acknowledged | analysed / refused / unaccounted | results "
        "delivered (in Orthanc) | receive | all results | peak RSS | extra association |",
        "|---|---|---|---|---|---|---|---|",
        f"| {load['associations']} x {load['per_association']} | {load['acknowledged']} of "
        f"{load['sent']} (storescu failures: {load['storescu_failures']}) | "
        f"{load['outcomes'].get('analysed', 0)} / {load['outcomes'].get('refused', 0)} / "  # type: ignore[union-attr]
        f"{load['unaccounted']} | {load['results_delivered']} ({load['results_in_orthanc']}) | "
        f"{load['receive_seconds']} s, {load['receive_images_s']} img/s, "
        f"{load['receive_mb_s']} MB/s | {load['all_results_seconds']} s, "
        f"{load['analysed_images_s']} img/s | {load['peak_rss_mb']} MB | "
        f"{'refused: ' + ', '.join(load['refusal']) if load['extra_association_refused'] else 'ACCEPTED'} |",  # type: ignore[arg-type]
        "", "## Faults (each an automated test against the real Orthanc)", "",
        "| fault | outcome |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in faults.items()],
        "", "## Bad inputs", "",
        "| kind | cases | outcome |", "|---|---|---|",
        *[f"| {k} | {CASES.get(k, '?')} | {'every case answered with a DICOM status, a rejected context or a refusal; the next instance kept' if v.startswith('survived') else v} |"
          for k, v in bad.items()],
        "", "## Fuzzing (atheris, `bench/fuzz_decode.py`: dcmread + prepare)", "",
        "| seconds | executions | parsed by pydicom | normalised | refused | findings | corpus |",
        "|---|---|---|---|---|---|---|",
        f"| {fuzz.get('seconds')} | {fuzz.get('executions')} | {fuzz.get('parsed')} | "
        f"{fuzz.get('normalised')} | {fuzz.get('refused')} | {fuzz.get('findings', 'crash')} | "
        f"{fuzz.get('corpus_files')} |", "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        Path(args.write).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
