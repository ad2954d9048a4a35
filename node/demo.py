"""``fracture-node demo``: the whole product on one machine.

Starts a real Orthanc (the PACS, with the auto-routing Lua rule of ``orthanc-test/``)
and the node, pushes the demo's real radiograph studies (``demo/studies``) into Orthanc
with DCMTK ``storescu`` (as a modality would), waits, without calling the node, for the
results to come back into the same studies, and shows where they are: each study's
decision and Orthanc address, the SRs rendered as text, and the PDFs, Secondary
Captures and Key Object Selections saved locally.  With ``--keep-running`` Orthanc and
the node stay up until Ctrl-C, so the printed links work.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pydicom

from node.config import (
    Config,
    DestinationConfig,
    NodeConfig,
    PeerConfig,
    StorageConfig,
    StudyConfig,
    load_config,
    render_config,
)
from node.processing import processor_factory
from node.scu import dicom_files
from node.service import Node

ROOT = Path(__file__).resolve().parents[1]
DEMO_STUDIES = ROOT / "demo" / "studies"


def _orthanc_ctl() -> ModuleType:
    spec = importlib.util.spec_from_file_location("orthanc_ctl",
                                                  ROOT / "orthanc-test" / "orthanc_ctl.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["orthanc_ctl"] = module
    spec.loader.exec_module(module)
    return module


def _start_ohif(ctl: ModuleType, orthanc_url: str) -> Any:
    """OHIF's viewer in front of the demo's Orthanc, or ``None`` (with a note) when
    bootstrap.sh has not unpacked it."""
    try:
        return ctl.start_ohif(orthanc_url)
    except RuntimeError as exc:
        print(f"no OHIF links: {exc}", file=sys.stderr)
        return None


class Progress:
    """A one-line progress display on stderr (plain lines when not a terminal)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last = ""

    def show(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:5.1f} s] {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
        elif text != self._last:
            sys.stderr.write(line + "\n")
        self._last = text

    def done(self, text: str) -> None:
        self.show(text)
        if self.tty:
            sys.stderr.write("\n")


def _write_config(workdir: Path, node_port: int, orthanc_port: int) -> Path:
    shipped = load_config(ROOT / "config.toml", environ={})
    config = Config(
        node=NodeConfig(port=node_port),
        peers=(PeerConfig("ORTHANC", "127.0.0.1"),),
        destinations=(DestinationConfig("pacs", "ORTHANC", "127.0.0.1", orthanc_port),),
        storage=StorageConfig(spool_dir=Path("spool"), database=Path("fracture-node.sqlite"),
                              min_free_mb=64),
        study=StudyConfig(quiet_seconds=2),
        models=shipped.models,
    )
    path = workdir / "config.toml"
    path.write_text(render_config(config))
    return path


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code."""
    progress = Progress()
    inputs = [Path(p) for p in args.inputs] or [DEMO_STUDIES]
    files = dicom_files(inputs)
    if not files:
        print(f"no DICOM files in {', '.join(map(str, inputs))}", file=sys.stderr)
        return 1
    studies = sorted({str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
                      for f in files})
    out = Path(args.out).resolve()
    workdir = ROOT / "var" / "demo"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    ctl = _orthanc_ctl()
    node_port = ctl.free_port()
    dicomweb = ctl.dicomweb_plugin_installed()
    orthanc = ctl.Orthanc(workdir / "orthanc", node_port=node_port, route=True, stable_age=2,
                          dicomweb=dicomweb)
    progress.show("starting Orthanc (the PACS) ...")
    orthanc.start()
    ohif = _start_ohif(ctl, orthanc.url) if dicomweb else None
    config = load_config(_write_config(workdir, node_port, orthanc.dicom_port), environ={})
    node = Node(config, processor_factory(config))
    try:
        progress.show("starting fracture-node (loading the models) ...")
        node.start()
        progress.show(f"pushing {len(files)} file(s) into Orthanc with storescu ...")
        sent = ctl.storescu(orthanc.dicom_port, files, "ORTHANC", "MODALITY")
        if sent.returncode != 0:
            progress.done(f"storescu failed: {sent.stderr.strip()[-300:]}")
            return 1
        results = _wait_for_results(orthanc, node, studies, progress)
        if results is None:
            progress.done("timed out waiting for results; see `fracture-node status` and "
                          f"{workdir}/orthanc/orthanc.log")
            return 1
        progress.done("results are back in Orthanc")
        _show(orthanc, results, out)
        _summary(orthanc, node, studies, ohif, results)
        if args.keep_running:
            print(f"\nOrthanc ({orthanc.url}) and the node keep running, so the links above "
                  "work: press Ctrl-C to stop them.")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        else:
            print("\nOrthanc and the node stop now, so the Orthanc links above stop working; "
                  "the files above stay. Run the demo with --keep-running "
                  "(./scripts/demo.sh --keep-running) to keep them up until Ctrl-C.")
        return 0
    finally:
        node.stop(grace_seconds=2)
        if ohif is not None:
            ohif.stop()
        orthanc.stop()


def _wait_for_results(orthanc: Any, node: Node, studies: list[str], progress: Progress,
                      timeout: float = 600.0) -> list[dict[str, Any]] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = node.jobs.counts()
        s, o = counts["studies"], counts["outbox"]
        progress.show(
            "waiting: Orthanc routes the study once stable, the node waits for the quiet "
            f"period | studies {s or '-'} | results {o or '-'}"
        )
        states = node.jobs.query("SELECT state FROM studies")
        pending = node.jobs.query("SELECT COUNT(*) AS n FROM outbox WHERE state != 'delivered'")
        if (len(states) >= len(studies) and all(r["state"] == "processed" for r in states)
                and pending[0]["n"] == 0):
            found: list[dict[str, Any]] = []
            for uid in studies:
                found.extend(i for i in orthanc.study_instances(uid)
                             if i["tags"].get("Manufacturer") == "fracture-node")
            return found
        time.sleep(0.25)
    return None


def _summary(orthanc: Any, node: Node, studies: list[str], ohif: Any = None,
             results: list[dict[str, Any]] | None = None) -> None:
    """One line per study: what it is, the node's decision, its Orthanc link, and below
    it the study in OHIF (when OHIF runs).  For a positive or doubtful study the OHIF
    link opens the node's SR, which OHIF shows as the flagged radiograph with the heat
    map's hot region drawn on it."""
    sr_series = {
        item["tags"].get("StudyInstanceUID"): item["tags"].get("SeriesInstanceUID")
        for item in results or [] if item["tags"].get("Modality") == "SR"
    }
    print("\nStudies (decision of the node, then the study in Orthanc"
          + (" and in OHIF" if ohif is not None else "") + "):")
    for uid in studies:
        rows = node.jobs.query("SELECT decision FROM studies WHERE study_instance_uid = ?", [uid])
        decision = rows[0]["decision"] if rows else "not received"
        study_id = orthanc.find_study(uid)
        info = orthanc.get(f"/studies/{study_id}") if study_id else {}
        tags = info.get("MainDicomTags", {})
        date = tags.get("StudyDate", "")
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}" if len(date) == 8 else date
        what = f"{tags.get('StudyDescription', '') or 'study'} ({date})"
        link = f"{orthanc.url}/app/explorer.html#study?uuid={study_id}" if study_id else "-"
        print(f"  {what:<46} {decision:<13} {link}")
        if ohif is not None:
            drawn = decision in ("positive", "doubtful")
            print(f"  {'':<46} {'':<13} "
                  f"{ohif.study_url(uid, sr_series.get(uid) if drawn else None)}")


