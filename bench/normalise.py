"""Benchmark: decode + normalise per transfer syntax, side by side with DCMTK.

For every transfer syntax, on the real files of ``shared/data/dicom`` (radiographs and
the small MR/CT files that carry the rarer syntaxes) and on a synthetic 3000 x 3000
16-bit radiograph (a real one, RG2 hip CR, upscaled with noise and encoded in each
syntax into a temporary directory), this prints the median time per image of

- ours: ``dcmread`` + :func:`pipeline.normalise.load_image` (decode, Modality LUT, VOI,
  MONOCHROME1, area-downscale to ``max_side``);
- DCMTK: ``dcmj2pnm`` (``dcml2pnm`` for JPEG-LS) rendering the same file with the same
  window to an 8-bit PGM without overlays (``-O``), timed as a subprocess in the same run (process start included:
  that is what a PACS-side rendering costs).  The free DCMTK 3.6.7 has no JPEG 2000
  decoder, so that column is empty for JPEG 2000;
- pydicom: ``dcmread`` + ``ds.pixel_array`` (full decode of all frames, no LUT), the
  plain-pydicom baseline;

and the ratio ours / DCMTK.  Usage::

    .venv/bin/python bench/normalise.py [--repeat 5] [--max-side 2048] [--workdir DIR]

Encoders used to build the 3000 x 3000 cases: DCMTK ``dcmconv`` (implicit, big endian,
deflated), ``dcmcjpeg`` (JPEG baseline 8-bit, extended 12-bit, lossless SV1 and process
14), ``dcmcjpls`` (JPEG-LS lossless, near-lossless), ``dcmcrle`` (RLE), and pydicom with
pylibjpeg-openjpeg (JPEG 2000 lossless, lossy 20:1).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.normalise import load_image
from pipeline.result import Refusal

DICOM_DATA = ROOT.parent / "shared" / "data" / "dicom"
LARGE_SIDE = 3000

SYNTAX_NAMES: dict[str, str] = {
    "1.2.840.10008.1.2": "Implicit VR LE",
    "1.2.840.10008.1.2.1": "Explicit VR LE",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit LE",
    "1.2.840.10008.1.2.2": "Explicit VR BE",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline 8-bit",
    "1.2.840.10008.1.2.4.51": "JPEG Extended 12-bit",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless P14",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "": "(no file meta)",
}
JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


@dataclass
class Row:
    """One line of the table."""

    group: str
    syntax: str
    files: int
    ours_ms: float
    dcmtk_ms: float | None
    pydicom_ms: float | None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.ours_ms / self.dcmtk_ms if self.dcmtk_ms else None


def _syntax_of(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")


def _median_ms(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def time_ours(path: Path, max_side: int, repeat: int) -> tuple[float, str]:
    """Median ms of dcmread + load_image, and a refusal/notes summary."""
    last: list[object] = []

    def run() -> None:
        ds = pydicom.dcmread(path, force=True)
        last[:] = [load_image(ds, max_side=max_side)]

    ms = _median_ms(run, repeat)
    result = last[0]
    if isinstance(result, Refusal):
        return ms, f"REFUSED {result.code}"
    notes = [n for n in result.notes if "resolution level" in n]  # type: ignore[attr-defined]
    return ms, "; ".join(notes)


def time_pydicom(path: Path, repeat: int) -> float | None:
    if not _syntax_of(path):
        return None  # pydicom needs a transfer syntax

    def run() -> None:
        _ = pydicom.dcmread(path).pixel_array

    try:
        return _median_ms(run, repeat)
    except Exception:
        return None


def time_dcmtk(path: Path, workdir: Path, repeat: int) -> float | None:
    """Median ms of DCMTK rendering ``path`` with its first window to an 8-bit PGM."""
    syntax = _syntax_of(path)
    if syntax in JPEG_2000:
        return None
    tool = "dcml2pnm" if syntax in JPEG_LS else "dcmj2pnm"
    if shutil.which(tool) is None:
        return None
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    if "WindowCenter" in ds:
        voi = ["+Wi", "1"]
    elif "VOILUTSequence" in ds:
        voi = ["+Wl", "1"]
    else:
        voi = ["+Wm"]
    cmd = [tool, *voi, "-O", "+op", str(path), str(workdir / "dcmtk.pgm")]
    if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
        return None

    def run() -> None:
        subprocess.run(cmd, capture_output=True, check=True)

    return _median_ms(run, repeat)


# -- the 3000 x 3000 cases ---------------------------------------------------------------


def _write(ds: pydicom.Dataset, arr: np.ndarray, bits: int, path: Path) -> None:
    meta = pydicom.dataset.FileMetaDataset(ds.file_meta)
    ds = pydicom.Dataset(ds)
    ds.file_meta = meta
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PixelData = arr.astype(np.uint16 if bits > 8 else np.uint8).tobytes()
    ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    scale = 2.0 ** (bits - 10)
    ds.WindowCenter, ds.WindowWidth = round(511 * scale), round(1024 * scale)
    for keyword in (
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)


def make_large_cases(workdir: Path) -> dict[str, Path]:
    """Encode a 3000 x 3000 radiograph in every syntax (cached in ``workdir``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    src = pydicom.dcmread(DICOM_DATA / "pylibjpeg-data" / "RG2_JPLL.dcm")
    base16, base12, base8 = (workdir / f"large_{b}.dcm" for b in (16, 12, 8))
    if not base16.exists():
        arr = src.pixel_array.astype(np.float32)
        big = cv2.resize(arr, (LARGE_SIDE, LARGE_SIDE), interpolation=cv2.INTER_CUBIC)
        rng = np.random.default_rng(0)
        v16 = np.clip(big * 64.0 + rng.normal(0.0, 8.0, big.shape), 0, 65535)  # detector noise
        src.PixelData = b""
        _write(src, v16.round(), 16, base16)
        _write(src, (v16 / 16).round(), 12, base12)
        _write(src, (v16 / 256).round().clip(0, 255), 8, base8)
    out["1.2.840.10008.1.2.1"] = base16

    def dcmtk(uid: str, args: list[str], source: Path = base16) -> None:
        path = workdir / f"large_{uid}.dcm"
        if not path.exists():
            subprocess.run([*args, str(source), str(path)], check=True, capture_output=True)
        out[uid] = path

    dcmtk("1.2.840.10008.1.2", ["dcmconv", "+ti"])
    dcmtk("1.2.840.10008.1.2.2", ["dcmconv", "+tb"])
    dcmtk("1.2.840.10008.1.2.1.99", ["dcmconv", "+td"])
    dcmtk("1.2.840.10008.1.2.4.50", ["dcmcjpeg", "+eb"], base8)
    dcmtk("1.2.840.10008.1.2.4.51", ["dcmcjpeg", "+ee"], base12)
    dcmtk("1.2.840.10008.1.2.4.57", ["dcmcjpeg", "+el"])
    dcmtk("1.2.840.10008.1.2.4.70", ["dcmcjpeg", "+e1"])
    dcmtk("1.2.840.10008.1.2.4.80", ["dcmcjpls", "+el"])
    dcmtk("1.2.840.10008.1.2.4.81", ["dcmcjpls", "+en"])
    dcmtk("1.2.840.10008.1.2.5", ["dcmcrle"])
    j2k_options: list[tuple[str, dict[str, Any]]] = [
        ("1.2.840.10008.1.2.4.90", {}),
        ("1.2.840.10008.1.2.4.91", {"j2k_cr": [20]}),
    ]
    for uid, kwargs in j2k_options:
        path = workdir / f"large_{uid}.dcm"
        if not path.exists():
            ds = pydicom.dcmread(base16)
            ds.compress(UID(uid), encoding_plugin="pylibjpeg", **kwargs)
            ds.save_as(path)
        out[uid] = path
    return out


# -- table ---------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row], title: str) -> None:
    print(f"\n{title}")
    header = (
        f"{'syntax':<24} {'n':>2} {'ours ms':>8} {'dcmtk ms':>9} {'ratio':>6}"
        f" {'pydicom ms':>10}  note"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.syntax:<24} {row.files:>2} {row.ours_ms:>8.0f} {_fmt(row.dcmtk_ms):>9}"
            f" {_fmt(row.ratio, '.2f'):>6} {_fmt(row.pydicom_ms):>10}  {row.note}"
        )


