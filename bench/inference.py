"""Inference benchmark: the whole decision for one image at batch 1.

Times, after warm-up, on real radiographs from ../shared/data/msk:

* ``node``: :meth:`pipeline.classify.Analyser.analyse` on one normalised image —
  router + classifier + closed-form Grad-CAM + decision, exactly as the node runs it;
* ``keras predict``: plain ``model.predict`` of the same two backbones (router and
  classifier inputs), the reference a Keras user would write;
* start-up: process start to the first prediction (import TensorFlow, hash check,
  load both models, first call), measured in a fresh subprocess.

Prints ms/image (median, p90) and the ratios.  Target: < 100 ms per image.
Usage::

    .venv/bin/python bench/inference.py [--images 40]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MSK = ROOT.parent / "shared" / "data" / "msk"
REGISTRY = ROOT / "models" / "registry.toml"
sys.path.insert(0, str(ROOT))

_FIRST = """
import time, sys
t0 = time.perf_counter()
from pathlib import Path
import numpy as np
sys.path.insert(0, {root!r})
from pipeline.classify import Analyser
from pipeline.result import ImageMetadata, NormalisedImage
a = Analyser.load(Path({registry!r}), "bodypart-router", "fracture-classifier")
img = NormalisedImage(ImageMetadata("1", "1", "1", "1"), np.full((320, 256), 0.5, np.float32), (320, 256))
a.analyse([img])
print(time.perf_counter() - t0)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args(argv)

    import cv2
    import numpy as np

    from pipeline.classify import Analyser
    from pipeline.resize import fit_square
    from pipeline.result import ImageMetadata, NormalisedImage

    rows = [r for r in csv.DictReader((MSK / "manifest.csv").open())
            if r["dataset"] == "MURA-v1.1" and r["split"] == "val"][: args.images]
    images = []
    for i, r in enumerate(rows):
        pixels = cv2.imread(str(MSK / r["path"]), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
        meta = ImageMetadata("1.2", "1.2.1", f"1.2.1.{i}", "1.2.840.10008.5.1.4.1.1.1")
        images.append(NormalisedImage(meta, pixels, pixels.shape))

    analyser = Analyser.load(REGISTRY, "bodypart-router", "fracture-classifier")
    for img in images[:3]:
        analyser.analyse([img])
    node_ms = []
    for img in images:
        t = time.perf_counter()
        analyser.analyse([img])
        node_ms.append((time.perf_counter() - t) * 1000)
    batch = time.perf_counter()
    analyser.analyse(images[:4])
    batch4_ms = (time.perf_counter() - batch) * 1000 / 4

    router_size = analyser.router_entry.input_size
    classifier_size = analyser.classifier_entry.input_size
    router_model = analyser._router_model
    classifier_model = analyser._classifier_model
    keras_ms = []
    for img in images[:3] + images:
        r = fit_square(img.pixels, router_size)[0][None, ..., None]
        c = fit_square(img.pixels, classifier_size)[0][None, ..., None]
        t = time.perf_counter()
        router_model.predict(r, verbose=0)
        classifier_model.predict(c, verbose=0)
        keras_ms.append((time.perf_counter() - t) * 1000)
    keras_ms = keras_ms[3:]

    first = float(subprocess.run([sys.executable, "-c", _FIRST.format(root=str(ROOT),
                                                                       registry=str(REGISTRY))],
                                 capture_output=True, text=True, check=True).stdout.split()[-1])

    def p90(values: list[float]) -> float:
        return sorted(values)[int(0.9 * (len(values) - 1))]

    node_med, keras_med = statistics.median(node_ms), statistics.median(keras_ms)
    print(f"images: {len(images)} (MURA validation), router {router_size} px, "
          f"classifier {classifier_size} px (Grad-CAM grid {analyser.classifier_grid}); test-time flip: "
          f"router {analyser.router_entry.test_time_flip}, classifier {analyser.classifier_entry.test_time_flip} "
          "(the node then runs each image and its mirror; keras predict runs each image once)")
    print("| path | median ms/image | p90 ms |")
    print("|---|---|---|")
    print(f"| node: router + classifier + Grad-CAM + decision (batch 1) | {node_med:.1f} | "
          f"{p90(node_ms):.1f} |")
    print(f"| node, batch of 4 (per image) | {batch4_ms:.1f} | |")
    print(f"| keras model.predict, both backbones, no Grad-CAM | {keras_med:.1f} | "
          f"{p90(keras_ms):.1f} |")
    print(f"\nratio node / keras predict: {node_med / keras_med:.2f}")
    print(f"process start to first prediction: {first:.1f} s")
    print(f"target < 100 ms per image: {'met' if node_med < 100 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
