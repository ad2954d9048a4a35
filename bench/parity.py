"""Exported graph vs TensorFlow on a whole manifest split: does any decision change?

Runs every image of the split (default ``val``) of ../shared/data/msk through
:meth:`pipeline.classify.Analyser.analyse`, study by study as the node groups them,
twice: on the exported ONNX graphs (the node) and on the Keras models in a
``tf.function`` (:class:`models.training.export.KerasGraph`).  Counts images whose
outcome differs (finding vs refusal, body part, decision, refusal code) and prints
the largest differences in router probability, fracture probability and heat map.
``tests/test_runtime.py`` checks a fixed subset of the same in CI.  Usage::

    .venv/bin/python bench/parity.py [--split val] [--limit N]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MSK = ROOT.parent / "shared" / "data" / "msk"
REGISTRY = ROOT / "models" / "registry.toml"
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    args = parser.parse_args(argv)

    import cv2

    from models.registry import load_keras_model
    from models.training.export import KerasGraph
    from pipeline.classify import Analyser
    from pipeline.result import ImageFinding, ImageMetadata, NormalisedImage, Refusal

    rows = [r for r in csv.DictReader((MSK / "manifest.csv").open()) if r["split"] == args.split]
    if args.limit:
        rows = rows[: args.limit]
    studies: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        studies.setdefault(f"{r['dataset']}|{r['study_id'] or r['path']}", []).append(r)

    served = Analyser.load(REGISTRY, "bodypart-router", "fracture-classifier")
    r_e, c_e = served.router_entry, served.classifier_entry
    reference = Analyser(r_e, c_e, KerasGraph(load_keras_model(r_e), r_e.input_size),
                         KerasGraph(load_keras_model(c_e), c_e.input_size))
    changed: list[str] = []
    n = analysed = 0
    d_router = d_prob = d_heat = 0.0
    t0 = time.perf_counter()
    for s, (key, members) in enumerate(studies.items()):
        images = []
        for i, r in enumerate(members):
            pixels = cv2.imread(str(MSK / r["path"]), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
            meta = ImageMetadata("1.2.9", f"1.2.9.{s}", f"1.2.9.{s}.{i}", "1.2.840.10008.5.1.4.1.1.1",
                                 modality="CR")
            images.append(NormalisedImage(meta, pixels, pixels.shape))
        for r, a, b in zip(members, served.analyse(images), reference.analyse(images)):
            n += 1
            if isinstance(a, ImageFinding) and isinstance(b, ImageFinding):
                analysed += 1
                d_router = max(d_router, max(abs(a.body_part_probabilities[c] - b.body_part_probabilities[c])
                                             for c in a.body_part_probabilities))
                d_prob = max(d_prob, abs(a.fracture_probability - b.fracture_probability))
                d_heat = max(d_heat, float(np.abs(a.heatmap - b.heatmap).max()))
                same = (a.body_part, a.decision) == (b.body_part, b.decision)
            elif isinstance(a, Refusal) and isinstance(b, Refusal):
                same = a.code == b.code
            else:
                same = False
            if not same:
                changed.append(f"{r['path']}: {a!r:.120} vs {b!r:.120}")
    print(f"split {args.split}: {n} images in {len(studies)} studies ({analysed} analysed by both, the rest "
          f"refused by both or changed), {time.perf_counter() - t0:.0f} s")
    print(f"decisions changed: {len(changed)} of {n}")
    for line in changed[:20]:
        print("  " + line)
    print(f"largest difference from TensorFlow: router probability {d_router:.1e}, "
          f"fracture probability {d_prob:.1e}, heat map {d_heat:.1e}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
