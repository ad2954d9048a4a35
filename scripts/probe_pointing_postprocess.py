"""Probe (issue 13, pointing game): does a rule applied to the served Grad-CAM map before
its maximum is taken move the pointing game?

The served map is the closed-form Grad-CAM on the classifier's 24 x 24 feature grid,
resampled onto the image bilinearly; the pointing game asks whether its maximum lies in
a fracture box (``fracture-node evaluate``'s rule, :func:`peak_in_box`).  Two families
of rules, neither of which changes a probability or a decision:

* **smoothing**: a Gaussian of ``sigma`` grid cells on the grid map (a lone hot cell
  loses to a hot neighbourhood);
* **intensity weighting**: the resampled map times the blurred radiograph (the model
  square, 0..1) to the power ``gamma`` (a fracture lies in bone, which is bright; soft
  tissue and background are dark).

The rules are compared on the boxed validation images; since choosing one there would
flatter it, the script also reports the **cross-fitted** figure: the rule chosen on a
random half of the images (grouped by the manifest's group), measured on the other
half, over 20 halvings.  The boxed train images are printed beside them (the backbone
learned those boxes, so they are no guide).  Nothing is registered.

    .venv/bin/python scripts/probe_pointing_postprocess.py [--train 400]   # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.training import data as mdata  # noqa: E402
from models.training.evaluate import peak_in_box  # noqa: E402
from pipeline.classify import Analyser  # noqa: E402
from pipeline.resize import fit_square  # noqa: E402

SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0)
GAMMAS = (0.0, 0.5, 1.0, 2.0, 4.0)
IMAGE_BLUR_PX = 6.0
"""Gaussian of the radiograph before it weights the map (384 px square): bone, not its
texture."""


def _rule_map(cam: np.ndarray, square: np.ndarray, sigma: float, gamma: float) -> np.ndarray:
    """The map on the model square after the rule (``sigma`` cells, ``gamma``)."""
    grid = np.ascontiguousarray(cam, dtype=np.float32)
    if sigma > 0:
        grid = cv2.GaussianBlur(grid, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    size = square.shape[0]
    up = cv2.resize(grid, (size, size), interpolation=cv2.INTER_LINEAR)
    if gamma > 0:
        bright = cv2.GaussianBlur(square.astype(np.float32), (0, 0), IMAGE_BLUR_PX)
        up = up * np.clip(bright, 0.0, 1.0) ** gamma
    return up


def _hits(items: list[Any], analyser: Analyser) -> dict[tuple[float, float], np.ndarray]:
    size = analyser.classifier_entry.input_size
    out: dict[tuple[float, float], list[bool]] = {k: [] for k in itertools.product(SIGMAS, GAMMAS)}
    for r in items:
        sq, transform = fit_square(mdata.load_pixels(r.path), size)
        _, _, cams = analyser.classify_on_grid(sq[None])
        for sigma, gamma in out:
            img_map = transform.to_image(_rule_map(cams[0], sq, sigma, gamma))
            out[(sigma, gamma)].append(peak_in_box(img_map, r.boxes))
    return {k: np.array(v) for k, v in out.items()}


def _cross_fitted(hits: dict[tuple[float, float], np.ndarray], groups: list[str],
                  rounds: int = 20, seed: int = 0) -> tuple[float, list[tuple[float, float]]]:
    """Mean pointing game on held-out halves of the rule chosen on the other halves."""
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    index = np.array([names.index(g) for g in groups])
    scores, chosen = [], []
    for _ in range(rounds):
        half = rng.permutation(len(names))[: len(names) // 2]
        a = np.isin(index, half)
        for fit, test in ((a, ~a), (~a, a)):
            best = max(hits, key=lambda k: (hits[k][fit].mean(), -k[0], -k[1]))
            chosen.append(best)
            scores.append(float(hits[best][test].mean()))
    return float(np.mean(scores)), chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "msk")
    parser.add_argument("--train", type=int, default=400, help="boxed train images to print beside")
    parser.add_argument("--router", default="bodypart-router")
    parser.add_argument("--classifier", default="fracture-classifier")
    args = parser.parse_args(argv)
    analyser = Analyser.load(ROOT / "models" / "registry.toml", args.router, args.classifier)
    rows = mdata.read_manifest(args.data, mdata.LABEL_AUDIT)
    boxed = {s: [r for r in mdata.in_split(rows, s) if r.boxes and r.label == "positive"]
             for s in ("val", "train")}
    rng = np.random.default_rng(0)
    train = [boxed["train"][i] for i in sorted(rng.permutation(len(boxed["train"]))[: args.train])]
    val_hits = _hits(boxed["val"], analyser)
    train_hits = _hits(train, analyser)
    print(f"{len(boxed['val'])} boxed validation images, {len(train)} boxed train images; "
          f"{analyser.classifier_info.name} {analyser.classifier_info.version}")
    print("| sigma (grid cells) | gamma (brightness) | validation | train |")
    print("|---|---|---|---|")
    for key in sorted(val_hits):
        print(f"| {key[0]} | {key[1]} | {val_hits[key].mean():.3f} | {train_hits[key].mean():.3f} |")
    served = val_hits[(0.0, 0.0)].mean()
    score, chosen = _cross_fitted(val_hits, [r.group_id or r.path for r in boxed["val"]])
    common = max(set(chosen), key=chosen.count)
    print(f"served rule (sigma 0, gamma 0): {served:.3f}; cross-fitted choice of rule: {score:.3f} "
          f"(most often chosen: sigma {common[0]}, gamma {common[1]}, {chosen.count(common)} of "
          f"{len(chosen)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
