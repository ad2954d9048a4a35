"""The worker with several threads (``[worker] threads``): the same results as one
thread, a broken image costs only itself while other studies go on, the key is
checked like the others, and SIGTERM drains what the worker holds.

Real SCP on loopback, real DCMTK storescu / pynetdicom SCUs, real shipped models
(ONNX graphs) and the real SQLite job store; no mocks.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

from conftest import ROOT, free_port, restudy, storescu, wait_for, write_config
from node.config import WorkerConfig, available_cores, config_from_dict, load_config
from node.errors import ConfigError
from node.jobs import InstanceRecord, StudyJob, open_job_store
from node.processing import StudyProcessor, processor_factory
from node.service import Node
from node.worker import _BUILD, _PREPARE, _STOP, PipelinedWorker, Worker, _StudyTasks

DEMO = {d.name: sorted(d.glob("*.dcm")) for d in sorted((ROOT / "demo" / "studies").iterdir())}
EXE = ROOT / ".venv" / "bin" / "fracture-node"


# -- the config key -----------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "start", "fix"), [
    *[("threads", v, "worker.threads must be an integer from 1 to 64",
       "leave the key out to use the cores") for v in ("two", 0, -1, 65, 2.5, True)],
    *[("build_processes", v, "worker.build_processes must be an integer from 0 to 16",
       "the default 0 builds the result objects in the worker's threads")
      for v in ("one", -1, 17, 1.5, True)],
    *[("model_streams", v, "worker.model_streams must be an integer from 1 to 16",
       "leave the key out for 2") for v in ("two", 0, 17, 2.0, True)],
])
def test_bad_worker_threads_or_build_processes_is_one_line_naming_the_key_and_the_fix(
        key: str, value: object, start: str, fix: str) -> None:
    raw = {"peers": [{"ae_title": "ORTHANC"}], "keep_results_local": True,
           "worker": {key: value}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, Path("/tmp"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(start)
    assert fix in message


def test_bad_max_images_in_flight_batch_images_and_unknown_worker_key_are_refused() -> None:
    base = {"peers": [{"ae_title": "ORTHANC"}], "keep_results_local": True}
    with pytest.raises(ConfigError, match=r"^worker.max_images_in_flight must be an integer"):
        config_from_dict({**base, "worker": {"max_images_in_flight": 0}}, Path("/tmp"))
    with pytest.raises(ConfigError, match=r"^worker.batch_images must be an integer from 1 to 64"):
        config_from_dict({**base, "worker": {"batch_images": "4"}}, Path("/tmp"))
    with pytest.raises(ConfigError, match=r"worker: unknown key\(s\) thread "):
        config_from_dict({**base, "worker": {"thread": 2}}, Path("/tmp"))


def test_check_config_cli_names_worker_threads(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port(), extra="\n[worker]\nthreads = 0\n")
    out = subprocess.run([str(EXE), "--config", str(cfg), "check-config"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "worker.threads" in lines[0], out.stderr


def test_default_threads_are_the_cores_and_models_get_what_is_left() -> None:
    cores = available_cores()
    default = WorkerConfig()
    assert default.resolved_threads == cores
    assert WorkerConfig(threads=1).model_threads == cores  # one thread: the models get all
    for threads in (2, 3, 8):
        config = WorkerConfig(threads=threads)
        # study threads x 1 + the model thread's intra-op threads <= cores (at least 1)
        assert config.model_threads == max(1, cores - (threads - 1))
    assert default.resolved_model_streams == min(2, cores)
    assert WorkerConfig(model_streams=1).resolved_model_streams == 1
    shipped = load_config(ROOT / "config.toml", environ={})
    assert shipped.worker.threads is None, "the shipped config leaves the default to the machine"
    assert shipped.worker.model_streams is None


# -- real studies through the real models --------------------------------------------


def _restudy(files: list[Path], directory: Path, tag: str) -> list[Path]:
    """Copies of ``files`` in a new study (UIDs derived from ``tag``: the same in every run)."""
    return restudy(files, directory, generate_uid(entropy_srcs=["test-worker", tag]),
                   prefix=f"{tag}_")


def _undecodable(source: Path, path: Path, tag: str) -> tuple[str, str]:
    """A JPEG CR whose compressed frame is noise: every attribute is right
    and the SCP accepts it, but its pixels cannot be decoded.  Returns (study, SOP UID)."""
    ds = pydicom.dcmread(source)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    rng = np.random.default_rng(15)
    noise = b"\xff\xd8" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes() + b"\xff\xd9"
    ds.PixelData = encapsulate([noise])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["test-worker", tag])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["test-worker", tag, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path)
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


def _studies(directory: Path) -> list[Path]:
    """Nine studies, 1-5 instances each, of the demo's real radiographs (CR/DX,
    JPEG, JPEG 2000, a photograph the validator refuses)."""
    files = [f for group in DEMO.values() for f in group]
    for n in range(5):
        files += _restudy(DEMO["forearm"] if n % 2 else DEMO["normal-forearm"], directory, f"s{n}")
    return files


def _run_node(tmp: Path, files: list[Path], threads: int, build_processes: int = 0,
              batch_images: int = 1, model_streams: int = 1) -> dict[str, object]:
    """Start a node with ``threads`` worker threads (``build_processes``, ``batch_images``,
    ``model_streams``),
    send ``files`` at once, wait until every study is processed, and return what it
    recorded."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # results are queued for an archive that is not listening (they wait in the outbox)
    cfg = write_config(tmp, port, quiet_seconds=0.5,
                       extra=f"\n[worker]\nthreads = {threads}\n"
                             f"build_processes = {build_processes}\nbatch_images = {batch_images}\n"
                             f"model_streams = {model_streams}\n",
                       destinations=[{"name": "pacs", "ae_title": "PACS", "port": free_port()}])
    config = load_config(cfg, environ={})
    node = Node(config, processor_factory(config))
    node.start()
    try:
        wait_for(node.processing.is_set, timeout=120)
        expected = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
                    for f in files}
        out = storescu(port, files, "FRACTURE_NODE")
        assert out.returncode == 0, out.stderr

        def all_processed() -> bool:
            rows = node.jobs.query("SELECT study_instance_uid, state FROM studies")
            return {r["study_instance_uid"] for r in rows if r["state"] == "processed"} == expected

        wait_for(all_processed, timeout=300, interval=0.2)
        if threads > 1:
            assert type(node.worker) is PipelinedWorker
        else:
            assert type(node.worker) is Worker
        return {
            "decisions": {r["study_instance_uid"]: r["decision"] for r in node.jobs.query(
                "SELECT study_instance_uid, decision FROM studies")},
            "outcomes": {r["sop_instance_uid"]: (r["outcome"], r["reason"]) for r in node.jobs.query(
                "SELECT sop_instance_uid, outcome, reason FROM instances")},
            "outputs": sorted((r["study_instance_uid"], r["kind"], r["sop_instance_uid"])
                              for r in node.jobs.query(
                                  "SELECT study_instance_uid, kind, sop_instance_uid FROM outbox")),
            "early_used": sum(float(m) for m in re.findall(
                r'fracture_node_early_starts_total\{outcome="used"\} (\S+)',
                node.metrics.render().decode())),
        }
    finally:
        node.stop(grace_seconds=2)