def bench_real(max_side: int, repeat: int, workdir: Path) -> list[Row]:
    groups: dict[str, list[Path]] = {}
    for path in sorted(DICOM_DATA.glob("*/*.dcm")):
        groups.setdefault(_syntax_of(path), []).append(path)
    rows = []
    for syntax, paths in sorted(groups.items(), key=lambda kv: SYNTAX_NAMES.get(kv[0], kv[0])):
        ours, dcmtk, plain, notes = [], [], [], []
        for path in paths:
            ms, note = time_ours(path, max_side, repeat)
            if note.startswith("REFUSED"):
                notes.append(f"{path.name} {note}")
                continue
            ours.append(ms)
            dcmtk.append(time_dcmtk(path, workdir, repeat))
            plain.append(time_pydicom(path, repeat))
        if not ours:
            continue
        known = [d for d in dcmtk if d is not None]
        rows.append(
            Row(
                "real",
                SYNTAX_NAMES.get(syntax, syntax),
                len(ours),
                statistics.mean(ours),
                statistics.mean(known) if len(known) == len(ours) else None,
                statistics.mean(p for p in plain if p is not None) if any(plain) else None,
                "; ".join(notes),
            )
        )
    return rows


def bench_large(max_side: int, repeat: int, workdir: Path) -> list[Row]:
    rows = []
    for syntax, path in sorted(
        make_large_cases(workdir).items(), key=lambda kv: SYNTAX_NAMES[kv[0]]
    ):
        ours, note = time_ours(path, max_side, repeat)
        rows.append(
            Row(
                "3000x3000",
                SYNTAX_NAMES[syntax],
                1,
                ours,
                time_dcmtk(path, workdir, repeat),
                time_pydicom(path, max(1, repeat // 2)),
                note,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per file (median)")
    parser.add_argument("--max-side", type=int, nargs="+", default=[2048, 1024])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the 3000x3000 files are built (kept for reuse)",
    )
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    workdir = args.workdir or Path(tempfile.gettempdir()) / "fracture-node-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    for max_side in args.max_side:
        if not args.skip_real:
            print_table(
                bench_real(max_side, args.repeat, workdir),
                f"Real files, max_side={max_side} (mean over files of median ms)",
            )
        print_table(
            bench_large(max_side, args.repeat, workdir),
            f"3000 x 3000 16-bit radiograph, max_side={max_side} (median ms)",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
