"""From a DICOM radiograph to model-ready pixels: one documented intensity contract.

The contract (``NormalisedImage.pixels``): float32, 2-D, in [0, 1], bone bright, longer
side at most ``max_side``.  The grayscale pipeline of PS3.3 C.11 is applied in order to
the stored values of the first frame:

1. **Modality LUT** (PS3.3 C.11.1): Rescale Slope/Intercept, or the Modality LUT
   Sequence when present;
2. **VOI LUT** (PS3.3 C.11.2): the *first* Window Center/Width with its VOI LUT Function
   (LINEAR, LINEAR_EXACT or SIGMOID, C.11.2.1.2-3), else the first item of the VOI LUT
   Sequence, else a robust percentile window (0.5th-99.5th percentile) over the body:
   the Pixel Padding Value/Range (C.7.5.1.1.2) and flat collimator borders are ignored;
3. **MONOCHROME1** (PS3.3 C.7.6.3.1.2: minimum value displayed white) is inverted, so
   bone is bright whatever the photometric interpretation;
4. scaled to float32 [0, 1] and area-downscaled so the longer side fits ``max_side``.

Because every step is a function of the stored value alone, steps 1-3 are folded into
one look-up table over all 2**BitsStored stored values and applied with a single gather,
which is what keeps a 3000 x 3000 16-bit image within the time budget.

Colour images are looked at only to refuse them: seed 000's HSV-saturation check (mean
saturation above 35/255, or more than 25 % of pixels above 60/255, is a photograph or
screenshot); a grey RGB image (a radiograph exported as RGB) is converted to luminance
and goes on.  A scanned page or document is refused by its Conversion Type or by its
pixels (mostly paper-white with dark strokes).  Nothing here raises for bad data: a bad
input becomes a :class:`~pipeline.result.Refusal`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import cv2
import numpy as np
from pydicom.dataset import Dataset

from pipeline.decode import DecodedFrame, DecodeError, decode_first_frame
from pipeline.result import ImageMetadata, NormalisedImage, Refusal, RefusalCode
from pipeline.validate import check_header, pixel_attribute_problem, read_metadata

logger = logging.getLogger(__name__)

PERCENTILE_LOW = 0.5
PERCENTILE_HIGH = 99.5
"""The robust window used when the image carries no VOI (percent of body pixels)."""

SATURATION_MEAN_MAX = 35
"""Seed 000: an X-ray's mean HSV saturation is below 35/255."""
SATURATION_HIGH = 60
SATURATION_HIGH_SHARE_MAX = 0.25
"""Seed 000: more than 25 % of pixels with saturation above 60/255 is a colour image."""

MAX_CLIPPED_SHARE = 0.98
"""A VOI window or LUT that sends more than 98 % of the pixels to pure black or white
misses the data (e.g. a window written for signed values on unsigned data): it would
give the models a blank image, so the percentile window is used instead, noted."""

DOCUMENT_CONVERSION_TYPES = frozenset({"SD"})
"""Conversion Type (0008,0064) "SD" = Scanned Document (PS3.3 C.8.6.1)."""

_THUMBNAIL_SIDE = 256


@dataclass(frozen=True)
class _Voi:
    """The VOI step folded into the table, and how it was chosen (for the notes)."""

    y: np.ndarray
    note: str


def prepare(ds: Dataset, max_side: int = 2048) -> NormalisedImage | Refusal:
    """Header check (:func:`pipeline.validate.check_header`), then :func:`load_image`.

    Parameters
    ----------
    ds
        The received data set, read leniently.
    max_side
        Longest side of the returned pixels.

    Returns
    -------
    NormalisedImage or Refusal
        Never raises for bad data.
    """
    refusal = check_header(ds)
    if refusal is not None:
        return refusal
    return load_image(ds, max_side=max_side)