def test_results_are_identical_with_one_and_with_three_worker_threads(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Same studies, same bytes, one worker thread and three (with a build process for
    the result objects, model runs of 8 images, two inference streams per graph and early
    starts, some of them built in the build process): the same result objects (SOP
    Instance UIDs), the same study decisions, the same per-image outcomes and reasons
    (which quote the probabilities); and with three threads the models did take the
    images of several studies in one run (the build process's log lines, relayed, say
    so: the model thread gathers studies while their images fit in one run)."""
    files = _studies(tmp_path / "studies")
    one = _run_node(tmp_path / "one", files, threads=1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="node.processing"):
        three = _run_node(tmp_path / "three", files, threads=3, build_processes=1, batch_images=8,
                          model_streams=2)
    assert any("2 stream(s) of" in r.getMessage() for r in caplog.records)
    assert one["early_used"] == 0 and three["early_used"] >= 1, "no early start used"
    assert len(one["decisions"]) == 9  # type: ignore[arg-type]
    assert one["outputs"] == three["outputs"]
    assert len(one["outputs"]) >= 9 * 2  # type: ignore[arg-type]
    assert one["decisions"] == three["decisions"]
    assert one["outcomes"] == three["outcomes"]
    assert {o for o, _ in one["outcomes"].values()} == {"analysed", "refused"}  # type: ignore[union-attr]
    # each study's log line names the batch it went through: some batch held the
    # images of more than one study (no study here sends more than 4 images to the models)
    shared = [r.getMessage() for r in caplog.records
              if (m := re.search(r"with (\d+) image\(s\) of the studies waiting", r.getMessage()))
              and int(m.group(1)) > 4]
    assert shared, "no batch held more than one study's images"


def test_batching_studies_together_changes_no_result(tmp_path: Path) -> None:
    """:meth:`StudyProcessor.analyse_many` on three prepared studies at once gives each
    study exactly the outcomes it gets alone (the router pools by study)."""
    from node.jobs import InstanceRecord, StudyJob

    process = processor_factory(load_config(write_config(tmp_path, free_port()), environ={}))()
    assert isinstance(process, StudyProcessor)
    jobs = []
    for tag, files in (("a", DEMO["forearm"]), ("b", DEMO["normal-forearm"]),
                       ("c", DEMO["forearm"][:2])):
        jobs.append(_job_of(_restudy(files, tmp_path / tag, tag)))
    prepared = [process.prepare(job) for job in jobs]
    together = process.analyse_many(prepared)
    assert [a.batch_images for a in together] == [sum(len(p.to_analyse) for p in prepared)] * 3
    for p, batched in zip(prepared, together):
        alone = process.analyse_many([p])[0]
        assert len(alone.outcomes) == len(batched.outcomes) == len(p.job.instances)
        for x, y in zip(alone.outcomes, batched.outcomes):
            assert type(x) is type(y) and x.meta == y.meta
            assert getattr(x, "decision", None) == getattr(y, "decision", None)
            assert getattr(x, "code", None) == getattr(y, "code", None)
            if hasattr(x, "fracture_probability"):
                assert abs(x.fracture_probability - y.fracture_probability) < 1e-5
                assert x.body_part == y.body_part
                assert np.abs(x.heatmap - y.heatmap).max() < 1e-3


def test_an_undecodable_image_costs_only_itself_while_other_studies_go_on(tmp_path: Path) -> None:
    """Three worker threads; a study whose JPEG image cannot be decoded (beside a good
    image in the same study) arrives among good studies: every study is processed, the
    bad image is refused as decode-failed, its neighbour and the other studies are
    analysed."""
    studies = tmp_path / "studies"
    good = _restudy(DEMO["normal-forearm"], studies, "g1") + _restudy(DEMO["forearm"], studies, "g2")
    bad_study, bad_sop = _undecodable(DEMO["hip"][0], studies / "bad.dcm", "bad")
    # a readable image in the same study as the broken one
    neighbour = pydicom.dcmread(DEMO["normal-forearm"][0])
    neighbour.StudyInstanceUID = bad_study
    neighbour.SOPInstanceUID = generate_uid(entropy_srcs=[bad_study, "neighbour"])
    neighbour.file_meta.MediaStorageSOPInstanceUID = neighbour.SOPInstanceUID
    neighbour.save_as(studies / "neighbour.dcm")
    files = [studies / "bad.dcm", studies / "neighbour.dcm", *good]
    port = free_port()
    cfg = write_config(tmp_path, port, quiet_seconds=0.5, extra="\n[worker]\nthreads = 3\n",
                       destinations=[{"name": "pacs", "ae_title": "PACS", "port": free_port()}])
    config = load_config(cfg, environ={})
    node = Node(config, processor_factory(config))
    node.start()
    try:
        out = storescu(port, files, "FRACTURE_NODE")
        assert out.returncode == 0, out.stderr
        expected = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
        assert len(expected) == 3
        wait_for(lambda: {r["study_instance_uid"] for r in node.jobs.query(
            "SELECT study_instance_uid FROM studies WHERE state = 'processed'")} == expected,
            timeout=300, interval=0.2)
        rows = {r["sop_instance_uid"]: (r["study_instance_uid"], r["outcome"], r["reason"])
                for r in node.jobs.query("SELECT * FROM instances")}
        assert rows[bad_sop][1] == "refused" and rows[bad_sop][2].startswith("decode-failed"), \
            rows[bad_sop]
        assert rows[str(neighbour.SOPInstanceUID)][1] == "analysed"
        others = [v for k, v in rows.items() if v[0] != bad_study]
        assert len(others) == len(good)
        assert not [r for _, _, r in others if r.startswith("decode-failed")]
        for study in expected - {bad_study}:  # every good study has analysed images
            assert any(s == study and o == "analysed" for s, o, _ in others)
        kinds = {(r["study_instance_uid"], r["kind"]) for r in node.jobs.query(
            "SELECT study_instance_uid, kind FROM outbox")}
        for study in expected:
            assert {(study, "sc"), (study, "sr"), (study, "pdf")} <= kinds
    finally:
        node.stop(grace_seconds=2)


# -- shutdown -----------------------------------------------------------------------


def _send_cr(port: int, studies: list[str]) -> None:
    """One association sending one CR instance of each study; every store succeeds."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ["1.2.840.10008.1.2.4.70"])
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACTURE_NODE")
    assert assoc.is_established
    try:
        assert [int(assoc.send_c_store(_cr(s)).Status) for s in studies] == [0] * len(studies)
    finally:
        assoc.release()


def _cr(study_uid: str) -> Dataset:
    ds = pydicom.dcmread(ROOT.parent / "shared" / "data" / "dicom" / "pylibjpeg-data" / "RG2_JPLL.dcm")
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = generate_uid()
    return ds


def test_sigterm_drains_the_studies_in_hand(tmp_path: Path) -> None:
    """A node with four worker threads (three study threads) holds six studies, each
    taking 1.5 s; SIGTERM while they are in hand: the process finishes all six before
    it exits (none left ``processing``, every result in the outbox and the spool), and a
    restart finds nothing to redo."""
    port = free_port()
    cfg = write_config(tmp_path, port, quiet_seconds=0.3, extra="\n[worker]\nthreads = 4\n",
                       destinations=[{"name": "pacs", "ae_title": "PACS", "port": free_port()}])
    ready = tmp_path / "ready"
    log = tmp_path / "node.log"

    def start() -> subprocess.Popen[bytes]:
        ready.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "nodeharness.py"), str(cfg),
                                 str(ready), "--report", "--delay", "1.5"], cwd=ROOT / "tests",
                                stderr=log.open("ab"))
        wait_for(ready.exists, timeout=180)  # the machine is shared: allow a slow start
        return proc

    def q(sql: str) -> list[tuple]:  # type: ignore[type-arg]
        con = sqlite3.connect(tmp_path / "node.sqlite", timeout=30)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()

    studies = [f"1.2.826.0.1.3680043.10.15.{n}" for n in range(6)]
    proc = start()
    try:
        _send_cr(port, studies)
        wait_for(lambda: q("SELECT COUNT(*) FROM studies WHERE state = 'processing'")[0][0] >= 3,
                 timeout=60, interval=0.02)
        in_hand = q("SELECT COUNT(*) FROM studies WHERE state = 'processing'")[0][0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert in_hand >= 3
    text = log.read_text(errors="replace")
    assert re.search(r"finishing \d+ study\(ies\) in hand", text), text[-2000:]
    states = dict(q("SELECT study_instance_uid, state FROM studies"))
    assert set(states) == set(studies)
    assert "processing" not in states.values()
    processed = [s for s, state in states.items() if state == "processed"]
    # what a stage had started is finished; claimed studies no stage had started are
    # given back (pending) for the next start
    assert len(processed) >= 1
    assert all(state in ("processed", "pending") for state in states.values())
    outbox = q("SELECT study_instance_uid, kind, path FROM outbox")
    for study in processed:
        kinds = sorted(k for s, k, _ in outbox if s == study)
        assert kinds == ["sc", "sr"], (study, kinds)
    assert all(Path(p).exists() or not Path(p).is_absolute() for _, _, p in outbox)
    # a restart takes up whatever was not claimed, and redoes nothing
    proc = start()
    try:
        wait_for(lambda: q("SELECT COUNT(*) FROM studies WHERE state = 'processed'")[0][0] == 6,
                 timeout=120, interval=0.1)
        time.sleep(0.5)
        assert len(q("SELECT * FROM outbox")) == 12
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)


