"""Decode the first frame of a DICOM image's Pixel Data, in any transfer syntax we accept.

This module only turns bytes into stored pixel values (PS3.5 8 "Encoding of Pixel,
Overlay and Waveform Data"); it applies no LUT.  :mod:`pipeline.normalise` does the
rest.  Three paths:

- native (uncompressed) Pixel Data, little or big endian, implicit or explicit VR, and
  Deflated Explicit VR Little Endian (pydicom has already inflated the data set):
  viewed with numpy directly, which also covers data sets read without a File Meta
  Information header (``dcmread(force=True)``), whose encoding pydicom remembers;
- JPEG 2000 (PS3.5 A.4.4, A.4.5) single-component: decoded with the system OpenJPEG
  library through :mod:`ctypes` so that a *reduced resolution level* can be decoded
  (``opj_set_decoded_resolution_factor``, PS3.5 A.4.4 / ISO 15444-1 B.5: each level
  halves both sides) with two decoder threads.  The models only need a few hundred
  pixels, and a full decode of a large radiograph costs most of our time budget;
- everything else (JPEG baseline/extended/lossless, JPEG-LS, RLE, colour JPEG 2000,
  odd Bits Allocated): pydicom's own decoders with the pylibjpeg plugins, first frame
  only (``index=0``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

logger = logging.getLogger(__name__)

NATIVE_LITTLE_ENDIAN = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
"""Transfer syntaxes whose Pixel Data is native little endian once read (PS3.5 A.1-A.5)."""

JPEG2000_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})
"""JPEG 2000 Image Compression (Lossless Only) and JPEG 2000 Image Compression (PS3.5 A.4.4)."""

JPEGLS_SYNTAXES = frozenset({JPEGLSLossless, JPEGLSNearLossless})
"""JPEG-LS (PS3.5 A.4.3): decoded with CharLS (pyjpegls), about 4x faster here than
libjpeg's JPEG-LS decoder, which is the fallback."""


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


_HAVE_PYJPEGLS = _has_module("jpeg_ls")

JPEG_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
        "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4), 12-bit
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Process 14, Selection Value 1
    }
)
"""ISO 10918-1 JPEG (PS3.5 A.4.1, A.4.2): decoded with libjpeg-turbo 3 (imagecodecs), which
decodes 16-bit lossless JPEG 5-7x faster than pylibjpeg-libjpeg here, bit-exact; the
pylibjpeg plugin is the fallback.  Lossy JPEG decoders may differ by one grey level (IDCT
rounding), which ISO 10918-2 allows."""

_HAVE_IMAGECODECS = _has_module("imagecodecs")

J2K_LEVEL_FRACTION = 0.7
"""A JPEG 2000 resolution level is used when its longer side is still at least this share
of ``max_side``: e.g. a 3000-pixel image for ``max_side`` 2048 is decoded at 1500 pixels
(4x less entropy decoding), for ``max_side`` 1024 at 750.  The models see a few hundred
pixels; the heat-map Secondary Capture is at most ``max_side`` and is shown scaled."""


class DecodeError(Exception):
    """The Pixel Data could not be decoded; the message says why."""


@dataclass(frozen=True)
class DecodedFrame:
    """Stored values of the first frame.

    ``array`` is 2-D (Rows, Columns) for one sample per pixel, or 3-D (Rows, Columns, 3)
    for colour (already converted to RGB when the data were YBR).  ``reduce_factor`` is
    the JPEG 2000 resolution reduction that was decoded (0: full resolution; r: each side
    divided by 2**r, rounded up).
    """

    array: np.ndarray
    transfer_syntax_uid: str
    reduce_factor: int = 0


def transfer_syntax_of(ds: Dataset) -> UID:
    """The transfer syntax of ``ds``'s Pixel Data.

    Taken from the File Meta Information (PS3.10 7.1) when present, otherwise from the
    encoding pydicom used to read the data set (an ACR-NEMA style file read with
    ``force=True`` is implicit VR little endian).

    Raises
    ------
    DecodeError
        When there is no File Meta transfer syntax and the encoding is unknown.
    """
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = getattr(file_meta, "TransferSyntaxUID", None) if file_meta is not None else None
    if tsyntax:
        return UID(str(tsyntax))
    is_implicit, is_little = ds.original_encoding
    if is_implicit is None or is_little is None:
        raise DecodeError("no Transfer Syntax UID in the file meta and unknown encoding")
    if not is_little:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if is_implicit else ExplicitVRLittleEndian


