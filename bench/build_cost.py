"""CPU cost of the result objects of real studies, and a byte-for-byte check of them.

Drives :class:`node.processing.StudyProcessor` over the demo studies
(``demo/studies/forearm``, ``demo/studies/normal-forearm`` by default) with the shipped
models: each study is read, normalised and analysed once, then its result objects (SC
per image, SR, PDF, KO) are built ``--repeat`` times and the CPU time
(``time.process_time``) of each builder is printed as a median, per object and per study,
with the load average.  ``--profile`` prints the top functions (cProfile, cumulative) of
one further build of every study.

``--dump DIR`` writes every object of the last build to ``DIR`` (DICOM files, the PDF's
text via ``pdftotext``); ``--compare DIR`` compares the objects built now with such a
dump: pydicom datasets equal apart from the time stamps of :data:`PER_RUN` (set from the
clock at build time), the PDF's text equal.  Use it to show that a change to
``dicom_out`` altered no output: dump before, change, compare after.

Usage::

    .venv/bin/python bench/build_cost.py [--repeat 5] [--profile] [--dump DIR | --compare DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pydicom.config
from pydicom.dataset import Dataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Attributes set from the clock when an object is built (highdicom's and our own
#: Content/Instance Creation Date and Time, the SR's time stamps, the PDF's creation
#: time): the only ones allowed to differ between two builds of the same study.
PER_RUN = frozenset({
    "ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
    "AcquisitionDateTime", "SeriesDate", "SeriesTime", "DateTime", "Date", "Time",
    "ObservationDateTime", "DateOfSecondaryCapture", "TimeOfSecondaryCapture",
    "ContributionDateTime",
    "EncapsulatedDocumentLength",  # the PDF holds its creation time, compressed
})

#: The PDF's one per-run sentence: its creation time in the footer.
_PDF_CREATED = re.compile(r"created \d{4}-\d{2}-\d{2} \d{2}:\d{2}")


def _job(directory: Path) -> Any:
    from node.jobs import InstanceRecord, StudyJob

    records = []
    for path in sorted(directory.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        records.append(InstanceRecord(
            sop_instance_uid=ds.SOPInstanceUID, study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID, sop_class_uid=ds.SOPClassUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=str(path),
            size=path.stat().st_size, calling_aet="BENCH", peer="127.0.0.1"))
    return StudyJob(study_instance_uid=records[0].study_instance_uid, generation=1,
                    instances=tuple(records), previous_report=None)


def _to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class _Clock:
    """Patches the builders of ``node.processing`` to accumulate their CPU time."""

    def __init__(self) -> None:
        import node.processing as processing

        self.mod = processing
        self.times: dict[str, float] = {}
        self.saved: dict[str, Callable[..., Any]] = {}
        for name, key in (("build_secondary_capture", "sc"), ("build_structured_report", "sr"),
                          ("build_pdf_report", "pdf"), ("build_key_object_selection", "ko")):
            fn = getattr(processing, name)
            self.saved[name] = fn
            setattr(processing, name, self._wrap(fn, key))

    def _wrap(self, fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            value = fn(*args, **kwargs)
            self.times[key] = self.times.get(key, 0.0) + time.process_time() - t0
            return value
        return timed


def _comparable(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without the per-run attributes (at any depth)."""
    copy = pydicom.dcmread(io.BytesIO(_to_bytes(ds)))

    def strip(d: Dataset) -> None:
        for elem in list(d):
            if elem.keyword in PER_RUN:
                del d[elem.tag]
            elif elem.VR == "SQ":
                for item in elem.value:
                    strip(item)
    strip(copy)
    if "EncapsulatedDocument" in copy:
        del copy.EncapsulatedDocument  # compared as text
    return copy


def _pdf_text(data: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".pdf") as f:
        f.write(data.rstrip(b"\0"))
        f.flush()
        return subprocess.run(["pdftotext", "-layout", f.name, "-"], check=True,
                              capture_output=True, text=True).stdout