class _FailingBuild:
    """The node-core CopyProcessor in stages, whose build raises for one study."""

    def __init__(self, bad_study: str) -> None:
        from nodeharness import CopyProcessor

        self.copy = CopyProcessor()
        self.bad_study = bad_study

    def prepare(self, job):  # type: ignore[no-untyped-def]
        return job

    def analyse_many(self, studies):  # type: ignore[no-untyped-def]
        return list(studies)

    def build(self, job, sink=None):  # type: ignore[no-untyped-def]
        if job.study_instance_uid == self.bad_study:
            raise RuntimeError("result objects could not be built")
        return self.copy(job)


def test_a_study_that_fails_in_a_stage_is_retried_and_the_others_finish(tmp_path: Path) -> None:
    """Three worker threads; one study's build raises: it goes back to pending with the
    reason (retried later), the studies beside it are processed, no thread dies."""
    port = free_port()
    cfg = write_config(tmp_path, port, quiet_seconds=0.3, extra="\n[worker]\nthreads = 3\n",
                       destinations=[{"name": "pacs", "ae_title": "PACS", "port": free_port()}])
    config = load_config(cfg, environ={})
    studies = [f"1.2.826.0.1.3680043.10.16.{n}" for n in range(4)]
    node = Node(config, lambda: _FailingBuild(studies[1]))
    node.start()
    try:
        _send_cr(port, studies)

        def settled() -> dict[str, tuple[str, str | None, int]]:
            rows = node.jobs.query("SELECT study_instance_uid, state, reason, attempts FROM studies")
            states = {r["study_instance_uid"]: (r["state"], r["reason"], r["attempts"]) for r in rows}
            done = [s for s in studies if states.get(s, ("",))[0] == "processed"]
            return states if len(done) == 3 and states.get(studies[1], ("", None, 0))[2] >= 1 else {}

        states = wait_for(settled, timeout=60, interval=0.1)
        assert states[studies[1]][0] == "pending"
        assert "result objects could not be built" in (states[studies[1]][1] or "")
        assert isinstance(node.worker, PipelinedWorker)
        assert all(t.is_alive() for t in node.worker._threads)
        # a later study is still processed by the same threads
        _send_cr(port, ["1.2.826.0.1.3680043.10.16.9"])
        wait_for(lambda: node.jobs.query(
            "SELECT state FROM studies WHERE study_instance_uid = '1.2.826.0.1.3680043.10.16.9'")
            == [{"state": "processed"}], timeout=30)
    finally:
        node.stop(grace_seconds=2)


class _HeldReport:
    """The node-core ReportProcessor in stages: its build hands the copies (the SCs)
    to the worker's sink, then holds until ``release`` is set (the SR and the PDF being
    built) before it returns the SR."""

    def __init__(self) -> None:
        from nodeharness import ReportProcessor

        self.report = ReportProcessor()
        self.release = threading.Event()
        self.before = lambda: None
        """Called as each build starts (a test waits there for the worker's state)."""

    def prepare(self, job):  # type: ignore[no-untyped-def]
        return job

    def analyse_many(self, studies):  # type: ignore[no-untyped-def]
        return list(studies)

    def build(self, job, sink=None):  # type: ignore[no-untyped-def]
        from node.worker import ProcessedStudy

        self.before()
        made = self.report(job)
        assert sink is not None, "the pipelined worker hands its build a sink"
        for kind, ds in made.outputs:
            if kind == "sc":
                sink(kind, ds)
        assert self.release.wait(60)
        return ProcessedStudy(outputs=[o for o in made.outputs if o[0] != "sc"],
                              outcomes=made.outcomes, decision=made.decision)


