"""Grad-CAM for models with a global-average-pooling + dense head.

For ``logit_c = sum_k W[k, c] * mean_ij A[i, j, k] + b_c`` the gradient of the class
logit with respect to the last feature map is ``W[k, c] / (h * w)`` at every position,
so Grad-CAM's channel weights (the spatial mean of that gradient) are the head kernel
divided by ``h * w`` and the map is ``ReLU(sum_k W[k, c] A[:, :, k]) / (h * w)``: a
closed form of the same forward pass, no backward pass.  Maps are normalised to
[0, 1] by their maximum (all zero when nothing is positive).

:func:`gradcam_tape` is the reference with ``tf.GradientTape``, used by the tests.
Both run the model in inference mode (dropout off, batch norm on moving statistics).
"""

from __future__ import annotations

import logging
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)


def _normalise(cams: np.ndarray) -> np.ndarray:
    peak = cams.reshape(len(cams), -1).max(axis=1)
    safe = np.where(peak > 0, peak, 1.0)
    return (cams / safe[:, None, None]).astype(np.float32)


def gradcam_closed_form(
    features: np.ndarray, head_kernel: np.ndarray, class_index: int | np.ndarray
) -> np.ndarray:
    """Grad-CAM from the feature map and the dense head's kernel.

    Parameters
    ----------
    features
        ``(batch, h, w, channels)`` output of the last convolutional block.
    head_kernel
        ``(channels, n_logits)`` kernel of the dense layer after global average pooling.
    class_index
        Logit to explain, one for all images or one per image.

    Returns
    -------
    np.ndarray
        ``(batch, h, w)`` float32 maps in [0, 1] on the feature grid.
    """
    feats = np.asarray(features, dtype=np.float32)
    b, h, w, _ = feats.shape
    idx = np.broadcast_to(np.asarray(class_index), (b,))
    weights = np.asarray(head_kernel, dtype=np.float32)[:, idx].T / float(h * w)  # (b, C)
    cams = np.maximum(np.einsum("bhwc,bc->bhw", feats, weights), 0.0)
    return _normalise(cams)


def gradcam_tape(model: Any, x: np.ndarray, class_index: int, feature_output: int = 1) -> np.ndarray:
    """Reference Grad-CAM with ``tf.GradientTape`` (for tests, not for the node).

    ``model(x)`` must return ``[logits, feature_map]``; the gradient of
    ``logits[:, class_index]`` with respect to the feature map is averaged spatially
    to weight the channels, as in Selvaraju et al.
    """
    import tensorflow as tf

    xt = tf.convert_to_tensor(np.asarray(x, dtype=np.float32))
    with tf.GradientTape() as tape:
        outputs = model(xt, training=False)
        logits, feats = outputs[0], outputs[feature_output]
        tape.watch(feats)
        score = tf.reduce_sum(logits[:, class_index])
    grads = tape.gradient(score, feats)
    alpha = tf.reduce_mean(grads, axis=(1, 2))  # (b, C)
    cams = tf.nn.relu(tf.einsum("bhwc,bc->bhw", feats, alpha))
    return _normalise(np.asarray(cams))


def upsample(cams: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resampling of ``(batch, h, w)`` maps to ``(batch, size, size)`` in [0, 1]."""
    out = np.empty((len(cams), size, size), dtype=np.float32)
    for i, cam in enumerate(cams):
        out[i] = cv2.resize(np.ascontiguousarray(cam, dtype=np.float32), (size, size),
                            interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)
