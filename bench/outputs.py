"""Benchmark of ``dicom_out``: build the SC, SR and PDF of a 4-image study.

Inputs are real radiographs from ``../shared/data/dicom`` (RG3_UNCR: CR 1760 x 1760,
RG2_JPLL: CR 2140 x 1760), decoded and windowed once before timing (decoding is the
pipeline's job, not ``dicom_out``'s).  Heat maps are Gaussian blobs on a 224 grid,
standing in for Grad-CAM (the stand-ins of ``bench/findings.py``, which the tests of
``dicom_out`` use too).  The four instances are moved into one study (Patient /
Study attributes of the first, new UIDs), as a PACS would send them.

Timed, per repetition: four Secondary Captures, the SR (which lists the SCs as
evidence) and the PDF, built in memory; optionally also written to bytes
(``--write``).  The target is < 0.5 s for the whole study.

Usage::

    .venv/bin/python bench/outputs.py [--repeat 7] [--write]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.findings import make_finding, reparent, study_result, window  # noqa: E402
from dicom_out.common import OutputSettings  # noqa: E402
from dicom_out.pdf import build_pdf_report  # noqa: E402
from dicom_out.sc import build_secondary_capture  # noqa: E402
from dicom_out.sr import build_structured_report  # noqa: E402
from pipeline.result import Decision, ImageFinding, StudyResult  # noqa: E402

DICOM_DATA = ROOT.parent / "shared" / "data" / "dicom"
T = TypeVar("T")


def demo_study() -> tuple[StudyResult, dict[str, pydicom.Dataset]]:
    """A 4-image study (real pixels, stand-in model outputs) and its sources."""
    files = [
        ("pydicom-data/RG3_UNCR.dcm", "WRIST", 0.87, Decision.POSITIVE),
        ("pylibjpeg-data/RG2_JPLL.dcm", "HAND", 0.47, Decision.DOUBTFUL),
        ("pydicom-data/RG3_UNCR.dcm", "WRIST", 0.71, Decision.POSITIVE),
        ("pylibjpeg-data/RG2_JPLL.dcm", "HAND", 0.12, Decision.NEGATIVE),
    ]
    cache: dict[str, tuple[pydicom.Dataset, np.ndarray]] = {}
    head: pydicom.Dataset | None = None
    findings: list[ImageFinding] = []
    sources: dict[str, pydicom.Dataset] = {}
    for n, (name, part, p, decision) in enumerate(files, start=1):
        if name not in cache:
            ds = pydicom.dcmread(DICOM_DATA / name)
            cache[name] = (ds, window(ds))
        ds, pixels = cache[name]
        if head is None:
            head = ds
        src = reparent(ds, head, n)
        sources[src.SOPInstanceUID] = src
        findings.append(make_finding(src, pixels, part, p, decision, (0.3 + 0.1 * n, 0.5)))
    assert head is not None
    return study_result(findings, [], head.StudyInstanceUID), sources


CLOCK: Callable[[], float] = time.perf_counter


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = CLOCK()
    value = fn()
    return value, CLOCK() - start


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def run_once(
    result: StudyResult, sources: dict[str, pydicom.Dataset], settings: OutputSettings, write: bool
) -> dict[str, float]:
    """Build (and optionally serialise) all outputs once; seconds per object."""
    times: dict[str, float] = {}
    scs = []
    for i, finding in enumerate(result.findings, start=1):
        sc, t = _timed(
            lambda f=finding: build_secondary_capture(f, sources[f.meta.sop_instance_uid], settings)
        )
        if write:
            t += _timed(lambda d=sc: _to_bytes(d))[1]
        times[f"sc{i}"] = t
        scs.append(sc)
    sr, t = _timed(lambda: build_structured_report(result, sources, scs, settings))
    if write:
        t += _timed(lambda: _to_bytes(sr))[1]
    times["sr"] = t
    pdf, t = _timed(lambda: build_pdf_report(result, sources, settings))
    if write:
        t += _timed(lambda: _to_bytes(pdf))[1]
    times["pdf"] = t
    times["total"] = sum(times.values())
    return times


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print per-object and total times (ms)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed repetitions")
    parser.add_argument("--write", action="store_true", help="also serialise to bytes")
    args = parser.parse_args(argv)
    import pydicom.config

    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    global CLOCK
    result, sources = demo_study()
    settings = OutputSettings()
    cold = run_once(result, sources, settings, args.write)
    wall = [run_once(result, sources, settings, args.write) for _ in range(args.repeat)]
    CLOCK = time.process_time
    cpu = [run_once(result, sources, settings, args.write) for _ in range(args.repeat)]
    CLOCK = time.perf_counter
    print(
        f"dicom_out benchmark: 4-image study, {args.repeat} repetitions"
        f"{' (incl. writing to bytes)' if args.write else ''}; "
        "wall clock is inflated when other processes share the CPUs, CPU time is not"
    )
    print(f"{'object':<8}{'cold ms':>9}{'wall median':>13}{'wall min':>10}{'CPU median':>12}")
    for key in cold:
        w = [r[key] * 1000 for r in wall]
        c = [r[key] * 1000 for r in cpu]
        print(
            f"{key:<8}{cold[key] * 1000:>9.1f}{statistics.median(w):>13.1f}{min(w):>10.1f}"
            f"{statistics.median(c):>12.1f}"
        )
    median_wall = statistics.median(r["total"] for r in wall)
    median_cpu = statistics.median(r["total"] for r in cpu)
    print(
        f"target < 500 ms for the whole study: wall median {median_wall * 1000:.0f} ms "
        f"({'OK' if median_wall < 0.5 else 'OVER'}), CPU median {median_cpu * 1000:.0f} ms "
        f"({'OK' if median_cpu < 0.5 else 'OVER'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
