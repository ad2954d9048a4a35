"""A functional Keras MobileNetV2 that matches torchvision's layout exactly.

Keras's own ``MobileNetV2`` pads its stride-2 convolutions asymmetrically
(``correct_pad``), so torchvision's ImageNet weights do not carry over.  Here every
3x3 convolution is ``ZeroPadding2D(1)`` + ``'valid'`` (torch's symmetric padding) and
batch normalisation uses torch's epsilon 1e-5.  Layer names follow the torch
state-dict keys (``features.3.conv.1.0`` -> ``f3_c1_conv``), which is what
:mod:`models.port_mobilenet` relies on.

The input is a one-channel image in [0, 1] (bone bright); a fixed, non-trainable
1x1 convolution turns it into the three ImageNet-normalised channels the weights
were trained on, so a saved model needs no preprocessing code.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
from keras import layers

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # keras convention (torch momentum 0.1)

# (expansion t, output channels c, repeats n, first stride s) as in torchvision
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
FEATURE_LAYER = "f18_relu"
"""Name of the last convolutional activation (7x7x1280 at 224 px): Grad-CAM's map."""
BACKBONE_FILE = "mobilenet_v2_imagenet_backbone.npz"
"""The ported ImageNet backbone in ``models/weights`` (``models/port_mobilenet.py``)."""
ARCHITECTURE = ("MobileNetV2 (torchvision layout, ImageNet init ported from mobilenet_v2-b0353104.pth), "
                "GAP + dropout + dense head")
"""The registry's architecture text of a model built here (output stride 32)."""


def _conv_bn(
    x: keras.KerasTensor,
    filters: int,
    kernel: int,
    stride: int,
    name: str,
    depthwise: bool = False,
    relu: bool = True,
    dilation: int = 1,
) -> keras.KerasTensor:
    """Conv (torch padding) + BN (+ ReLU6), named ``{name}_conv`` / ``_bn`` / ``_relu``."""
    if kernel == 3:
        x = layers.ZeroPadding2D(dilation, name=f"{name}_pad")(x)
    return conv_bn_unpadded(x, filters, kernel, stride, name, depthwise, relu, dilation, BN_EPSILON)


