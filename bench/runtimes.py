"""Which runtime serves the exported models: ONNX Runtime, LiteRT or OpenVINO, side by side.

Exports the two registered models (fp32) to each runtime into a temporary folder,
then times, in this one process and on the same real radiographs, the forward passes
the node needs at batch 1 per image (image + mirror = batch 2, as with
``test_time_flip``): router logits, classifier logits and feature map.  TensorFlow
(``tf.function``) is the reference in the same run.  Prints median ms per image,
the ratio to TensorFlow and the largest difference from TensorFlow's outputs.

This is the measurement behind the choice in ``models/runtime.py``; the node itself
runs only the chosen one.  Usage::

    .venv/bin/python bench/runtimes.py [--images 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MSK = ROOT.parent / "shared" / "data" / "msk"
sys.path.insert(0, str(ROOT))

Runner = Callable[[np.ndarray], list[np.ndarray]]


def _tf_runner(model: object, size: int) -> Runner:
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False),  # type: ignore[operator]
                     input_signature=[tf.TensorSpec((None, size, size, 1), tf.float32)])
    return lambda x: [np.asarray(t) for t in fn(x)]


def _onnx(model: object, size: int, folder: Path, name: str) -> Runner:
    import onnxruntime as ort

    from models.training.export import export_onnx

    path = export_onnx(model, size, folder / f"{name}.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    iname = sess.get_inputs()[0].name
    return lambda x: sess.run(names, {iname: x})


def _litert(model: object, size: int, folder: Path, name: str) -> Runner:
    from ai_edge_litert.interpreter import Interpreter

    from models.training.export import export_litert

    path = export_litert(model, size, folder / f"{name}.tflite")
    interp = Interpreter(model_path=str(path), num_threads=2)
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], [2, size, size, 1])
    interp.allocate_tensors()
    outs = sorted(interp.get_output_details(), key=lambda d: len(d["shape"]))  # logits first

    def run(x: np.ndarray) -> list[np.ndarray]:
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return [interp.get_tensor(o["index"]) for o in outs]

    return run


def _openvino(model: object, size: int, folder: Path, name: str) -> Runner:
    import openvino as ov

    from models.training.export import export_openvino

    path = export_openvino(model, size, folder / f"{name}.xml")
    core = ov.Core()
    m = core.read_model(str(path))
    m.reshape([2, size, size, 1])
    compiled = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2,
                                             "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    outs = sorted(compiled.outputs, key=lambda o: len(o.get_partial_shape()))

    def run(x: np.ndarray) -> list[np.ndarray]:
        res = req.infer({0: x})
        return [np.asarray(res[o]) for o in outs]

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    import cv2

    from models.registry import load_keras_model, load_registry
    from pipeline.resize import fit_square

    registry = load_registry(ROOT / "models" / "registry.toml")
    entries = [registry.get("bodypart-router"), registry.get("fracture-classifier")]
    rows = [r for r in csv.DictReader((MSK / "manifest.csv").open())
            if r["dataset"] == "MURA-v1.1" and r["split"] == "val"][: args.images]
    pixels = [cv2.imread(str(MSK / r["path"]), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255 for r in rows]
    inputs = {e.name: [np.concatenate([s, s[:, :, ::-1]]) for s in
                       (fit_square(p, e.input_size)[0][None, ..., None].astype(np.float32) for p in pixels)]
              for e in entries}
    models = {e.name: load_keras_model(e) for e in entries}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runners: dict[str, dict[str, Runner]] = {"tensorflow": {}, "onnxruntime": {}, "litert": {},
                                                 "openvino": {}}
        for e in entries:
            runners["tensorflow"][e.name] = _tf_runner(models[e.name], e.input_size)
            runners["onnxruntime"][e.name] = _onnx(models[e.name], e.input_size, folder, e.name)
            runners["litert"][e.name] = _litert(models[e.name], e.input_size, folder, e.name)
            runners["openvino"][e.name] = _openvino(models[e.name], e.input_size, folder, e.name)
        reference = {n: [runners["tensorflow"][n](x) for x in xs] for n, xs in inputs.items()}
        times: dict[str, list[float]] = {k: [] for k in runners}
        diffs: dict[str, float] = {k: 0.0 for k in runners}
        for rep in range(args.repeat):
            for key, by_model in runners.items():  # interleaved: the same load for each
                for i in range(len(pixels)):
                    t = time.perf_counter()
                    outs = {n: by_model[n](inputs[n][i]) for n in by_model}
                    times[key].append((time.perf_counter() - t) * 1000)
                    if rep == 0:
                        for n, o in outs.items():
                            for a, b in zip(o, reference[n][i]):
                                d = float(np.max(np.abs(a - b)))
                                diffs[key] = max(diffs[key], d if np.isfinite(d) else float("inf"))
        for key in times:
            times[key] = times[key][2:]  # first calls of each runner: warm-up
    tf_med = statistics.median(times["tensorflow"])
    print(f"{len(pixels)} MURA validation images x {args.repeat}, batch 2 (image + mirror) per model, fp32, "
          "2 threads; router + classifier (logits and feature map) per image")
    print("| runtime | median ms/image | p90 ms | ratio to TensorFlow | max abs diff from TensorFlow |")
    print("|---|---|---|---|---|")
    for key, values in times.items():
        med = statistics.median(values)
        p90 = sorted(values)[int(0.9 * (len(values) - 1))]
        print(f"| {key} | {med:.1f} | {p90:.1f} | {med / tf_med:.2f} | {diffs[key]:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