def _differences(a: Dataset, b: Dataset, path: str = "") -> list[str]:
    """Keywords (with their sequence path) whose values differ between ``a`` and ``b``."""
    out = []
    for tag in sorted(set(a.keys()) | set(b.keys())):
        ea, eb = a.get(tag), b.get(tag)
        name = f"{path}{(ea or eb).keyword or tag}"
        if ea is None or eb is None:
            out.append(name)
        elif ea.VR == "SQ" and eb.VR == "SQ" and len(ea.value) == len(eb.value):
            for i, (ia, ib) in enumerate(zip(ea.value, eb.value)):
                out.extend(_differences(ia, ib, f"{name}[{i}]."))
        elif ea != eb:
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 1 when ``--compare`` found a difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="*", type=Path,
                        default=[ROOT / "demo/studies/forearm",
                                 ROOT / "demo/studies/normal-forearm"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--stats", type=Path, default=None,
                        help="with --profile: also write the cProfile stats here (pstats, for callers)")
    parser.add_argument("--top", type=int, default=30)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--dump", type=Path)
    group.add_argument("--compare", type=Path)
    args = parser.parse_args(argv)
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE

    from node.config import load_config
    from node.processing import processor_factory

    config = load_config(ROOT / "config.toml", environ={})
    processor = processor_factory(config)()
    clock = _Clock()
    analysed = {}
    for directory in args.studies:
        job = _job(directory)
        analysed[directory.name] = processor.analyse_many([processor.prepare(job)])[0]

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows: dict[str, dict[str, list[float]]] = {}
    last: dict[str, list[tuple[str, Dataset]]] = {}
    for name, study in analysed.items():
        processor.build(study)  # warm (imports, caches)
        per: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            clock.times = {}
            t0 = time.process_time()
            outputs = processor.build(study).outputs
            total = time.process_time() - t0
            for key, t in clock.times.items():
                per.setdefault(key, []).append(t)
            per.setdefault("write", []).append(0.0)
            t1 = time.process_time()
            for _, ds in outputs:
                _to_bytes(ds)
            per["write"][-1] = time.process_time() - t1
            per.setdefault("build", []).append(total)
            per.setdefault("study", []).append(total + per["write"][-1])
        rows[name] = per
        last[name] = outputs
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"CPU ms per study, median of {args.repeat} (sc = all SCs of the study; "
          "write = all objects to bytes; study = build + write)")
    keys = ["sc", "sr", "pdf", "ko", "build", "write", "study"]
    print(f"{'study':<16}" + "".join(f"{k:>9}" for k in keys))
    for name, per in rows.items():
        print(f"{name:<16}" + "".join(
            f"{statistics.median(per[k]) * 1000:>9.1f}" if k in per else f"{'-':>9}"
            for k in keys))

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for study in analysed.values():
            processor.build(study)
        profiler.disable()
        stats = pstats.Stats(profiler)
        if args.stats:
            stats.dump_stats(args.stats)
        stats.sort_stats("cumulative").print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top)

    status = 0
    for name, outputs in last.items():
        for n, (kind, ds) in enumerate(outputs):
            stem = f"{name}-{n:02d}-{kind}"
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                (args.dump / f"{stem}.dcm").write_bytes(_to_bytes(ds))
                if kind == "pdf":
                    (args.dump / f"{stem}.txt").write_text(_pdf_text(ds.EncapsulatedDocument))
            elif args.compare:
                before = pydicom.dcmread(args.compare / f"{stem}.dcm")
                diff = _differences(_comparable(before), _comparable(ds))
                if kind == "pdf" and (
                    _PDF_CREATED.sub("", (args.compare / f"{stem}.txt").read_text())
                    != _PDF_CREATED.sub("", _pdf_text(ds.EncapsulatedDocument))
                ):
                    diff.append("PDF text")
                same = not diff
                print(f"{stem}: {'same' if same else 'DIFFERENT: ' + ', '.join(diff)}")
                status |= not same
    return status


if __name__ == "__main__":
    raise SystemExit(main())