def conv_bn_unpadded(
    x: keras.KerasTensor,
    filters: int,
    kernel: int,
    stride: int,
    name: str,
    depthwise: bool,
    relu: bool,
    dilation: int,
    epsilon: float,
) -> keras.KerasTensor:
    """A 'valid' conv (depthwise or not) + BN (+ ReLU6) on an already padded ``x``: the
    block of every backbone here (``{name}_conv`` / ``_bn`` / ``_relu``; the ported
    weights are found by these names)."""
    if depthwise:
        x = layers.DepthwiseConv2D(
            kernel, strides=stride, padding="valid", use_bias=False, dilation_rate=dilation,
            name=f"{name}_conv",
        )(x)
    else:
        x = layers.Conv2D(
            filters, kernel, strides=stride, padding="valid", use_bias=False, name=f"{name}_conv"
        )(x)
    x = layers.BatchNormalization(epsilon=epsilon, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    if relu:
        x = layers.ReLU(max_value=6.0, name=f"{name}_relu")(x)
    return x


def grey_to_imagenet(x: keras.KerasTensor) -> keras.KerasTensor:
    """Fixed 1x1 convolution: grey [0, 1] -> three ImageNet-normalised channels."""
    conv = layers.Conv2D(3, 1, use_bias=True, trainable=False, name="grey_to_imagenet")
    y = conv(x)
    kernel = np.array([[[[1.0 / s for s in IMAGENET_STD]]]], dtype=np.float32)  # 1x1x1x3
    bias = np.array([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], dtype=np.float32)
    conv.set_weights([kernel, bias])
    return y


def backbone(x: keras.KerasTensor, output_stride: int = 32) -> keras.KerasTensor:
    """MobileNetV2 ``features`` (torchvision layout) on a 3-channel tensor.

    Returns the output of ``features.18`` (1280 channels) named :data:`FEATURE_LAYER`.
    With ``output_stride`` 16 the last stride-2 block keeps stride 1 and the
    depthwise convolutions after it are dilated by 2 (the atrous MobileNetV2 of
    DeepLabv3, Chen et al. 2017): the same weights and receptive field, a feature
    grid twice as fine (16 x 16 at 256 px), which is what Grad-CAM is drawn on.
    """
    if output_stride not in (16, 32):
        raise ValueError(f"output_stride must be 16 or 32, not {output_stride}")
    x = _conv_bn(x, 32, 3, 2, "f0")
    in_ch = 32
    index = 1
    current_stride, dilation = 2, 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            stride = s if i == 0 else 1
            block_dilation = dilation
            if stride > 1 and current_stride * stride > output_stride:
                dilation *= stride  # keep the resolution; later blocks see as far as before
                stride = 1
            current_stride *= stride
            block_in = x
            name = f"f{index}"
            hidden = in_ch * t
            if t == 1:
                x = _conv_bn(x, hidden, 3, stride, f"{name}_c0", depthwise=True,
                             dilation=block_dilation)
                x = _conv_bn(x, c, 1, 1, f"{name}_c1", relu=False)
            else:
                x = _conv_bn(x, hidden, 1, 1, f"{name}_c0")
                x = _conv_bn(x, hidden, 3, stride, f"{name}_c1", depthwise=True,
                             dilation=block_dilation)
                x = _conv_bn(x, c, 1, 1, f"{name}_c2", relu=False)
            if stride == 1 and in_ch == c:
                x = layers.Add(name=f"{name}_add")([block_in, x])
            in_ch = c
            index += 1
    x = _conv_bn(x, 1280, 1, 1, "f18")
    return x


def block_of_layer(name: str) -> int:
    """The torchvision ``features`` index a layer belongs to (-1 for non-backbone)."""
    if name.startswith("f") and "_" in name:
        head = name.split("_", 1)[0][1:]
        if head.isdigit():
            return int(head)
    return -1


def build_model(
    size: int,
    n_outputs: int,
    backbone_weights: dict[str, np.ndarray] | None = None,
    dropout: float = 0.2,
    name: str = "mobilenet_v2",
    output_stride: int = 32,
) -> keras.Model:
    """MobileNetV2 with a GAP + dropout + dense head; two outputs.

    Parameters
    ----------
    size
        Side of the square input (one channel, [0, 1]).
    n_outputs
        Logits of the head (1 for the binary classifier, K for the router).
    backbone_weights
        Ported ImageNet weights (see :func:`load_backbone_weights`), or ``None``.
    dropout
        Dropout before the dense layer (inactive at inference).
    name
        Keras model name.
    output_stride
        32 (torchvision's network) or 16 (last stage dilated, see :func:`backbone`).

    Returns
    -------
    keras.Model
        Outputs ``[logits, feature_map]``; with GAP + dense the Grad-CAM weights are
        a closed form of the dense kernel (see :mod:`pipeline.gradcam`).
    """
    inputs = keras.Input((size, size, 1), name="image")
    features = backbone(grey_to_imagenet(inputs), output_stride)
    return with_head(inputs, features, n_outputs, dropout, name, backbone_weights)


def with_head(
    inputs: keras.KerasTensor,
    features: keras.KerasTensor,
    n_outputs: int,
    dropout: float,
    name: str,
    backbone_weights: dict[str, np.ndarray] | None = None,
) -> keras.Model:
    """A backbone's ``features`` with the GAP + dropout + dense head, outputs
    ``[logits, features]``; the layer names (``gap``, ``dropout``, ``head``) are what
    Grad-CAM's closed form and the exported graph rely on, for every backbone."""
    pooled = layers.GlobalAveragePooling2D(name="gap")(features)
    pooled = layers.Dropout(dropout, name="dropout")(pooled)
    logits = layers.Dense(n_outputs, name="head")(pooled)
    model = keras.Model(inputs, [logits, features], name=name)
    if backbone_weights is not None:
        set_backbone_weights(model, backbone_weights)
    return model


def set_backbone_weights(model: keras.Model, weights: dict[str, np.ndarray]) -> None:
    """Copy ``{layer_name/index: array}`` into the model's backbone layers."""
    count = 0
    for layer in model.layers:
        if block_of_layer(layer.name) < 0 or not layer.weights:
            continue
        arrays = [weights[f"{layer.name}/{i}"] for i in range(len(layer.weights))]
        layer.set_weights(arrays)
        count += 1
    logger.info("set backbone weights of %d layers", count)


def get_backbone_weights(model: keras.Model) -> dict[str, np.ndarray]:
    """The inverse of :func:`set_backbone_weights`."""
    out: dict[str, np.ndarray] = {}
    for layer in model.layers:
        if block_of_layer(layer.name) < 0:
            continue
        for i, w in enumerate(layer.get_weights()):
            out[f"{layer.name}/{i}"] = np.asarray(w, dtype=np.float32)
    return out


def load_backbone_weights(path: str) -> dict[str, np.ndarray]:
    """Read the ported ImageNet backbone (``.npz``)."""
    with np.load(path) as data:
        return {k: np.asarray(data[k]) for k in data.files}