def decode_first_frame(ds: Dataset, reduce_to: int | None = None) -> DecodedFrame:
    """Decode the first frame of ``ds`` to stored pixel values.

    Parameters
    ----------
    ds
        The data set; its pixel attributes (PS3.3 C.7.6.3) must already have been
        checked (``pipeline.validate.pixel_attribute_problem``).
    reduce_to
        When given, a JPEG 2000 image may be decoded at the smallest resolution level
        whose longer side is still at least ``reduce_to`` pixels.  Other syntaxes
        always decode at full resolution.

    Returns
    -------
    DecodedFrame

    Raises
    ------
    DecodeError
        For any decoding failure (truncated or corrupt data, unknown syntax).
    """
    tsyntax = transfer_syntax_of(ds)
    try:
        if "PixelData" not in ds:
            raise DecodeError("no Pixel Data (7FE0,0010)")
        if not tsyntax.is_encapsulated:
            arr = _decode_native(ds, tsyntax)
            return DecodedFrame(arr, str(tsyntax))
        frame = _first_fragmented_frame(ds)
        _check_codestream(frame, tsyntax, ds)
        if tsyntax in JPEG2000_SYNTAXES and int(ds.SamplesPerPixel) == 1 and _openjp2 is not None:
            reduce = 0
            if reduce_to is not None:
                longer = max(int(ds.Rows), int(ds.Columns))
                floor = J2K_LEVEL_FRACTION * reduce_to
                while math.ceil(longer / 2 ** (reduce + 1)) >= floor and reduce < 5:
                    reduce += 1
            arr, reduce = decode_j2k(frame, reduce)
            arr = _fix_j2k_signedness(arr, ds)
            expected = (
                math.ceil(int(ds.Rows) / 2**reduce),
                math.ceil(int(ds.Columns) / 2**reduce),
            )
            if arr.shape != expected:
                raise DecodeError(
                    f"JPEG 2000 codestream is {arr.shape[1]}x{arr.shape[0]} at level {reduce},"
                    f" Rows/Columns say {expected[1]}x{expected[0]}"
                )
            return DecodedFrame(arr, str(tsyntax), reduce)
        if tsyntax in JPEG_SYNTAXES and int(ds.SamplesPerPixel) == 1 and _HAVE_IMAGECODECS:
            turbo = _decode_jpeg_turbo(frame, ds)
            if turbo is not None:
                return DecodedFrame(turbo, str(tsyntax))
        arr = _decode_with_pydicom(ds, tsyntax)
        return DecodedFrame(arr, str(tsyntax))
    except DecodeError:
        raise
    except Exception as exc:  # decoders raise anything: ValueError, RuntimeError, ...
        raise DecodeError(f"{type(exc).__name__}: {exc}") from exc


# -- native ------------------------------------------------------------------------


