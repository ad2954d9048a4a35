"""Fit a normalised radiograph into the square model grid without stretching it.

The longer side is scaled to ``size`` (area interpolation when shrinking, which is
the usual case for radiographs, linear when enlarging), the shorter side is centred
and padded with zeros (black, i.e. background after normalisation).  The returned
:class:`~pipeline.result.GridTransform` maps model-grid maps back to the image.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.result import GridTransform, ModelInput, NormalisedImage


def fit_square(pixels: np.ndarray, size: int) -> tuple[np.ndarray, GridTransform]:
    """Scale ``pixels`` (2-D float32) into a ``size`` x ``size`` square, keeping aspect.

    Parameters
    ----------
    pixels
        2-D array, any numeric type; returned as float32.
    size
        Side of the model grid in pixels.

    Returns
    -------
    (array, transform)
        The padded square and the transform back to ``pixels.shape``.
    """
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ValueError(f"expected a non-empty 2-D image, got shape {pixels.shape}")
    rows, cols = pixels.shape
    scale = size / float(max(rows, cols))
    new_rows = max(1, min(size, int(round(rows * scale))))
    new_cols = max(1, min(size, int(round(cols * scale))))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    src = np.ascontiguousarray(pixels, dtype=np.float32)
    resized = cv2.resize(src, (new_cols, new_rows), interpolation=interpolation)
    pad_top = (size - new_rows) // 2
    pad_left = (size - new_cols) // 2
    out = np.zeros((size, size), dtype=np.float32)
    out[pad_top : pad_top + new_rows, pad_left : pad_left + new_cols] = resized
    transform = GridTransform(
        size=size, scale=scale, pad_top=pad_top, pad_left=pad_left, image_shape=(rows, cols)
    )
    return out, transform


def to_model_input(image: NormalisedImage, size: int) -> ModelInput:
    """The model's view of a :class:`NormalisedImage` (see :func:`fit_square`)."""
    array, transform = fit_square(image.pixels, size)
    return ModelInput(array=array, transform=transform)