def load_image(ds: Dataset, max_side: int = 2048) -> NormalisedImage | Refusal:
    """Decode the first frame of ``ds`` and normalise it (see the module docstring).

    Parameters
    ----------
    ds
        A data set with Pixel Data in any accepted transfer syntax; files read without
        File Meta Information (``force=True``) are decoded with the encoding pydicom
        read them in.
    max_side
        The longer side of ``pixels`` is at most this; larger images are area-downscaled.
        A JPEG 2000 image is decoded at the smallest resolution level whose longer side
        is still at least 70 % of ``max_side`` (PS3.5 A.4.4; see
        :data:`pipeline.decode.J2K_LEVEL_FRACTION`), then area-downscaled if needed.

    Returns
    -------
    NormalisedImage or Refusal
        ``source_shape`` is always the stored (Rows, Columns).  Refusal codes:
        ``BAD_PIXEL_ATTRIBUTES``, ``UNSUPPORTED_PHOTOMETRIC``, ``ABSURD_SIZE``,
        ``DECODE_FAILED``, ``COLOUR_IMAGE``, ``DOCUMENT``.  Never raises for bad data.
    """
    meta = read_metadata(ds)
    start = time.perf_counter()
    try:
        result = _load_image(ds, meta, max(1, int(max_side)))
        logger.debug(
            "load_image %s: %s in %.0f ms",
            meta.sop_instance_uid,
            result.code if isinstance(result, Refusal) else "; ".join(result.notes),
            (time.perf_counter() - start) * 1000.0,
        )
        return result
    except DecodeError as exc:
        logger.info("decode failed for %s: %s", meta.sop_instance_uid, exc)
        return Refusal(meta, RefusalCode.DECODE_FAILED, f"cannot decode Pixel Data: {exc}")
    except Exception as exc:  # never let one bad instance stop the study
        logger.warning("normalisation failed for %s: %s", meta.sop_instance_uid, exc, exc_info=True)
        return Refusal(
            meta, RefusalCode.DECODE_FAILED, f"cannot normalise: {type(exc).__name__}: {exc}"
        )


def _load_image(ds: Dataset, meta: ImageMetadata, max_side: int) -> NormalisedImage | Refusal:
    problem = pixel_attribute_problem(ds)
    if problem is not None:
        return Refusal(meta, problem[0], problem[1])
    notes: list[str] = []
    if meta.number_of_frames > 1:
        notes.append(f"first frame of {meta.number_of_frames} used")
    frame = decode_first_frame(ds, reduce_to=max_side)
    if frame.reduce_factor:
        notes.append(
            f"JPEG 2000 decoded at resolution level 1/{2**frame.reduce_factor}"
            f" ({frame.array.shape[1]}x{frame.array.shape[0]})"
        )
    rows, columns = meta.rows, meta.columns
    if frame.array.ndim == 3:
        grey, refusal_text = _colour_to_grey(frame.array)
        if grey is None:
            return Refusal(meta, RefusalCode.COLOUR_IMAGE, refusal_text)
        notes.append("grey RGB image converted to luminance")
        pixels, voi_note = _normalise_grey_rgb(grey)
    else:
        pixels, voi_note = _normalise_monochrome(ds, frame)
    notes.append(voi_note)
    pixels = _fit_max_side(pixels, max_side)
    document = _document_reason(ds, pixels)
    if document:
        return Refusal(meta, RefusalCode.DOCUMENT, document)
    return NormalisedImage(
        meta=meta, pixels=pixels, source_shape=(rows, columns), notes=tuple(notes)
    )


# -- grayscale pipeline (PS3.3 C.11) -------------------------------------------------


def _stored_domain(ds: Dataset) -> tuple[np.ndarray, int, int]:
    """All stored values for Bits Stored / Pixel Representation (PS3.3 C.7.6.3.1).

    Returns
    -------
    (values, offset, mask)
        ``values[i]`` is the stored value at table index ``i``; a stored sample ``v`` is
        at index ``(v + offset) & mask``.
    """
    bits_stored = int(ds.BitsStored)
    size = 1 << bits_stored
    if int(ds.PixelRepresentation) == 1:
        half = size >> 1
        return np.arange(-half, half, dtype=np.int64), half, size - 1
    return np.arange(size, dtype=np.int64), 0, size - 1


def _table_index(arr: np.ndarray, offset: int, mask: int) -> np.ndarray:
    """Index into the stored-value table for every sample (two's complement aware)."""
    if arr.dtype.itemsize == 1 and offset == 0:
        return arr.view(np.uint8) & np.uint8(mask) if mask < 255 else arr.view(np.uint8)
    if arr.dtype.itemsize == 1:
        arr = arr.astype(np.int16)
    u = arr.astype(np.uint16, copy=False) if arr.dtype.kind == "u" else arr.view(np.uint16)
    if offset:
        u = u + np.uint16(offset)
        u &= np.uint16(mask)
        return u
    return u & np.uint16(mask) if mask < 0xFFFF else u