def _decode_native(ds: Dataset, tsyntax: UID) -> np.ndarray:
    """View native Pixel Data (PS3.5 8.1.1, 8.2) as a numpy array, first frame only."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.SamplesPerPixel)
    bits_allocated = int(ds.BitsAllocated)
    signed = int(ds.PixelRepresentation) == 1
    if bits_allocated not in (8, 16, 32):
        return _decode_with_pydicom(ds, tsyntax)
    big = tsyntax == ExplicitVRBigEndian
    if big and bits_allocated == 8:
        # OW words hold byte pairs swapped in big endian: let pydicom sort that out.
        return _decode_with_pydicom(ds, tsyntax)
    nbytes = bits_allocated // 8
    frame_len = rows * columns * samples * nbytes
    raw = ds.PixelData
    if len(raw) < frame_len:
        raise DecodeError(
            f"Pixel Data holds {len(raw)} bytes, one {columns}x{rows}x{samples} frame of"
            f" {bits_allocated}-bit samples needs {frame_len}"
        )
    dtype = np.dtype(f"{'>' if big else '<'}{'i' if signed else 'u'}{nbytes}")
    arr = np.frombuffer(raw, dtype=dtype, count=rows * columns * samples)
    if big:
        arr = arr.astype(dtype.newbyteorder("="))
    if samples == 1:
        return arr.reshape(rows, columns)
    if int(ds.get("PlanarConfiguration", 0)) == 1:
        arr = arr.reshape(samples, rows, columns).transpose(1, 2, 0)
    else:
        arr = arr.reshape(rows, columns, samples)
    if str(ds.PhotometricInterpretation).startswith("YBR"):
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(np.ascontiguousarray(arr), "YBR_FULL", "RGB")
    return np.ascontiguousarray(arr)


def _first_fragmented_frame(ds: Dataset) -> bytes:
    """The encoded bytes of frame 1 of encapsulated Pixel Data (PS3.5 A.4)."""
    from pydicom.encaps import get_frame

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return bytes(get_frame(ds.PixelData, 0, number_of_frames=frames))


def _check_codestream(frame: bytes, tsyntax: UID, ds: Dataset) -> None:
    """Refuse a truncated or mismatched JPEG / JPEG-LS / JPEG 2000 frame (PS3.5 A.4).

    Each such frame is one complete codestream, which ends with the EOI / EOC marker
    (FFD9; the entropy-coded data can never contain it thanks to byte stuffing), allowing
    for trailing padding.  Decoders would otherwise return a partly grey image from a
    truncated stream without complaint.  For JPEG and JPEG-LS the frame header (SOF /
    SOF55) must also agree with Rows and Columns.
    """
    is_rle = tsyntax == "1.2.840.10008.1.2.5"
    if tsyntax.is_encapsulated and not is_rle and b"\xff\xd9" not in frame[-16:]:
        raise DecodeError(
            f"frame 1 codestream ({len(frame)} bytes) has no end marker FFD9:"
            " truncated or corrupt"
        )
    if tsyntax in JPEG2000_SYNTAXES or not frame.startswith(b"\xff\xd8"):
        return
    from pydicom.pixels.utils import _get_jpg_parameters

    info = _get_jpg_parameters(frame)
    height, width = info.get("height"), info.get("width")
    if height is None or width is None:
        raise DecodeError("JPEG frame header (SOF) not found")
    if (height, width) != (int(ds.Rows), int(ds.Columns)):
        raise DecodeError(
            f"JPEG frame is {width}x{height}, Rows/Columns say {ds.Columns}x{ds.Rows}"
        )


def _decode_jpeg_turbo(frame: bytes, ds: Dataset) -> np.ndarray | None:
    """Decode a single-component ISO 10918-1 frame with libjpeg-turbo (imagecodecs).

    Returns ``None`` (use the fallback decoder) when libjpeg-turbo refuses the stream;
    sample values are returned as stored (signed data keep their two's complement bits,
    which :mod:`pipeline.normalise` reads with Bits Stored).
    """
    import imagecodecs

    try:
        arr = imagecodecs.jpeg8_decode(frame)
    except Exception as exc:  # e.g. an arithmetic-coded or hierarchical process
        logger.debug("libjpeg-turbo could not decode (%s); using pylibjpeg", exc)
        return None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.shape != (int(ds.Rows), int(ds.Columns)):
        raise DecodeError(
            f"JPEG frame decodes to {arr.shape}, Rows/Columns say {ds.Rows}x{ds.Columns}"
        )
    return arr


def _decode_with_pydicom(ds: Dataset, tsyntax: UID) -> np.ndarray:
    """Decode frame 1 with pydicom's decoders (pylibjpeg plugins), converting YBR to RGB."""
    from pydicom.pixels import pixel_array

    plugin = "pyjpegls" if tsyntax in JPEGLS_SYNTAXES and _HAVE_PYJPEGLS else ""
    meta_tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if meta_tsyntax:
        return pixel_array(ds, index=0, decoding_plugin=plugin)
    # No file meta: decode a shallow copy that carries the transfer syntax, leaving
    # the caller's data set untouched.
    copy = Dataset()
    copy.update(ds)
    copy.file_meta = pydicom.dataset.FileMetaDataset()
    copy.file_meta.TransferSyntaxUID = tsyntax
    return pixel_array(copy, index=0, decoding_plugin=plugin)


