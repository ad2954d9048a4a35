"""Coverage-guided fuzzing (atheris / libFuzzer) of the decode-and-validate path.

The target is what the worker runs on every received instance: ``pydicom.dcmread``
(lenient, ``force=True``) then :func:`pipeline.normalise.prepare`.  A finding is any
exception escaping ``prepare`` (it must return a ``NormalisedImage`` or a
``Refusal``, never raise); findings are counted and grouped by where they were
raised, and fuzzing goes on.  ``dcmread`` itself may reject bytes: that is
the SCP's 0xC210 path and not a finding.

The corpus is seeded with the real files of ../shared/data/dicom (under 400 kB each).
Runs for a bounded time and prints executions, coverage and findings::

    .venv/bin/python bench/fuzz_decode.py --seconds 120
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dicom"
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--report", help="write the figures as JSON here")
    args, rest = parser.parse_known_args(argv)

    import atheris

    with atheris.instrument_imports(include=["pipeline", "pydicom"]):
        import pydicom
        import pydicom.config

        from pipeline.normalise import prepare
        from pipeline.result import NormalisedImage, Refusal

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    import logging

    logging.disable(logging.CRITICAL)
    findings: dict[str, str] = {}
    stats: dict[str, object] = {"executions": 0, "parsed": 0, "normalised": 0, "refused": 0, "findings": 0}

    def finish() -> None:
        stats["seconds"] = round(time.monotonic() - started, 1)
        stats["corpus_files"] = len(list(corpus.iterdir()))
        stats["distinct_findings"] = sorted(findings)
        print(json.dumps(stats), flush=True)
        for signature, trace in findings.items():
            print(f"--- {signature}\n{trace}", flush=True)
        if args.report:
            Path(args.report).write_text(json.dumps(stats))
        shutil.rmtree(corpus, ignore_errors=True)
        os._exit(0)  # libFuzzer would otherwise exit from C, past Python's clean-up

    def target(data: bytes) -> None:
        if time.monotonic() - started > args.seconds:
            finish()
        stats["executions"] = int(stats["executions"]) + 1
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception:
            return
        stats["parsed"] = int(stats["parsed"]) + 1
        try:
            result = prepare(ds)  # must never raise: an exception here is a finding
        except Exception as exc:
            stats["findings"] = int(stats["findings"]) + 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            signature = f"{type(exc).__name__} at {Path(where.filename).name}:{where.lineno}"
            if signature not in findings:
                findings[signature] = "".join(traceback.format_exception(exc)[-3:])
            return
        if isinstance(result, NormalisedImage):
            stats["normalised"] = int(stats["normalised"]) + 1
        elif isinstance(result, Refusal):
            stats["refused"] = int(stats["refused"]) + 1
        else:
            raise AssertionError(f"prepare returned {type(result).__name__}")

    corpus = Path(tempfile.mkdtemp(prefix="fuzz-corpus-"))
    for path in DATA.rglob("*.dcm"):
        if path.stat().st_size < 400_000:  # libFuzzer keeps its corpus in memory
            shutil.copy(path, corpus / path.name)
    started = time.monotonic()
    libfuzzer_args = [sys.argv[0], str(corpus), f"-max_total_time={args.seconds + 60}",
                      "-rss_limit_mb=6144", "-max_len=400000", "-timeout=20",
                      "-print_final_stats=1", *rest]
    atheris.Setup(libfuzzer_args, target)
    atheris.Fuzz()
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