def modality_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the Modality LUT (PS3.3 C.11.1) to stored values.

    The Modality LUT Sequence wins when present (as in pydicom and DCMTK); otherwise
    Rescale Slope/Intercept (C.11.1.1.2), identity when absent.
    """
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
    slope = _float(ds, "RescaleSlope", 1.0)
    intercept = _float(ds, "RescaleIntercept", 0.0)
    if slope == 0.0 or not math.isfinite(slope):
        slope = 1.0
    return values.astype(np.float64) * slope + intercept


def _float(ds: Dataset, keyword: str, default: float) -> float:
    try:
        value = ds.get(keyword, None)
        if value is None or value == "":
            return default
        if not isinstance(value, (int, float)) and hasattr(value, "__len__"):
            value = value[0]
        result = float(value)
    except Exception:
        return default
    return result if math.isfinite(result) else default


def voi_window(m: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The VOI window of PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT) and C.11.2.1.3 (SIGMOID).

    Returns values in [0, 1] (the standard's y_min..y_max with y_min = 0, y_max = 1).
    """
    c, w = center, width
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (m - c) / w, -700, 700)))
    if function == "LINEAR_EXACT":
        return np.clip((m - c) / w + 0.5, 0.0, 1.0)
    # LINEAR: x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 1; else
    # ((x - (c - 0.5)) / (w - 1) + 0.5).
    if w <= 1.0:
        return (m > c - 0.5).astype(np.float64)
    return np.clip((m - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


def _first_window(ds: Dataset) -> tuple[float, float, str] | None:
    """First Window Center/Width (PS3.3 C.11.2.1.2) and its VOI LUT Function, if valid."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center = _float(ds, "WindowCenter", math.nan)
    width = _float(ds, "WindowWidth", math.nan)
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if not (math.isfinite(center) and math.isfinite(width)):
        return None
    if width <= 0 or (function == "LINEAR" and width < 1):
        return None
    return center, width, function


def _voi_lut_sequence(m: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """First item of the VOI LUT Sequence (PS3.3 C.11.2.1.1), scaled to [0, 1]."""
    if "VOILUTSequence" not in ds or not len(ds.VOILUTSequence):
        return None
    from pydicom.pixels import apply_voi

    item = ds.VOILUTSequence[0]
    nbits = int(item.LUTDescriptor[2])
    # Feed the modality output as integers, as the LUT's input is (C.11.2.1.1).
    out = np.asarray(apply_voi(np.rint(m).astype(np.int64), ds, index=0), dtype=np.float64)
    top = float((1 << nbits) - 1)
    data_max = float(out.max()) if out.size else 0.0
    if 0 < data_max < top / 16:
        # Descriptor claims more bits than the data use (a known writer bug; DCMTK's +Mv).
        top = float((1 << int(data_max).bit_length()) - 1)
    return np.clip(out / max(top, 1.0), 0.0, 1.0)


def _normalise_monochrome(ds: Dataset, frame: DecodedFrame) -> tuple[np.ndarray, str]:
    """Stored values -> Modality LUT -> VOI -> MONOCHROME1 inversion, as one table."""
    values, offset, mask = _stored_domain(ds)
    index = _table_index(frame.array, offset, mask)
    m = modality_lut(values, ds)
    voi = _choose_voi(ds, m, index, offset, mask)
    y = voi.y
    note = voi.note
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        y = 1.0 - y
        note += "; MONOCHROME1 inverted"
    table = np.ascontiguousarray(y, dtype=np.float32)
    return table[index], note


def _choose_voi(ds: Dataset, m: np.ndarray, index: np.ndarray, offset: int, mask: int) -> _Voi:
    step = max(1, int(math.sqrt(index.size / 1_000_000)))
    counts = np.bincount(index[::step, ::step].ravel(), minlength=m.size)[: m.size]
    missed = ""
    window = _first_window(ds)
    if window is not None:
        c, w, function = window
        y = voi_window(m, c, w, function)
        clipped = _clipped_share(y, counts)
        if clipped <= MAX_CLIPPED_SHARE:
            return _Voi(y, f"VOI window {c:g}/{w:g} {function}")
        missed = f"VOI window {c:g}/{w:g} misses the data ({100 * clipped:.1f} % clipped); "
    else:
        lut = _voi_lut_sequence(m, ds)
        if lut is not None:
            clipped = _clipped_share(lut, counts)
            if clipped <= MAX_CLIPPED_SHARE:
                return _Voi(lut, "VOI LUT Sequence item 1")
            missed = f"VOI LUT Sequence misses the data ({100 * clipped:.1f} % clipped); "
    lo, hi = _body_percentile_window(ds, m, index, offset, mask)
    y = np.clip((m - lo) / (hi - lo), 0.0, 1.0)
    prefix = missed or "no VOI: "
    return _Voi(y, f"{prefix}percentile window {lo:g}..{hi:g} over the body")


def _clipped_share(y: np.ndarray, counts: np.ndarray) -> float:
    """Share of sampled pixels the VOI maps to its very bottom or top."""
    total = float(counts.sum())
    if total == 0:
        return 0.0
    lo, hi = float(y.min()), float(y.max())
    at_ends = (y <= lo + 1e-6) | (y >= hi - 1e-6)
    return float(counts[at_ends].sum()) / total


def _body_percentile_window(
    ds: Dataset, m: np.ndarray, index: np.ndarray, offset: int, mask: int
) -> tuple[float, float]:
    """A robust window over the body (the 0.5th..99.5th percentile of modality values).

    Samples on a sparse grid (about a million pixels), drops flat collimator borders
    (rows/columns at the edges whose spread is under 2 % of the image's) and the Pixel
    Padding Value/Range Limit (PS3.3 C.7.5.1.1.2, compared with stored values).
    """
    step = max(1, int(math.sqrt(index.size / 1_000_000)))
    sample = index[::step, ::step]
    sample = _strip_flat_borders(sample, m)
    counts = np.bincount(sample.ravel(), minlength=m.size)[: m.size].astype(np.float64)
    if "PixelPaddingValue" in ds:
        pad = _float(ds, "PixelPaddingValue", math.nan)
        limit = _float(ds, "PixelPaddingRangeLimit", pad)
        if math.isfinite(pad):
            lo_v, hi_v = sorted((int(pad), int(limit if math.isfinite(limit) else pad)))
            i0, i1 = max(lo_v + offset, 0), min(hi_v + offset, mask)
            if i0 <= i1:
                counts[i0 : i1 + 1] = 0
    if counts.sum() == 0:
        everything = np.bincount(index[::step, ::step].ravel(), minlength=m.size)[: m.size]
        counts = everything.astype(np.float64)
    order = np.argsort(m, kind="stable")
    cumulative = np.cumsum(counts[order])
    total = cumulative[-1]
    lo = float(m[order[np.searchsorted(cumulative, total * PERCENTILE_LOW / 100.0)]])
    hi_pos = min(np.searchsorted(cumulative, total * PERCENTILE_HIGH / 100.0), m.size - 1)
    hi = float(m[order[hi_pos]])
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _strip_flat_borders(sample: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Cut flat bands (collimator shadows, burned-in frames) off the sample's edges."""
    values = m[sample]
    p1, p99 = np.percentile(values, [1, 99])
    tolerance = max(0.02 * float(p99 - p1), 1e-9)
    rows_std = values.std(axis=1)
    cols_std = values.std(axis=0)
    top, bottom = _flat_run(rows_std, tolerance), _flat_run(rows_std[::-1], tolerance)
    left, right = _flat_run(cols_std, tolerance), _flat_run(cols_std[::-1], tolerance)
    cut = sample[top : sample.shape[0] - bottom, left : sample.shape[1] - right]
    return cut if cut.size >= 0.1 * sample.size else sample


def _flat_run(stds: np.ndarray, tolerance: float) -> int:
    """Length of the run of flat lines from the start, at most a third of them."""
    limit = len(stds) // 3
    flat = stds[:limit] < tolerance
    return int(limit if flat.all() else np.argmin(flat))


def _fit_max_side(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """Area-downscale so the longer side is at most ``max_side`` (aspect kept)."""
    rows, columns = pixels.shape
    longer = max(rows, columns)
    if longer <= max_side:
        return np.ascontiguousarray(pixels, dtype=np.float32)
    scale = max_side / float(longer)
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    out = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    return np.clip(out, 0.0, 1.0, out=out)


# -- colour and documents --------------------------------------------------------------


def _thumbnail(arr: np.ndarray, side: int = _THUMBNAIL_SIDE) -> np.ndarray:
    rows, columns = arr.shape[:2]
    scale = side / float(max(rows, columns))
    if scale >= 1.0:
        return arr
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    return cv2.resize(arr, size, interpolation=cv2.INTER_AREA)


def saturation_stats(rgb: np.ndarray) -> tuple[float, float]:
    """Seed 000's HSV statistics of an 8-bit RGB image: mean saturation (0-255) and the
    share of pixels with saturation above :data:`SATURATION_HIGH`."""
    small = np.ascontiguousarray(_thumbnail(np.ascontiguousarray(rgb, dtype=np.uint8), 512))
    saturation = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)[..., 1]
    return float(saturation.mean()), float((saturation > SATURATION_HIGH).mean())


def _colour_to_grey(rgb: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Refuse a colour photograph/screenshot, or return the luminance of a grey RGB image."""
    mean_s, high_share = saturation_stats(rgb)
    if mean_s > SATURATION_MEAN_MAX or high_share > SATURATION_HIGH_SHARE_MAX:
        return None, (
            f"colour image: mean HSV saturation {mean_s:.0f}/255 (limit {SATURATION_MEAN_MAX}),"
            f" {100 * high_share:.0f} % of pixels above {SATURATION_HIGH}"
            f" (limit {100 * SATURATION_HIGH_SHARE_MAX:.0f} %)"
        )
    grey = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
    return grey, ""


def _normalise_grey_rgb(grey: np.ndarray) -> tuple[np.ndarray, str]:
    """A grey RGB image's luminance, percentile-windowed (RGB carries no VOI, C.11.2)."""
    step = max(1, int(math.sqrt(grey.size / 1_000_000)))
    lo, hi = np.percentile(grey[::step, ::step], [PERCENTILE_LOW, PERCENTILE_HIGH])
    hi = max(float(hi), float(lo) + 1.0)
    table = np.clip((np.arange(256, dtype=np.float64) - lo) / (hi - lo), 0, 1).astype(np.float32)
    return table[grey], f"no VOI: percentile window {lo:g}..{hi:g} of luminance"


def document_stats(pixels: np.ndarray) -> tuple[float, float, float, float]:
    """Statistics of a 256-pixel thumbnail used by the document check.

    Returns
    -------
    (white, mid, dark, stroke)
        Shares of paper-white (> 0.85), mid-grey (0.5-0.85) and dark (< 0.5) pixels,
        and the share of dark pixels that touch a white one (thin strokes: text, lines).
    """
    small = _thumbnail(pixels, 512)  # thin pen strokes survive at this size
    white_mask = small > 0.85
    dark_mask = small < 0.5
    white = float(white_mask.mean())
    dark = float(dark_mask.mean())
    near_white = cv2.dilate(white_mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    stroke = float((dark_mask & near_white).sum()) / max(1.0, float(dark_mask.sum()))
    return white, 1.0 - white - dark, dark, stroke


def _document_reason(ds: Dataset, pixels: np.ndarray) -> str | None:
    """Why the image looks like a document or scanned page, or ``None``.

    Header: Conversion Type SD (Scanned Document).  Pixels, after normalisation: a page
    is mostly paper-white with few mid-greys and some dark strokes (text, lines), while a
    radiograph with bone bright is mostly dark-to-mid grey: its bright areas are bone or
    collimation, never more than half the image with text-like dark marks inside.
    """
    conversion = str(ds.get("ConversionType", "") or "").strip().upper()
    if conversion in DOCUMENT_CONVERSION_TYPES:
        return f"Conversion Type {conversion}: scanned document"
    white, mid, dark, stroke = document_stats(pixels)
    if white > 0.5 and mid < 0.2 and 0.003 < dark < 0.4 and stroke > 0.3:
        return (
            f"document-like page: {100 * white:.0f} % paper-white, {100 * mid:.0f} % mid-grey,"
            f" {100 * dark:.0f} % dark, {100 * stroke:.0f} % of it in thin strokes"
        )
    return None