def test_the_scs_reach_the_pacs_while_the_report_is_still_being_built(
        tmp_path: Path, job_database: str) -> None:
    """Two worker threads: each SC is queued for delivery as soon as it is written, so a
    real DCMTK storescp has it while the build of the study's SR still runs (the study
    still ``processing``); the SR follows when the build ends, and each object is
    queued and delivered once."""
    from conftest import StoreSCP

    pacs = StoreSCP(tmp_path / "pacs")
    port = free_port()
    cfg = write_config(tmp_path, port, quiet_seconds=0.3,
                       extra="\n[worker]\nthreads = 2\n" + job_database,
                       destinations=[{"name": "pacs", "ae_title": "PACS", "port": pacs.port}])
    config = load_config(cfg, environ={})
    processor = _HeldReport()
    node = Node(config, lambda: processor)
    node.start()
    study = "1.2.826.0.1.3680043.10.18.1"
    try:
        _send_cr(port, [study])
        sent = node.jobs.query("SELECT sop_instance_uid FROM instances")[0]["sop_instance_uid"]
        copy_uid = generate_uid(entropy_srcs=[sent, "copy"])
        received = wait_for(lambda: pacs.received(), timeout=60, interval=0.05)
        assert [(uid, modality) for _, uid, modality in received] == [(copy_uid, "CR")]
        state = node.jobs.query("SELECT state FROM studies")[0]["state"]
        assert state == "processing", "the SC arrived only after the study was finished"
        processor.release.set()
        received = wait_for(lambda: len(pacs.received()) == 2 and pacs.received(), timeout=60)
        assert sorted(m for _, _, m in received) == ["CR", "SR"]
        wait_for(lambda: node.jobs.query("SELECT state FROM studies")[0]["state"] == "processed",
                 timeout=30)
        rows = node.jobs.query("SELECT kind, state FROM outbox ORDER BY kind")
        assert [(r["kind"], r["state"]) for r in rows] == [("sc", "delivered"),
                                                           ("sr", "delivered")]
    finally:
        processor.release.set()
        node.stop(grace_seconds=2)
        pacs.stop()


def test_with_other_studies_in_hand_the_results_are_queued_when_the_study_is_finished(
        tmp_path: Path) -> None:
    """Two studies in hand at once (one association): the SCs of the one being built are
    not queued while its build runs (the deliverer has the other's results to send
    meanwhile); every object is queued, and delivered, once its study is finished."""
    from conftest import StoreSCP

    pacs = StoreSCP(tmp_path / "pacs")
    port = free_port()
    cfg = write_config(tmp_path, port, quiet_seconds=0.3,
                       extra="\n[worker]\nthreads = 2\nearly_start_seconds = 0\n",
                       destinations=[{"name": "pacs", "ae_title": "PACS", "port": pacs.port}])
    config = load_config(cfg, environ={})
    processor = _HeldReport()
    node = Node(config, lambda: processor)
    handed = threading.Event()
    processor.before = lambda: handed.is_set() or (  # the first build only
        wait_for(lambda: node.worker.in_flight == 2, timeout=60, interval=0.01), handed.set())
    node.start()
    try:
        _send_cr(port, ["1.2.826.0.1.3680043.10.18.2", "1.2.826.0.1.3680043.10.18.3"])
        assert isinstance(node.worker, PipelinedWorker)
        assert handed.wait(60)
        time.sleep(1.0)  # the first build has handed its SC to the sink by now
        assert node.jobs.query("SELECT COUNT(*) AS n FROM outbox")[0]["n"] == 0
        processor.release.set()
        wait_for(lambda: node.jobs.query(
            "SELECT COUNT(*) AS n FROM studies WHERE state = 'processed'")[0]["n"] == 2, timeout=60)
        kinds = sorted(r["kind"] for r in node.jobs.query("SELECT kind FROM outbox"))
        assert kinds == ["sc", "sc", "sr", "sr"]
        assert sorted(m for _, _, m in wait_for(
            lambda: len(pacs.received()) == 4 and pacs.received(), timeout=60)) == [
            "CR", "CR", "SR", "SR"]
    finally:
        processor.release.set()
        node.stop(grace_seconds=2)
        pacs.stop()


class _SlowPrepare(_FailingBuild):
    """The node-core CopyProcessor in stages, whose decode-and-normalise stage takes
    ``seconds`` per study."""

    def __init__(self, seconds: float) -> None:
        super().__init__(bad_study="")
        self.seconds = seconds

    def prepare(self, job):  # type: ignore[no-untyped-def]
        time.sleep(self.seconds)
        return job


def test_stopping_gives_back_claimed_studies_no_stage_has_started(
        tmp_path: Path, job_database: str, caplog: pytest.LogCaptureFixture) -> None:
    """One study thread, preparing a study takes 1 s, six one-image studies claimed at
    once (the default in-flight bound): a stop finishes the study being prepared and
    gives the others back, pending with no attempt counted, for another
    node or the next start; nothing is left processing."""
    port = free_port()
    cfg = write_config(tmp_path, port, quiet_seconds=0.3,  # claims only: no early starts
                       extra="\n[worker]\nthreads = 2\nearly_start_seconds = 0\n" + job_database,
                       destinations=[{"name": "pacs", "ae_title": "PACS", "port": free_port()}])
    config = load_config(cfg, environ={})
    studies = [f"1.2.826.0.1.3680043.10.17.{n}" for n in range(6)]
    node = Node(config, lambda: _SlowPrepare(1.0))
    node.start()
    stopped = False
    try:
        wait_for(node.processing.is_set, timeout=60)
        _send_cr(port, studies)
        assert isinstance(node.worker, PipelinedWorker)
        wait_for(lambda: node.worker.in_flight == 6, timeout=30, interval=0.02)
        with caplog.at_level(logging.INFO, logger="node.worker"):
            node.stop(grace_seconds=2)
        stopped = True
        jobs = open_job_store(config)
        try:
            rows = jobs.query("SELECT study_instance_uid, state, attempts FROM studies")
        finally:
            jobs.close()
    finally:
        if not stopped:
            node.stop(grace_seconds=2)
    states = [r["state"] for r in rows]
    assert sorted({r["study_instance_uid"] for r in rows}) == sorted(studies)
    assert "processing" not in states
    assert 1 <= states.count("processed") <= 2, states
    assert states.count("pending") >= 4, states
    assert all(r["attempts"] == 0 for r in rows)
    released = [r for r in caplog.records if "claimed study(ies) not yet started" in r.getMessage()]
    assert released and str(states.count("pending")) in released[0].getMessage()


class _ReadyAt:
    """A job store that only answers when its next pending study is ready."""

    def __init__(self, ready: float | None) -> None:
        self.ready = ready

    def next_ready_time(self, quiet_seconds: float) -> float | None:
        return self.ready


def test_an_idle_worker_wakes_when_the_next_study_is_ready(tmp_path: Path) -> None:
    """The claim loop sleeps until the next pending study's quiet period ends (bounded
    by the poll), not a whole poll: a study due in 50 ms is claimed ~50 ms later; with
    none pending, or one ready but still being received, it waits the poll."""
    config = load_config(write_config(tmp_path, free_port()), environ={})
    worker = Worker(config, None, _ReadyAt(None), lambda job: None)  # type: ignore[arg-type]
    assert worker._idle_wait(0.2) == 0.2
    worker.jobs = _ReadyAt(time.time() + 0.05)  # type: ignore[assignment]
    assert 0.03 < worker._idle_wait(0.2) <= 0.053
    worker.jobs = _ReadyAt(time.time() + 5.0)  # type: ignore[assignment]
    assert worker._idle_wait(0.2) == 0.2
    worker.jobs = _ReadyAt(time.time() - 1.0)  # type: ignore[assignment]
    assert worker._idle_wait(0.2) == 0.2


