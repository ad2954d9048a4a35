"""Export a registered Keras model to the serving graph the node runs without TensorFlow.

The exported graph takes ``input`` ``(n, s, s, 1)`` float32 in [0, 1] and returns
``logits`` ``(n, k)`` and ``features`` ``(n, h, w, c)`` (the last convolutional
activation, Grad-CAM's map), in inference mode, fp32.  :func:`export_onnx` is the
format the node serves (:mod:`models.runtime`); :func:`export_litert` and
:func:`export_openvino` exist for the side-by-side measurement in
``bench/runtimes.py`` that chose it.

After writing, :func:`check_export` runs the exported file on a real-looking input
and compares it with the Keras model: a converter that silently dropped weights or
changed precision (the traps in ``shared/NOTES.md``) fails the export instead of
shipping.

``python -m models.training.export [--registry R] [--name NAME ...]`` (re-)exports
models already in the registry and records the files and their SHA-256
(``fracture-node export`` runs the same).  :mod:`models.training.register` calls
:func:`export_entry` for every model it registers.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models.registry import sha256_of
from models.runtime import HEAD_BIAS_KEY, HEAD_KERNEL_KEY, encode_array

logger = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parents[1]
OUTPUTS = ("logits", "features")
"""Names of the exported graph's outputs, in this order."""
ONNX_OPSET = 17
FORMAT = "onnx"
"""The format the node serves (see ``bench/runtimes.py`` and ``docs/benchmarks.md``)."""
LOGIT_ATOL = 1e-3
FEATURE_ATOL = 1e-3
"""Largest difference from Keras an export may show on its check input (measured: ~1e-5)."""


class ExportError(Exception):
    """An export failed or does not reproduce the Keras model."""


def keras_head(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(kernel (c, k), bias (k,))`` float32 of the model's dense ``head`` layer."""
    layer = model.get_layer("head")
    return (np.asarray(layer.kernel, dtype=np.float32), np.asarray(layer.bias, dtype=np.float32))


class KerasGraph:
    """The Keras model behind the :class:`models.runtime.ServingGraph` protocol, in a
    ``tf.function`` (inference mode): the TensorFlow reference path that tests and
    benchmarks run through the same :class:`pipeline.classify.Analyser` code as the
    exported graph.  Never used by the node."""

    def __init__(self, model: Any, size: int) -> None:
        self.model = model
        self.input_size = int(size)
        self._fn = _tf_function(model, size)
        self.feature_grid = int(model.outputs[1].shape[1])
        self.head_kernel, self.head_bias = keras_head(model)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, features)`` of the Keras model."""
        out = self._fn(np.asarray(x, np.float32))
        return np.asarray(out["logits"]), np.asarray(out["features"])


def _tf_function(model: Any, size: int) -> Any:
    import tensorflow as tf

    def serve(x: Any) -> dict[str, Any]:
        logits, features = model(x, training=False)
        return {"logits": tf.identity(logits), "features": tf.identity(features)}

    return tf.function(serve, input_signature=[tf.TensorSpec((None, size, size, 1), tf.float32, name="input")])


def export_onnx(model: Any, size: int, dest: Path) -> Path:
    """Write ``dest`` (ONNX, opset 17, dynamic batch) with outputs ``logits``, ``features``.

    Converted with tf2onnx from a ``tf.function`` of the Keras model in inference mode
    (batch norm on its moving statistics, dropout off); the graph outputs are renamed
    to :data:`OUTPUTS` because tf2onnx names them after the traced tensors.
    """
    import onnx
    import tf2onnx

    fn = _tf_function(model, size)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=ONNX_OPSET)
    graph = proto.graph
    if len(graph.output) != len(OUTPUTS):
        raise ExportError(f"expected {len(OUTPUTS)} outputs, tf2onnx wrote {len(graph.output)}")
    renames: dict[str, str] = {}
    for out in graph.output:
        rank = len(out.type.tensor_type.shape.dim)
        renames[out.name] = "logits" if rank == 2 else "features"
    if sorted(renames.values()) != sorted(OUTPUTS):
        raise ExportError(f"cannot tell the outputs apart: {renames}")
    for node in graph.node:
        node.output[:] = [renames.get(o, o) for o in node.output]
    for out in graph.output:
        out.name = renames[out.name]
    order = {name: i for i, name in enumerate(OUTPUTS)}
    outs = sorted(graph.output, key=lambda o: order[o.name])
    del graph.output[:]
    graph.output.extend(outs)
    graph.input[0].name = _rename_input(graph, "input")
    proto.producer_name = "fracture-node models.training.export"
    kernel, bias = keras_head(model)
    for key, value in ((HEAD_KERNEL_KEY, kernel), (HEAD_BIAS_KEY, bias)):
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, encode_array(value)
    onnx.checker.check_model(proto)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dest))
    return dest


def _rename_input(graph: Any, name: str) -> str:
    old = graph.input[0].name
    for node in graph.node:
        node.input[:] = [name if i == old else i for i in node.input]
    return name


def export_litert(model: Any, size: int, dest: Path) -> Path:
    """Write ``dest`` (LiteRT flatbuffer, fp32, no quantisation) from the Keras model.

    Converted with ``TFLiteConverter.from_keras_model``: from a concrete function or a
    SavedModel of a ``tf.Module`` wrapping the Keras 3 model, TF 2.21's converter
    writes a 176 KB file without the weights whose outputs are NaN (measured here,
    and in ``shared/NOTES.md``).  The input keeps a batch of 1 in the file; the caller
    resizes it.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = []
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(converter.convert())
    if dest.stat().st_size < 1 << 20:
        raise ExportError(f"{dest}: {dest.stat().st_size} bytes, the converter dropped the weights")
    return dest