def _show(orthanc: Any, results: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    by_kind: dict[str, list[Path]] = {"SC": [], "SR": [], "PDF": [], "KO": []}
    for item in results:
        tags = item["tags"]
        raw = orthanc.get(f"/instances/{item['ID']}/file", raw=True)
        sop = tags["SOPInstanceUID"]
        modality = tags.get("Modality", "")
        if modality == "SR":
            path = out / f"report_{sop}.dcm"
            path.write_bytes(raw)
            by_kind["SR"].append(path)
        elif modality == "KO":
            path = out / f"key_images_{sop}.dcm"
            path.write_bytes(raw)
            by_kind["KO"].append(path)
        elif modality == "DOC":
            path = out / f"report_{sop}.pdf"
            path.write_bytes(orthanc.get(f"/instances/{item['ID']}/content/0042-0011", raw=True))
            (out / f"report_{sop}.dcm").write_bytes(raw)
            by_kind["PDF"].append(path)
        else:
            path = out / f"heatmap_{sop}.png"
            path.write_bytes(orthanc.get(f"/instances/{item['ID']}/preview", raw=True))
            (out / f"heatmap_{sop}.dcm").write_bytes(raw)
            by_kind["SC"].append(path)
    print()
    print(f"Heat maps (SC):    {len(by_kind['SC'])} image(s)")
    for p in by_kind["SC"]:
        print(f"                   {p}")
    for p in by_kind["PDF"]:
        print(f"PDF report:        {p}")
    for p in by_kind["KO"]:
        print(f"Key images (KOS):  {p}")
    for p in by_kind["SR"]:
        print(f"Structured report: {p}\n")
        text = subprocess.run(["dsr2html", "-Ei", "+Rd", str(p)], capture_output=True,
                              text=True).stdout
        html = out / (p.stem + ".html")
        html.write_text(text)
        dump = subprocess.run(["dsrdump", "-Ei", str(p)], capture_output=True, text=True)
        print(textwrap.indent(dump.stdout.strip(), "    "))
        print(f"\n                   rendered: {html}")