def test_queued_results_wake_the_deliverer(tmp_path: Path) -> None:
    """A processed study's results are handed to the deliverer at once (it is woken),
    not at its next poll."""
    port = free_port()
    cfg = write_config(tmp_path, port, quiet_seconds=0.3, extra="\n[worker]\nthreads = 2\n",
                       destinations=[{"name": "pacs", "ae_title": "PACS", "port": free_port()}])
    node = Node(load_config(cfg, environ={}), lambda: _FailingBuild(bad_study=""))
    woken: list[float] = []
    wake = node.deliverer.wake
    node.deliverer.wake = lambda: (woken.append(time.time()), wake())  # type: ignore[method-assign]
    node.start()
    try:
        wait_for(node.processing.is_set, timeout=60)
        _send_cr(port, ["1.2.826.0.1.3680043.10.18.1"])
        wait_for(lambda: node.jobs.query("SELECT state FROM studies") == [{"state": "processed"}],
                 timeout=30, interval=0.05)
        wait_for(lambda: len(woken) >= 1, timeout=5, interval=0.01)
    finally:
        node.stop(grace_seconds=2)


# -- result objects built in build processes ([worker] build_processes) ------------------


def test_build_processes_are_off_by_default_and_need_two_threads() -> None:
    assert WorkerConfig().resolved_build_processes == 0
    assert WorkerConfig(threads=1, build_processes=3).resolved_build_processes == 0
    assert WorkerConfig(threads=2, build_processes=0).resolved_build_processes == 0
    assert WorkerConfig(threads=2, build_processes=2).resolved_build_processes == 2


def _job_of(files: list[Path]) -> StudyJob:
    """The job of a study whose instances are ``files`` (as the SCP would record them)."""
    records = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        records.append(InstanceRecord(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                                      str(ds.SeriesInstanceUID), str(ds.SOPClassUID),
                                      str(ds.file_meta.TransferSyntaxUID), str(f),
                                      f.stat().st_size, "TESTSCU", "127.0.0.1"))
    return StudyJob(records[0].study_instance_uid, 1, tuple(records), None)


def _demo_job(directory: Path, name: str, tag: str) -> StudyJob:
    return _job_of(_restudy(DEMO[name], directory, tag))


def _comparable(ds: Dataset) -> Dataset:
    """``ds`` without what is set from the clock (``bench/build_cost.py``'s comparison)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_cost", ROOT / "bench" / "build_cost.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._comparable(ds)


def test_a_prepared_study_holds_its_sources_without_their_pixels(tmp_path: Path) -> None:
    """Once decoded, a source's Pixel Data is let go: a study in hand (and what is
    pickled to a build process) holds its normalised images and the attributes the
    result objects read, not also the 6 MB of an uncompressed CR's pixels; the study's
    images are still known as images, and the SC, SR and PDF reference them as before."""
    import pickle

    from conftest import DICOM_DATA

    process = processor_factory(load_config(write_config(tmp_path, free_port()), environ={}))()
    source = DICOM_DATA / "pydicom-data" / "RG3_UNCR.dcm"  # the demo's tibia, uncompressed
    files = restudy([source, *DEMO["forearm"][:1]], tmp_path / "study",
                    generate_uid(entropy_srcs=["test-worker", "nopixels"]), prefix="np_")
    job = _job_of(files)
    records = job.instances
    prepared = process.prepare(job)
    assert prepared.images == {r.sop_instance_uid for r in records}
    assert not any("PixelData" in ds for ds in prepared.sources.values())
    normalised = sum(img.pixels.nbytes for _, img in prepared.to_analyse)
    assert len(pickle.dumps(prepared)) < normalised + 2**20, "the source pixels are still held"
    result = process.build(process.analyse_many([prepared])[0])
    kinds = sorted(k for k, _ in result.outputs)
    assert kinds.count("sc") == 2 and "sr" in kinds and "pdf" in kinds
    sr = next(ds for k, ds in result.outputs if k == "sr")
    evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert {r.sop_instance_uid for r in records} <= evidence


def test_with_a_sink_each_object_is_handed_over_as_soon_as_it_is_built(tmp_path: Path) -> None:
    """The demo's forearm study built with a sink (as the worker builds): the four SCs,
    then the SR, the PDF and the KO are handed over one by one, each before the next is
    built, none is returned, and they are the objects built without a sink (clock times
    aside)."""
    import node.processing as processing
    from node.worker import encode

    process = processor_factory(load_config(write_config(tmp_path, free_port()), environ={}))()
    job = _demo_job(tmp_path / "study", "forearm", "sink")
    analysed = process.analyse_many([process.prepare(job)])[0]
    plain = process.build(analysed)
    events: list[str] = []
    handed: list[tuple[str, bytes]] = []
    saved = {name: getattr(processing, name) for name in (
        "build_secondary_capture", "build_structured_report", "build_pdf_report",
        "build_key_object_selection")}

    def noting(name: str):  # type: ignore[no-untyped-def]
        def built(*args, **kwargs):  # type: ignore[no-untyped-def]
            events.append(f"built {name}")
            return saved[name](*args, **kwargs)
        return built

    def sink(kind: str, ds: Dataset) -> None:
        events.append(f"handed {kind}")
        handed.append((kind, encode(ds)))

    try:
        for name in saved:
            setattr(processing, name, noting(name))
        sunk = process.build(analysed, sink)
    finally:
        for name, fn in saved.items():
            setattr(processing, name, fn)
    assert list(sunk.outputs) == []
    assert [k for k, _ in handed] == ["sc", "sc", "sc", "sc", "sr", "pdf", "ko"]
    assert events == [e for kind, name in (
        *[("sc", "build_secondary_capture")] * 4, ("sr", "build_structured_report"),
        ("pdf", "build_pdf_report"), ("ko", "build_key_object_selection"))
        for e in (f"built {name}", f"handed {kind}")]
    assert [k for k, _ in plain.outputs] == [k for k, _ in handed]
    for (_, ds), (_, data) in zip(plain.outputs, handed):
        assert _comparable(pydicom.dcmread(BytesIO(data))) == _comparable(ds)


def test_a_build_process_writes_the_objects_the_worker_thread_builds(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The demo's forearm study (four analysed views, one refused) built by a build
    process: the same SCs, SR, PDF and KO, attribute by attribute (clock times aside),
    as the worker's thread builds from the same analysis, written into the spool under
    their deterministic paths, nothing left in its tmp; the build's log line is logged
    by the node with its study UID; built again, nothing is rewritten."""
    from node.builder import BuildProcesses, BuiltElsewhere
    from node.spool import Spool

    process = processor_factory(load_config(write_config(tmp_path, free_port()), environ={}))()
    job = _demo_job(tmp_path / "study", "forearm", "bp")
    analysed = process.analyse_many([process.prepare(job)])[0]
    here = process.build(analysed)
    spool = Spool(tmp_path / "spool")
    with caplog.at_level(logging.INFO, logger="node.processing"):  # the node's level
        pool = BuildProcesses(process.settings, spool, 1)           # when the pool starts
        builders = BuiltElsewhere(process, pool)
        try:
            there = builders.build(analysed)
            again = builders.build(analysed)
        finally:
            pool.close()
    assert there.outputs == () and there.decision == here.decision
    assert dict(there.outcomes) == dict(here.outcomes)
    assert sorted(w.kind for w in there.written) == sorted(k for k, _ in here.outputs)
    assert sorted(w.kind for w in there.written) == ["ko", "pdf", "sc", "sc", "sc", "sc", "sr"]
    built_here = {str(ds.SOPInstanceUID): ds for _, ds in here.outputs}
    for w in there.written:
        assert w.new
        area = "reports" if w.kind == "sr" else "outbox"
        assert w.path == spool.path(area, job.study_instance_uid, w.sop_instance_uid)
        read = pydicom.dcmread(w.path)
        assert read.SOPClassUID == w.sop_class_uid
        assert _comparable(read) == _comparable(built_here[w.sop_instance_uid])
    assert list(spool.tmp.iterdir()) == []
    lines = [r for r in caplog.records if r.name == "node.processing"
             and r.getMessage().startswith(f"study {job.study_instance_uid}: positive")]
    assert lines and getattr(lines[0], "study_uid", None) == job.study_instance_uid
    assert [w.new for w in again.written] == [False] * 7


