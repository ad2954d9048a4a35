"""Exported graph vs TensorFlow on a whole manifest split: does any decision change?

Runs every image of the split (default ``val``) of ../shared/data/msk through
:meth:`pipeline.classify.Analyser.analyse`, study by study as the node groups them,
twice: on the exported ONNX graphs (the node) and on the Keras models in a
``tf.function`` (:class:`models.training.export.KerasGraph`).  Counts images whose
outcome differs (finding vs refusal, body part, decision, refusal code) and prints
the largest differences in router probability, fracture probability and heat map.
``tests/test_runtime.py`` checks a fixed subset of the same in CI.

With ``--against REV`` the reference is instead ``pipeline/classify.py`` as it was at
git revision ``REV``, on the same exported graphs (the same ONNX Runtime sessions):
that shows a change to the decision path (issue 15: the classifier skipped for images
the router refuses) changes no outcome, reason or note, and times both side by side.
Usage::

    .venv/bin/python bench/parity.py [--split val] [--limit N] [--against REV]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
import types
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
    parser.add_argument("--against", metavar="REV",
                        help="compare with pipeline/classify.py at this git revision instead of TensorFlow")
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
    if args.against:
        source = subprocess.run(["git", "show", f"{args.against}:pipeline/classify.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
        old = types.ModuleType("classify_at_rev")
        old.__dict__["__name__"] = "classify_at_rev"
        sys.modules["classify_at_rev"] = old
        exec(compile(source, f"{args.against}:pipeline/classify.py", "exec"), old.__dict__)
        reference = old.Analyser(r_e, c_e, served._router_graph,
                                 served._classifier_graph.graph)
        label = f"pipeline/classify.py at {args.against}"
    else:
        reference = Analyser(r_e, c_e, KerasGraph(load_keras_model(r_e), r_e.input_size),
                             KerasGraph(load_keras_model(c_e), c_e.input_size), heads=served.heads)
        label = "TensorFlow"
    t_served: list[float] = []
    t_reference: list[float] = []
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
        t = time.perf_counter()
        got = served.analyse(images)
        t_served.append((time.perf_counter() - t) / len(images))
        t = time.perf_counter()
        want = reference.analyse(images)
        t_reference.append((time.perf_counter() - t) / len(images))
        for r, a, b in zip(members, got, want):
            n += 1
            if isinstance(a, ImageFinding) and isinstance(b, ImageFinding):
                analysed += 1
                d_router = max(d_router, max(abs(a.body_part_probabilities[c] - b.body_part_probabilities[c])
                                             for c in a.body_part_probabilities))
                d_prob = max(d_prob, abs(a.fracture_probability - b.fracture_probability))
                d_heat = max(d_heat, float(np.abs(a.heatmap - b.heatmap).max()))
                same = (a.body_part, a.decision) == (b.body_part, b.decision)
                if args.against:  # same code path otherwise: the wording must not move either
                    same = same and a.notes == b.notes
            elif isinstance(a, Refusal) and isinstance(b, Refusal):
                same = a.code == b.code and (not args.against or (a.text, a.body_part, a.header) == (b.text, b.body_part, b.header))
            else:
                same = False
            if not same:
                changed.append(f"{r['path']}: {a!r:.120} vs {b!r:.120}")
    print(f"split {args.split}: {n} images in {len(studies)} studies ({analysed} analysed by both, the rest "
          f"refused by both or changed), {time.perf_counter() - t0:.0f} s")
    print(f"decisions changed: {len(changed)} of {n}")
    for line in changed[:20]:
        print("  " + line)
    print(f"largest difference from {label}: router probability {d_router:.1e}, "
          f"fracture probability {d_prob:.1e}, heat map {d_heat:.1e}")
    print(f"median ms/image (study by study, interleaved): node {statistics.median(t_served) * 1000:.1f}, "
          f"{label} {statistics.median(t_reference) * 1000:.1f}; mean {sum(t_served) / len(t_served) * 1000:.1f} "
          f"vs {sum(t_reference) / len(t_reference) * 1000:.1f}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