def _fix_j2k_signedness(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Reconcile the codestream's sign with Pixel Representation (PS3.5 8.2.4 note).

    The DICOM attributes win, as pydicom does: unsigned data in a signed codestream are
    reinterpreted, and vice versa, keeping Bits Stored bits.
    """
    signed = int(ds.PixelRepresentation) == 1
    bits_stored = int(ds.BitsStored)
    if int(ds.BitsAllocated) > 16:
        return arr.astype(np.int32 if signed else np.uint32)
    if signed:
        out = arr.astype(np.int16, copy=False)
        if bits_stored < 16 and not np.issubdtype(arr.dtype, np.signedinteger):
            shift = 16 - bits_stored
            out = (out << shift) >> shift
        return out
    return arr.astype(np.uint16, copy=False) if arr.dtype != np.uint8 else arr


# -- JPEG 2000 via libopenjp2 --------------------------------------------------------


class _OpjImageComp(ctypes.Structure):
    _fields_ = [
        ("dx", ctypes.c_uint32),
        ("dy", ctypes.c_uint32),
        ("w", ctypes.c_uint32),
        ("h", ctypes.c_uint32),
        ("x0", ctypes.c_uint32),
        ("y0", ctypes.c_uint32),
        ("prec", ctypes.c_uint32),
        ("bpp", ctypes.c_uint32),
        ("sgnd", ctypes.c_uint32),
        ("resno_decoded", ctypes.c_uint32),
        ("factor", ctypes.c_uint32),
        ("data", ctypes.POINTER(ctypes.c_int32)),
        ("alpha", ctypes.c_uint16),
    ]


class _OpjImage(ctypes.Structure):
    _fields_ = [
        ("x0", ctypes.c_uint32),
        ("y0", ctypes.c_uint32),
        ("x1", ctypes.c_uint32),
        ("y1", ctypes.c_uint32),
        ("numcomps", ctypes.c_uint32),
        ("color_space", ctypes.c_int),
        ("comps", ctypes.POINTER(_OpjImageComp)),
        ("icc_profile_buf", ctypes.c_void_p),
        ("icc_profile_len", ctypes.c_uint32),
    ]


_READ_FN = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP_FN = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
_MSG_FN = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)
_DPARAMETERS_SIZE = 1 << 16
"""Bytes reserved for ``opj_dparameters_t`` (about 8.3 kB in OpenJPEG 2.5); the library
fills it with ``opj_set_default_decoder_parameters`` so we never depend on its layout."""


def _load_openjp2() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("openjp2") or "libopenjp2.so.7"
    try:
        lib = ctypes.CDLL(name)
        version = lib.opj_version
        version.restype = ctypes.c_char_p
        major, minor = (int(x) for x in version().decode().split(".")[:2])
    except (OSError, AttributeError, ValueError):
        logger.info("libopenjp2 not found: JPEG 2000 decodes at full resolution via pydicom")
        return None
    if (major, minor) < (2, 3):
        logger.info("libopenjp2 %d.%d too old for reduced decoding", major, minor)
        return None
    lib.opj_create_decompress.restype = ctypes.c_void_p
    lib.opj_create_decompress.argtypes = [ctypes.c_int]
    lib.opj_set_default_decoder_parameters.argtypes = [ctypes.c_void_p]
    lib.opj_setup_decoder.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.opj_codec_set_threads.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.opj_set_error_handler.argtypes = [ctypes.c_void_p, _MSG_FN, ctypes.c_void_p]
    lib.opj_stream_create.restype = ctypes.c_void_p
    lib.opj_stream_create.argtypes = [ctypes.c_size_t, ctypes.c_int]
    lib.opj_stream_set_read_function.argtypes = [ctypes.c_void_p, _READ_FN]
    lib.opj_stream_set_skip_function.argtypes = [ctypes.c_void_p, _SKIP_FN]
    lib.opj_stream_set_seek_function.argtypes = [ctypes.c_void_p, _SEEK_FN]
    lib.opj_stream_set_user_data_length.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    lib.opj_read_header.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.POINTER(_OpjImage)),
    ]
    lib.opj_set_decoded_resolution_factor.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.opj_decode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(_OpjImage)]
    lib.opj_end_decompress.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.opj_stream_destroy.argtypes = [ctypes.c_void_p]
    lib.opj_destroy_codec.argtypes = [ctypes.c_void_p]
    lib.opj_image_destroy.argtypes = [ctypes.POINTER(_OpjImage)]
    return lib


_openjp2 = _load_openjp2()
_J2K_THREADS = 2


def _codec_format(data: bytes) -> int:
    """OPJ_CODEC_J2K (0) for a raw codestream, OPJ_CODEC_JP2 (2) for a JP2 file."""
    return 2 if data[4:8] == b"jP  " or data[:4] == b"\x00\x00\x00\x0c" else 0


def decode_j2k(data: bytes, reduce: int = 0) -> tuple[np.ndarray, int]:
    """Decode a single-component JPEG 2000 codestream, optionally at a reduced level.

    Parameters
    ----------
    data
        The codestream (one DICOM frame, PS3.5 A.4.4).
    reduce
        Number of resolution levels to discard (ISO 15444-1: each halves both sides).
        Lowered automatically when the codestream has fewer decomposition levels.

    Returns
    -------
    (array, reduce)
        The decoded component (uint8/uint16/int16/int32) and the level actually used.

    Raises
    ------
    DecodeError
        If OpenJPEG reports an error.
    """
    lib = _openjp2
    if lib is None:
        raise DecodeError("libopenjp2 is not available")
    errors: list[str] = []
    pos = [0]
    size = len(data)
    src = ctypes.create_string_buffer(data, size)
    base = ctypes.addressof(src)

    def read(buf: int, nbytes: int, _user: int) -> int:
        left = size - pos[0]
        if left <= 0:
            return ctypes.c_size_t(-1).value
        n = min(nbytes, left)
        ctypes.memmove(buf, base + pos[0], n)
        pos[0] += n
        return n

    def skip(nbytes: int, _user: int) -> int:
        n = max(-pos[0], min(nbytes, size - pos[0]))
        pos[0] += n
        return n

    def seek(offset: int, _user: int) -> int:
        if 0 <= offset <= size:
            pos[0] = offset
            return 1
        return 0

    def on_error(msg: bytes, _user: int) -> None:
        errors.append(msg.decode(errors="replace").strip())

    read_cb, skip_cb, seek_cb, err_cb = (
        _READ_FN(read),
        _SKIP_FN(skip),
        _SEEK_FN(seek),
        _MSG_FN(on_error),
    )
    while True:
        codec = lib.opj_create_decompress(_codec_format(data))
        stream = lib.opj_stream_create(1 << 20, 1)
        image = ctypes.POINTER(_OpjImage)()
        pos[0] = 0
        try:
            params = ctypes.create_string_buffer(_DPARAMETERS_SIZE)
            lib.opj_set_default_decoder_parameters(params)
            lib.opj_set_error_handler(codec, err_cb, None)
            if not lib.opj_setup_decoder(codec, params):
                raise DecodeError("opj_setup_decoder failed")
            lib.opj_codec_set_threads(codec, _J2K_THREADS)
            lib.opj_stream_set_read_function(stream, read_cb)
            lib.opj_stream_set_skip_function(stream, skip_cb)
            lib.opj_stream_set_seek_function(stream, seek_cb)
            lib.opj_stream_set_user_data_length(stream, size)
            if not lib.opj_read_header(stream, codec, ctypes.byref(image)):
                raise DecodeError("JPEG 2000 header: " + ("; ".join(errors) or "unreadable"))
            if reduce and not lib.opj_set_decoded_resolution_factor(codec, reduce):
                reduce -= 1
                errors.clear()
                continue
            if not lib.opj_decode(codec, stream, image) or not lib.opj_end_decompress(
                codec, stream
            ):
                raise DecodeError("JPEG 2000 decode: " + ("; ".join(errors) or "failed"))
            img = image.contents
            if img.numcomps < 1:
                raise DecodeError("JPEG 2000 codestream has no component")
            comp = img.comps[0]
            h, w = int(comp.h), int(comp.w)
            if h * w == 0 or not comp.data:
                raise DecodeError("JPEG 2000 component is empty")
            values = np.ctypeslib.as_array(comp.data, shape=(h, w))
            prec, sgnd = int(comp.prec), bool(comp.sgnd)
            if prec <= 8:
                dtype: type[np.integer] = np.int8 if sgnd else np.uint8
            elif prec <= 16:
                dtype = np.int16 if sgnd else np.uint16
            else:
                dtype = np.int32
            return values.astype(dtype), reduce
        finally:
            if image:
                lib.opj_image_destroy(image)
            lib.opj_stream_destroy(stream)
            lib.opj_destroy_codec(codec)