def test_a_build_process_holds_the_objects_of_a_study_started_early(tmp_path: Path) -> None:
    """For a study started early the build process writes nothing: it sends the objects
    back encoded, byte for byte what the worker would write for them."""
    from node.builder import BuildProcesses, BuiltElsewhere
    from node.spool import Spool
    from node.worker import EarlyJob, EncodedObject

    process = processor_factory(load_config(write_config(tmp_path, free_port()), environ={}))()
    job = _demo_job(tmp_path / "study", "forearm", "early")
    early = EarlyJob(job.study_instance_uid, job.generation, job.instances, job.previous_report)
    analysed = process.analyse_many([process.prepare(early)])[0]
    here = process.build(analysed)
    spool = Spool(tmp_path / "spool")
    pool = BuildProcesses(process.settings, spool, 1)
    try:
        held = BuiltElsewhere(process, pool).build(analysed)
    finally:
        pool.close()
    assert held.written == () and held.decision == here.decision
    assert sorted(k for k, _ in held.outputs) == ["ko", "pdf", "sc", "sc", "sc", "sc", "sr"]
    assert all(isinstance(o, EncodedObject) for _, o in held.outputs)
    assert not [f for f in spool.root.rglob("*") if f.is_file()], "written into the spool"
    built_here = {str(ds.SOPInstanceUID): ds for _, ds in here.outputs}
    for _, o in held.outputs:
        assert _comparable(pydicom.dcmread(BytesIO(o.data))) == _comparable(
            built_here[o.SOPInstanceUID])


def test_a_build_process_that_dies_costs_one_attempt_and_a_new_one_takes_over(
        tmp_path: Path) -> None:
    """SIGKILL of the build process while it builds a study: that build raises (the
    worker records a failed attempt and retries it), a new process is started, and it
    builds the next study and the retried one."""
    from concurrent.futures.process import BrokenProcessPool
    import os
    import threading

    from node.builder import BuildProcesses, BuiltElsewhere
    from node.spool import Spool

    process = processor_factory(load_config(write_config(tmp_path, free_port()), environ={}))()
    job = _demo_job(tmp_path / "study", "forearm", "die")
    analysed = process.analyse_many([process.prepare(job)])[0]
    pool = BuildProcesses(process.settings, Spool(tmp_path / "spool"), 1)
    builders = BuiltElsewhere(process, pool)
    try:
        pool.wait_ready()
        first = pool.pids()
        killer = threading.Timer(0.05, lambda: os.kill(first[0], signal.SIGKILL))
        killer.start()
        with pytest.raises(BrokenProcessPool):
            builders.build(analysed)
        killer.join()
        result = builders.build(analysed)
        assert sorted(w.kind for w in result.written) == ["ko", "pdf", "sc", "sc", "sc", "sc", "sr"]
        assert pool.pids() and pool.pids() != first
    finally:
        pool.close()


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for c in map(int, children):
                if c not in out:
                    out.add(c)
                    todo.append(c)
    return out


def _serve_with_a_build_process(tmp_path: Path, studies: int) -> subprocess.Popen[bytes]:
    """``fracture-node serve`` (two worker threads, one build process) that has processed
    ``studies`` copies of the demo's forearm study, sent together."""
    port = free_port()
    cfg = write_config(tmp_path, port, quiet_seconds=0.3,
                       extra="\n[worker]\nthreads = 2\nbuild_processes = 1\n")
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([str(EXE), "--config", str(cfg), "serve"], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)
    wait_for(lambda: "build process(es) for the result objects" in log.read_text(
        errors="replace"), timeout=180)
    files = [f for n in range(studies)
             for f in _restudy(DEMO["forearm"], tmp_path / f"study{n}", f"serve{n}")]
    out = storescu(port, files, "FRACTURE_NODE")
    assert out.returncode == 0, out.stderr

    def processed() -> bool:
        con = sqlite3.connect(tmp_path / "node.sqlite", timeout=30)
        try:
            return con.execute("SELECT state FROM studies").fetchall() == [("processed",)] * studies
        finally:
            con.close()

    wait_for(processed, timeout=180, interval=0.2)
    return proc


