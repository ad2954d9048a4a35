"""Probe (issue 13): the abnormality head on other poolings of the classifier's feature map.

The abnormality head (``models/training/head.py``) is logistic regression on the global
*average* of the served classifier's last feature map. On MURA's forearm studies it
reaches AUROC 0.887, short of the 0.92 bar. A head on another pooling costs the node no
more than a dot product, since the graph already returns the feature map. So this fits
the same head, by the same rules (standardised features, the L2 strength by patient-grouped
5-fold cross-validation on the train split, the temperature and each part's kappa
threshold out of fold), on four poolings of the same frozen features of MURA's train
images:

* the mean (the served head, as a check);
* the max;
* generalised mean with p = 3;
* the mean of the top 10 % of cells.

It prints the out-of-fold and the validation study-level figures for the forearm and the
humerus. Nothing is registered; the pooling would be chosen by the out-of-fold figures,
not by the validation split that reports it.

    .venv/bin/python scripts/probe_head_pooling.py --data ../shared/data/msk [--cache F.npz]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.registry import load_registry  # noqa: E402
from models.runtime import load_graph  # noqa: E402
from models.training import data as mdata  # noqa: E402
from models.training import metrics as mm  # noqa: E402
from models.training.head import fit_head  # noqa: E402
from pipeline.classify import ClassifierGraph  # noqa: E402

PARTS = ("FOREARM", "HUMERUS")
TRAIN_PARTS = ("FOREARM", "HUMERUS", "WRIST")
"""The parts the served head was fitted on (``abnormality-head`` 1.1.0)."""


def _top_decile(cells: np.ndarray) -> np.ndarray:
    k = max(1, cells.shape[1] // 10)
    return np.sort(cells, axis=1)[:, -k:].mean(axis=1)


POOLINGS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda cells: cells.mean(axis=1),
    "max": lambda cells: cells.max(axis=1),
    "gem3": lambda cells: np.cbrt((np.maximum(cells, 0.0) ** 3).mean(axis=1)),
    "top10": _top_decile,
}
"""Pooling of ``(n, cells, c)`` feature maps to ``(n, c)``."""


def mura_rows(rows: Sequence[mdata.Row], split: str) -> list[mdata.Row]:
    """MURA's labelled images of :data:`TRAIN_PARTS` in ``split``."""
    return [r for r in mdata.in_split(rows, split) if r.dataset == "MURA-v1.1"
            and r.label in ("positive", "negative") and r.body_part in TRAIN_PARTS]


def pooled(graph: ClassifierGraph, rows: Sequence[mdata.Row], size: int,
           batch: int = 32) -> dict[str, np.ndarray]:
    """Every pooling of :data:`POOLINGS` of each row's feature map, float64."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in POOLINGS}
    for start in range(0, len(rows), batch):
        x = mdata.load_arrays([r.path for r in rows[start:start + batch]], size).astype(np.float32)
        f = graph.features(x).astype(np.float64)
        cells = f.reshape(len(f), -1, f.shape[-1])
        for name, pool in POOLINGS.items():
            out[name].append(pool(cells))
    return {name: np.concatenate(v) for name, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "msk")
    p.add_argument("--cache", type=Path, help="keep the pooled features here (.npz)")
    args = p.parse_args()
    entry = load_registry(ROOT / "models" / "registry.toml").get("fracture-classifier",
                                                                 role="classifier")
    rows = mdata.read_manifest(args.data)
    train, val = mura_rows(rows, "train"), mura_rows(rows, "val")
    if args.cache and args.cache.exists():
        z = np.load(args.cache)
        feats = {k: z[k] for k in z.files}
    else:
        graph = ClassifierGraph(load_graph(entry), entry.test_time_flip)
        feats = {f"{split}_{k}": v for split, rs in (("train", train), ("val", val))
                 for k, v in pooled(graph, rs, entry.input_size).items()}
        if args.cache:
            np.savez(args.cache, **feats)
    y_train = np.array([r.label == "positive" for r in train], dtype=float)
    y_val = np.array([r.label == "positive" for r in val], dtype=float)
    print(f"{entry.name} {entry.version}: {len(train)} MURA train images, {len(val)} validation")
    for name in POOLINGS:
        fit = fit_head(feats[f"train_{name}"], y_train, train, PARTS)
        p_val = 1 / (1 + np.exp(-(feats[f"val_{name}"] @ fit["kernel"] + fit["bias"])
                                / fit["temperature"]))
        row: dict[str, object] = {"lambda": fit["lambda"]}
        for part in PARTS:
            keep = np.array([r.body_part == part for r in val])
            _, sp, sy = mm.study_means([r.study_key for r, k in zip(val, keep) if k],
                                       p_val[keep], y_val[keep])
            point = fit["points"][part]
            row[part] = {
                "oof_auroc": round(point["study_auroc_oof"], 3),
                "oof_kappa": round(point["kappa_oof"], 3),
                "val_auroc": round(mm.auroc(sy, sp), 3),
                "val_kappa": round(mm.cohen_kappa(sy, (sp >= point["threshold"]).astype(float)), 3),
                "threshold": point["threshold"], "studies": len(sy)}
        print(name, json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
