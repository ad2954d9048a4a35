"""Probe (issue 13, pointing game): where the served Grad-CAM's misses land, and whether
the resampling of the grid map onto the image moves them.

For every boxed fracture image of a split (the rows and rule of ``fracture-node
evaluate``'s pointing game: the maximum of the map, resampled onto the image, inside a
box), the served classifier's map on its feature grid is resampled onto the input
bilinearly (what the node does), bicubically and by Lanczos, and the script reports:

* the pointing game of each resampling;
* for the bilinear map, the share of images whose maximum lies within 2, 5 and 10 % of
  the image's longer side of a box (how near the misses are);
* the share with a box holding one of the map's 1, 2 or 3 highest local maxima;
* the pointing game per dataset, and the median box area of hits and of misses.

Nothing is registered.

    .venv/bin/python scripts/probe_pointing_misses.py [--split val]   # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import collections
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

RESAMPLING = {"bilinear (served)": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
              "Lanczos": cv2.INTER_LANCZOS4}


def _inside(boxes: Any, x: float, y: float) -> bool:
    return any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes)


def _box_distance(img_map: np.ndarray, boxes: Any) -> float:
    """Distance from the map's maximum to the nearest box, in longer sides of the image."""
    h, w = img_map.shape
    y, x = np.unravel_index(int(np.argmax(img_map)), img_map.shape)
    yy, xx = (y + 0.5) / h, (x + 0.5) / w
    return min(float(np.hypot(max(b[0] - xx, 0.0, xx - b[2]) * w,
                              max(b[1] - yy, 0.0, yy - b[3]) * h)) for b in boxes) / max(h, w)


def _in_box_peak_rank(img_map: np.ndarray, boxes: Any, top: int = 3) -> int | None:
    """Rank (1 = highest) of the first of the map's local maxima that lies in a box."""
    h, w = img_map.shape
    kernel = np.ones((max(3, h // 24), max(3, w // 24)), np.uint8)
    peaks = np.argwhere((img_map == cv2.dilate(img_map, kernel)) & (img_map > 0.2))
    order = np.argsort(-img_map[peaks[:, 0], peaks[:, 1]])
    for rank, i in enumerate(order[:top], start=1):
        py, px = peaks[i]
        if _inside(boxes, (px + 0.5) / w, (py + 0.5) / h):
            return rank
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "msk")
    parser.add_argument("--split", default="val")
    args = parser.parse_args(argv)
    analyser = Analyser.load(ROOT / "models" / "registry.toml", "bodypart-router",
                             "fracture-classifier")
    rows = mdata.in_split(mdata.read_manifest(args.data, mdata.LABEL_AUDIT), args.split)
    items = [r for r in rows if r.boxes and r.label == "positive"]
    size = analyser.classifier_entry.input_size
    hits: dict[str, list[bool]] = {k: [] for k in RESAMPLING}
    dist, ranks, areas, datasets = [], [], [], []
    for r in items:
        sq, transform = fit_square(mdata.load_pixels(r.path), size)
        _, _, cams = analyser.classify_on_grid(sq[None])
        for name, mode in RESAMPLING.items():
            img_map = transform.to_image(cv2.resize(np.ascontiguousarray(cams[0]), (size, size),
                                                    interpolation=mode))
            hits[name].append(peak_in_box(img_map, r.boxes))
            if mode == cv2.INTER_LINEAR:
                dist.append(_box_distance(img_map, r.boxes))
                ranks.append(_in_box_peak_rank(img_map, r.boxes))
        areas.append(float(np.clip(sum((b[2] - b[0]) * (b[3] - b[1]) for b in r.boxes), 0, 1)))
        datasets.append(r.dataset)
    served = np.array(hits["bilinear (served)"])
    print(f"{len(items)} boxed fracture images ({args.split} split)")
    for name, h in hits.items():
        print(f"pointing game, {name} resampling: {np.mean(h):.3f}")
    d = np.array(dist)
    for t in (0.02, 0.05, 0.10):
        print(f"maximum within {t:.0%} of the longer side of a box: {np.mean(d <= t):.3f}")
    for k in (1, 2, 3):
        print(f"a box holds one of the {k} highest local maxima: "
              f"{np.mean([r is not None and r <= k for r in ranks]):.3f}")
    by = collections.defaultdict(list)
    for ds, h in zip(datasets, served):
        by[ds].append(h)
    for ds, h in sorted(by.items()):
        print(f"{ds}: {len(h)} images, pointing game {np.mean(h):.3f}")
    a = np.array(areas)
    print(f"median box area: hits {np.median(a[served]):.4f}, misses {np.median(a[~served]):.4f} "
          "of the image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