def test_serve_builds_in_a_build_process_which_goes_when_the_node_is_killed(
        tmp_path: Path) -> None:
    """``fracture-node serve`` with two worker threads: its log says a build process
    builds the result objects, a study gets its results, and when the node is
    SIGKILLed its build process (and the pool's helper) exit on their own."""
    proc = _serve_with_a_build_process(tmp_path, 1)
    try:
        children = _descendants(proc.pid)
        assert children, "no build process"
        proc.kill()
        proc.wait(timeout=30)
        wait_for(lambda: not any(Path(f"/proc/{c}").exists() for c in children), timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_stops_a_node_and_its_build_process(tmp_path: Path) -> None:
    """Three studies sent together (more than one in hand: the build process gets
    work), then SIGTERM: the node exits 0 with every study processed and its build
    process gone; the build process itself ignores SIGTERM (the node decides when it
    stops)."""
    proc = _serve_with_a_build_process(tmp_path, 3)
    try:
        children = _descendants(proc.pid)
        assert children, "no build process"
        for child in children:  # a SIGTERM to the process group reaches them too
            os.kill(child, signal.SIGTERM)
        time.sleep(1.0)
        assert all(Path(f"/proc/{c}").exists() for c in children)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        wait_for(lambda: not any(Path(f"/proc/{c}").exists() for c in children), timeout=30)
        assert "node stopped" in (tmp_path / "serve.log").read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_study_threads_feed_an_idle_model_thread_before_building() -> None:
    """``_StudyTasks``: builds come before prepares while the model thread has a study
    waiting; while it has none, the next prepare comes first (it feeds the models,
    which then run beside the build); a stop comes after everything queued; stopping
    takes back the prepares not started."""
    models_waiting = True
    tasks = _StudyTasks(models_waiting=lambda: models_waiting)
    tasks.put(_PREPARE, "p1")
    tasks.put(_BUILD, "b1")
    tasks.put(_PREPARE, "p2")
    tasks.put(_BUILD, "b2")
    tasks.put(_STOP)
    assert tasks.get() == (_BUILD, "b1")
    models_waiting = False
    assert tasks.get() == (_PREPARE, "p1")
    models_waiting = True
    assert tasks.get() == (_BUILD, "b2")
    assert tasks.take_prepares() == ["p2"]
    assert tasks.get() == (_STOP, None)


class _TimedStages(_FailingBuild):
    """CopyProcessor in stages that take ``prepare``, ``analyse`` and ``build`` seconds
    and record when each stage of each study started and ended."""

    def __init__(self, prepare: float, analyse: float, build: float) -> None:
        super().__init__(bad_study="")
        self.seconds = {"prepare": prepare, "analyse": analyse, "build": build}
        self.events: list[tuple[float, str, str, str]] = []
        self.lock = threading.Lock()

    def _stage(self, stage: str, study: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), "start", stage, study))
        time.sleep(self.seconds[stage])
        with self.lock:
            self.events.append((time.monotonic(), "end", stage, study))

    def prepare(self, job):  # type: ignore[no-untyped-def]
        self._stage("prepare", job.study_instance_uid)
        return job

    def analyse_many(self, studies):  # type: ignore[no-untyped-def]
        for job in studies:
            self._stage("analyse", job.study_instance_uid)
        return list(studies)

    def build(self, job, sink=None):  # type: ignore[no-untyped-def]
        self._stage("build", job.study_instance_uid)
        return self.copy(job)


def test_a_study_beyond_the_in_flight_bound_decodes_while_the_models_analyse_the_last(
        tmp_path: Path) -> None:
    """``max_images_in_flight = 1`` and one study thread: every study but the first in
    hand is beyond the bound.  The next study still starts (and is decoded) while the
    models analyse the last one, once that one has been prepared; never more than
    two are in hand, and every study is processed."""
    port = free_port()
    cfg = write_config(tmp_path, port, quiet_seconds=0.3,
                       extra="\n[worker]\nthreads = 2\nmax_images_in_flight = 1\n",
                       destinations=[{"name": "pacs", "ae_title": "PACS", "port": free_port()}])
    config = load_config(cfg, environ={})
    studies = [f"1.2.826.0.1.3680043.10.19.{n}" for n in range(4)]
    stages = _TimedStages(prepare=0.3, analyse=0.8, build=0.2)
    node = Node(config, lambda: stages)
    node.start()
    try:
        wait_for(node.processing.is_set, timeout=60)
        _send_cr(port, studies)
        wait_for(lambda: node.jobs.query("SELECT count(*) AS n FROM studies WHERE state = 'processed'")
                 == [{"n": 4}], timeout=60, interval=0.1)
    finally:
        node.stop(grace_seconds=2)
    at = {(kind, stage, study): t for t, kind, stage, study in stages.events}
    assert {study for _, _, study in at} == set(studies)
    in_hand = [sum(1 for s in studies if at["start", "prepare", s] <= t < at["end", "build", s])
               for t, *_ in stages.events]
    assert max(in_hand) == 2, in_hand
    # some study was decoded while the models analysed the one before it
    assert any(at["end", "prepare", a] <= at["start", "prepare", b] < at["end", "analyse", a]
               for a in studies for b in studies if a != b), stages.events


class _RecordedReport:
    """The node-core ReportProcessor, recording when each study generation was made
    (raising the first ``failures`` times; the first taking ``first_delay`` s more)."""

    def __init__(self, failures: int = 0, first_delay: float = 0.0) -> None:
        from nodeharness import ReportProcessor

        self.report = ReportProcessor()
        self.failures = failures
        self.first_delay = first_delay
        self.made: list[tuple[float, int, int]] = []
        """(time.time(), generation, instances) of every study made."""

    def __call__(self, job: StudyJob):  # type: ignore[no-untyped-def]
        self.made.append((time.time(), job.generation, len(job.instances)))
        if len(self.made) == 1:
            time.sleep(self.first_delay)
        if len(self.made) <= self.failures:
            raise RuntimeError("decoder crashed")
        return self.report(job)


def _early_node(tmp_path: Path, quiet: float, early: float,  # type: ignore[no-untyped-def]
                failures: int = 0, first_delay: float = 0.0):
    from conftest import StoreSCP

    pacs = StoreSCP(tmp_path / "pacs")
    port = free_port()
    cfg = write_config(tmp_path, port, quiet_seconds=quiet,
                       extra=f"\n[worker]\nthreads = 2\nearly_start_seconds = {early}\n",
                       destinations=[{"name": "pacs", "ae_title": "PACS", "port": pacs.port}])
    processor = _RecordedReport(failures, first_delay)
    node = Node(load_config(cfg, environ={}), lambda: processor)
    return pacs, port, processor, node


