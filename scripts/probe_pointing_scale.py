"""Probe (issue 13, pointing game): does the served classifier's Grad-CAM point better
when the image is fed at a larger square than the 384 px it was trained at?

A larger input gives a finer feature grid (512 px: 32 x 32 cells at output stride 16
instead of 24 x 24), which might place the maximum inside the small boxes the served map
misses (session 32: median box area of misses 0.8 % of the image).  The exported graph
has its 384 px input folded into a reshape, so this runs the Keras model (TensorFlow),
which is fully convolutional up to its global pooling.  For every boxed fracture image
of the validation split it takes the closed-form Grad-CAM at each size, resampled onto
the image bilinearly (the node's rule), and the pointing game of ``fracture-node
evaluate`` (:func:`peak_in_box`); ``multi-scale`` is the mean of the sizes' maps, each
scaled to its own maximum.  Nothing is registered.

    .venv/bin/python scripts/probe_pointing_scale.py [--sizes 384,448,512,576]   # ~3 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.registry import load_keras_model  # noqa: E402
from models.training import data as mdata  # noqa: E402
from models.training.evaluate import peak_in_box  # noqa: E402
from pipeline.classify import Analyser  # noqa: E402
from pipeline.gradcam import gradcam_closed_form  # noqa: E402
from pipeline.resize import fit_square  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import tensorflow as tf

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "msk")
    parser.add_argument("--split", default="val")
    parser.add_argument("--sizes", default="384,448,512,576")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    analyser = Analyser.load(ROOT / "models" / "registry.toml", "bodypart-router", "fracture-classifier")
    kernel = analyser._classifier_graph.kernels
    model = load_keras_model(analyser.classifier_entry)
    run = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    run(tf.zeros((1, 384, 384, 1)))  # traced at the trained size first; later sizes retrace with a free shape
    run(tf.zeros((1, 448, 448, 1)))
    rows = mdata.in_split(mdata.read_manifest(args.data, mdata.LABEL_AUDIT), args.split)
    items = [r for r in rows if r.boxes and r.label == "positive"]
    hits: dict[str, list[bool]] = {**{str(s): [] for s in sizes}, "multi-scale": []}
    seconds = dict.fromkeys(sizes, 0.0)
    for r in items:
        pixels = mdata.load_pixels(r.path)
        maps = {}
        for s in sizes:
            square, transform = fit_square(pixels, s)
            t0 = time.perf_counter()
            _, feats = run(tf.constant(square[None, ..., None].astype(np.float32)))
            seconds[s] += time.perf_counter() - t0
            cam = gradcam_closed_form(feats.numpy(), kernel, np.zeros(1, int))[0]
            img = transform.to_image(cv2.resize(np.ascontiguousarray(cam, dtype=np.float32), (s, s),
                                                interpolation=cv2.INTER_LINEAR))
            hits[str(s)].append(peak_in_box(img, r.boxes))
            maps[s] = img / (img.max() + 1e-9)
        shape = maps[sizes[0]].shape[::-1]
        hits["multi-scale"].append(peak_in_box(sum(cv2.resize(m, shape) for m in maps.values()), r.boxes))
    print(f"{len(items)} boxed fracture images ({args.split} split), "
          f"{analyser.classifier_info.name} {analyser.classifier_info.version} (Keras; the model checks its 384 px input only at the first trace)")
    print("| input px | pointing game | TensorFlow ms per image |")
    print("|---|---|---|")
    for key, h in hits.items():
        ms = f"{1000 * seconds[int(key)] / len(items):.1f}" if key.isdigit() else "-"
        print(f"| {key} | {np.mean(h):.3f} | {ms} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