def export_openvino(model: Any, size: int, dest: Path) -> Path:
    """Write ``dest`` (OpenVINO IR ``.xml`` + ``.bin``) with fp32 weights.

    ``ov.save_model`` compresses weights to fp16 unless ``compress_to_fp16=False``
    (``shared/NOTES.md``); the runtime must also ask for ``INFERENCE_PRECISION_HINT=f32``.
    """
    import openvino as ov

    fn = _tf_function(model, size)
    ov_model = ov.convert_model(fn.get_concrete_function())
    dest.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, str(dest), compress_to_fp16=False)
    return dest


def check_export(model: Any, size: int, path: Path, seed: int = 0) -> dict[str, float]:
    """Run the exported ONNX file and Keras on the same inputs; raise :class:`ExportError`
    unless logits and feature map agree within :data:`LOGIT_ATOL` / :data:`FEATURE_ATOL`.

    The inputs are a smooth synthetic radiograph-like image (bright band on dark) and
    its mirror, so every channel of the map is exercised; returns the differences.
    """
    from models.runtime import OnnxGraph

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.clip(0.2 + 0.6 * np.exp(-((xx - 0.5) ** 2) / 0.02) + 0.05 * rng.standard_normal((size, size)), 0, 1)
    x = np.stack([img, img[:, ::-1]]).astype(np.float32)[..., None]
    ref_logits, ref_features = (np.asarray(t) for t in model(x, training=False))
    graph = OnnxGraph(path)
    logits, features = graph.run(x)
    kernel, bias = keras_head(model)
    if not (np.array_equal(graph.head_kernel, kernel) and np.array_equal(graph.head_bias, bias)):
        raise ExportError(f"{path}: the head in the graph's metadata is not the model's")
    d_logits = float(np.max(np.abs(logits - ref_logits)))
    d_features = float(np.max(np.abs(features - ref_features)))
    if not (np.isfinite(logits).all() and np.isfinite(features).all()):
        raise ExportError(f"{path}: the exported graph gives non-finite outputs")
    if d_logits > LOGIT_ATOL or d_features > FEATURE_ATOL:
        raise ExportError(f"{path}: exported graph differs from Keras by {d_logits:.2e} (logits), "
                          f"{d_features:.2e} (feature map)")
    if float(np.abs(ref_features).max()) == 0.0:
        raise ExportError("the check input gives an all-zero feature map: nothing was compared")
    logger.info("checked %s against Keras: logits %.1e, feature map %.1e", path.name, d_logits, d_features)
    return {"logits": d_logits, "features": d_features}


def export_entry(model: Any, size: int, weights: Path) -> tuple[Path, str]:
    """Export the model whose Keras file is ``weights`` next to it (same stem, ``.onnx``),
    check it against Keras and return ``(path, sha256)``."""
    dest = weights.with_suffix(".onnx")
    export_onnx(model, size, dest)
    check_export(model, size, dest)
    sha = sha256_of(dest)
    logger.info("exported %s (%.1f MB, sha256 %s...)", dest.name, dest.stat().st_size / 2**20, sha[:12])
    return dest, sha


def registry_fields(dest: Path, sha: str, registry_dir: Path) -> dict[str, str]:
    """The registry keys that record an export (``graph``, ``graph_sha256``, ``graph_format``)."""
    return {"graph": str(dest.resolve().relative_to(registry_dir.resolve())), "graph_sha256": sha,
            "graph_format": FORMAT}


def main(argv: list[str] | None = None) -> int:
    """``fracture-node export [--registry R] [--name NAME ...]``: (re-)export registered models."""
    from models.registry import load_keras_model, load_registry
    from models.training.register import dump_registry

    p = argparse.ArgumentParser(prog="fracture-node export", description=__doc__.splitlines()[0])
    p.add_argument("--registry", type=Path, default=MODELS_DIR / "registry.toml")
    p.add_argument("--name", nargs="*", default=None, help="models to export (default: all)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raw: dict[str, Any] = tomllib.loads(args.registry.read_text(encoding="utf-8"))["models"]
    registry = load_registry(args.registry)
    names = args.name or list(raw)
    for name in names:
        entry = registry.get(name)
        model = load_keras_model(entry)  # hash-checked
        dest, sha = export_entry(model, entry.input_size, entry.weights)
        raw[name] = with_graph(raw[name], registry_fields(dest, sha, args.registry.parent))
        logger.info("recorded %s graph %s", name, sha[:12])
    args.registry.write_text(dump_registry(raw))
    return 0


def with_graph(entry: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    """``entry`` with the export keys set right after ``sha256`` (where a reader looks)."""
    out: dict[str, Any] = {}
    for k, v in entry.items():
        if k in fields:
            continue
        out[k] = v
        if k == "sha256":
            out.update(fields)
    if not all(k in out for k in fields):
        out.update(fields)
    return out


if __name__ == "__main__":
    sys.exit(main())