def test_a_study_is_made_during_its_quiet_period_and_sent_only_when_it_ends(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Early start: the result objects of a study are made while its quiet period runs
    (once, 0.2 s after its last instance), nothing is written or queued before the
    quiet period ends, and then they are queued at once and delivered."""
    pacs, port, processor, node = _early_node(tmp_path, quiet=2.0, early=0.2)
    caplog.set_level(logging.INFO, logger="node")
    study = "1.2.826.0.1.3680043.10.18.40"
    node.start()
    try:
        _send_cr(port, [study])
        wait_for(lambda: processor.made, timeout=30, interval=0.01)
        last = float(node.jobs.query("SELECT last_received_at AS t FROM studies")[0]["t"])
        assert processor.made[0][0] < last + 2.0 - 0.5, "not made during the quiet period"
        assert node.jobs.query("SELECT COUNT(*) AS n FROM outbox")[0]["n"] == 0
        assert not list((node.spool.root / "outbox").rglob("*.dcm")), "written before ready"
        assert node.jobs.query("SELECT state FROM studies")[0]["state"] == "pending"
        wait_for(lambda: node.jobs.query("SELECT state FROM studies")[0]["state"] == "processed",
                 timeout=30, interval=0.01)
        rows = node.jobs.query("SELECT kind, created_at FROM outbox ORDER BY kind")
        assert [r["kind"] for r in rows] == ["sc", "sr"]
        assert all(float(r["created_at"]) >= last + 2.0 for r in rows), "queued before ready"
        assert [(g, n) for _, g, n in processor.made] == [(1, 1)], "made more than once"
        assert sorted(m for _, _, m in wait_for(lambda: len(pacs.received()) == 2
                                                and pacs.received(), timeout=60)) == ["CR", "SR"]
        assert any("made before its quiet period ended" in r.getMessage() for r in caplog.records)
        assert 'fracture_node_early_starts_total{outcome="used"} 1.0' in node.metrics.render().decode()
    finally:
        node.stop(grace_seconds=2)
        pacs.stop()


@pytest.mark.parametrize(("quiet", "delay"), [(1.5, 0.0), (0.6, 1.5)],
                         ids=["held-then-claimed", "claimed-while-making"])
def test_an_instance_arriving_after_an_early_start_drops_the_early_work(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, quiet: float, delay: float) -> None:
    """A second instance of the study arrives after its early start: the early result
    (one image, generation 1) is never written or sent; the study is made again with
    both instances, and only that result is queued.  Either the early result was held
    when the instance came, and the study starts early again (that result is used at the
    claim), or (its making takes ``delay`` s longer than the quiet period) the claim
    came while it was being made: then the claim goes back through the claiming loop
    once the early work ends."""
    pacs, port, processor, node = _early_node(tmp_path, quiet=quiet, early=0.1,
                                              first_delay=delay)
    caplog.set_level(logging.INFO, logger="node")
    study = "1.2.826.0.1.3680043.10.18.41"
    node.start()
    try:
        _send_cr(port, [study])
        wait_for(lambda: processor.made, timeout=30, interval=0.01)
        _send_cr(port, [study])
        wait_for(lambda: node.jobs.query("SELECT state FROM studies")[0]["state"] == "processed",
                 timeout=30, interval=0.01)
        assert [(g, n) for _, g, n in processor.made] == [(1, 1), (2, 2)]
        assert processor.made[1][0] >= processor.made[0][0] + delay, "not after the early work"
        rows = node.jobs.query("SELECT kind, sop_instance_uid FROM outbox ORDER BY kind")
        assert [r["kind"] for r in rows] == ["sc", "sc", "sr"]
        assert rows[2]["sop_instance_uid"] == generate_uid(entropy_srcs=[study, "2", "sr"])
        received = wait_for(lambda: len(pacs.received()) == 3 and pacs.received(), timeout=60)
        assert generate_uid(entropy_srcs=[study, "1", "sr"]) not in {u for _, u, _ in received}
        assert any("changed after its early start" in r.getMessage() for r in caplog.records)
        exposed = node.metrics.render().decode()
        assert 'fracture_node_early_starts_total{outcome="dropped"} 1.0' in exposed
        if delay:
            assert 'outcome="used"' not in exposed
        else:  # started early again, and that result used
            last = float(node.jobs.query("SELECT last_received_at AS t FROM studies")[0]["t"])
            assert processor.made[1][0] < last + quiet, "not made early the second time"
            assert 'fracture_node_early_starts_total{outcome="used"} 1.0' in exposed
        assert node.worker.in_flight == 0
    finally:
        node.stop(grace_seconds=2)
        pacs.stop()


@pytest.mark.parametrize(("value", "quiet", "message"), [
    (-1, 10.0, "worker.early_start_seconds must be a number of seconds, 0 or more (got -1)"),
    ("soon", 10.0, "worker.early_start_seconds must be a number of seconds, 0 or more"),
    (10, 10.0, "worker.early_start_seconds (10) must be shorter than study.quiet_seconds (10)"),
])
def test_an_impossible_early_start_is_refused_in_one_line(value: object, quiet: float,
                                                         message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_dict({"allow_any_peer": True, "keep_results_local": True,
                          "study": {"quiet_seconds": quiet},
                          "worker": {"early_start_seconds": value}}, Path("."))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_early_start_defaults_to_a_quarter_second_or_half_the_quiet_period() -> None:
    def early(**sections: object) -> float:
        return config_from_dict({"allow_any_peer": True, "keep_results_local": True,
                                 **sections}, Path(".")).early_start

    assert early() == 0.25
    assert early(study={"quiet_seconds": 0.3}) == pytest.approx(0.15)
    assert early(worker={"early_start_seconds": 0}) == 0.0
    assert early(worker={"early_start_seconds": 1.5}) == 1.5


def test_a_failed_early_start_costs_no_attempt_and_the_study_is_made_when_ready(
        tmp_path: Path) -> None:
    """The early work raises: it is only dropped (no attempt, no ``error`` decision in
    /metrics); the study is processed when its quiet period ends, and delivered."""
    pacs, port, processor, node = _early_node(tmp_path, quiet=1.0, early=0.2, failures=1)
    node.start()
    try:
        _send_cr(port, ["1.2.826.0.1.3680043.10.18.42"])
        wait_for(lambda: node.jobs.query("SELECT state FROM studies")[0]["state"] == "processed",
                 timeout=30, interval=0.01)
        row = node.jobs.query("SELECT attempts, reason FROM studies")[0]
        assert (row["attempts"], row["reason"]) == (0, None)
        assert len(processor.made) == 2
        exposed = node.metrics.render().decode()
        assert 'fracture_node_early_starts_total{outcome="failed"} 1.0' in exposed
        assert 'decision="error"' not in exposed
        wait_for(lambda: len(pacs.received()) == 2, timeout=60)
    finally:
        node.stop(grace_seconds=2)
        pacs.stop()


def test_the_record_of_a_failed_early_start_expires_like_a_held_result(tmp_path: Path) -> None:
    """A study whose early work failed is skipped until its claim; if another node
    claims it (or it never settles) that claim never comes here, so the record is
    dropped once it is older than the quiet period and EARLY_HOLD_SECONDS, as a held
    result is: the records stay bounded on a node beside others."""
    import node.worker as worker_module

    pacs, _port, _processor, node = _early_node(tmp_path, quiet=1.0, early=0.2)
    node.start()
    try:
        worker = node.worker
        assert isinstance(worker, worker_module.PipelinedWorker)
        now = time.monotonic()
        old = now - (1.0 + worker_module.EARLY_HOLD_SECONDS) - 1.0
        with worker._cond:
            worker._early_failed.update({"1.2.826.0.1.3680043.10.18.91": old,
                                         "1.2.826.0.1.3680043.10.18.92": now})
        wait_for(lambda: "1.2.826.0.1.3680043.10.18.91" not in worker._early_failed,
                 timeout=10, interval=0.01)  # the idle loop looks for early work
        assert "1.2.826.0.1.3680043.10.18.92" in worker._early_failed  # still within its window
    finally:
        node.stop(grace_seconds=2)
        pacs.stop()


def test_a_study_whose_early_start_failed_is_not_started_early_again(tmp_path: Path) -> None:
    """Every attempt at the study fails: it is started early once, not at every idle
    turn of its quiet period; its claim is then the first attempt counted."""
    pacs, port, processor, node = _early_node(tmp_path, quiet=2.0, early=0.2, failures=99)
    node.start()
    try:
        _send_cr(port, ["1.2.826.0.1.3680043.10.18.43"])
        wait_for(lambda: node.jobs.query("SELECT attempts FROM studies")[0]["attempts"] == 1,
                 timeout=30, interval=0.01)
        assert len(processor.made) == 2, processor.made
        exposed = node.metrics.render().decode()
        assert 'fracture_node_early_starts_total{outcome="failed"} 1.0' in exposed
    finally:
        node.stop(grace_seconds=2)
        pacs.stop()
