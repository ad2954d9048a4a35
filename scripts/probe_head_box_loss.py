"""Probe (issue 13, pointing game): refit the served classifier's dense head on its frozen
feature maps, with a box loss on the activation map, and measure the validation split.

The closed-form Grad-CAM is ``ReLU(A @ w)``: the dense head ``w`` alone decides where the
map peaks on a given feature map ``A``.  This refits ``w`` (and the bias) on the train
split by L-BFGS: the logistic loss of the pooled features of the fracture samples
(:func:`models.training.data.fracture_samples`), ``lam`` times the cross-entropy between the
softmax of ``A @ w`` over the cells and each boxed image's box coverage (the loss training
uses), and a small pull towards the served ``w``.  It then reports, for each ``lam``, the
pointing game on the boxed validation images (the rule of ``fracture-node evaluate``:
the maximum of the map resampled onto the image inside a box) and the image AUROC of the
pooled logit on FracAtlas ``HAND`` and ``LEG``.  Nothing is registered.

    .venv/bin/python scripts/probe_head_box_loss.py --lam 0 0.1 1   # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.registry import load_registry  # noqa: E402
from models.runtime import load_graph  # noqa: E402
from models.training import data as mdata  # noqa: E402
from models.training import metrics as mm  # noqa: E402
from models.training.evaluate import peak_in_box  # noqa: E402
from models.training.head import pooled_features  # noqa: E402
from pipeline.classify import ClassifierGraph  # noqa: E402
from pipeline.gradcam import gradcam_closed_form, upsample  # noqa: E402
from pipeline.resize import fit_square  # noqa: E402
from pipeline.result import GridTransform  # noqa: E402


def boxed_maps(graph: ClassifierGraph, rows: list[mdata.Row], size: int,
               ) -> tuple[np.ndarray, np.ndarray, list[GridTransform]]:
    """Feature maps ``(n, cells, c)``, box coverage per cell ``(n, cells)`` and the
    grid transforms of the boxed positive ``rows``."""
    maps, cover, transforms = [], [], []
    g = graph.grid
    for start in range(0, len(rows), 32):
        squares = []
        for r in rows[start:start + 32]:
            px = mdata.load_pixels(r.path)
            sq, tr = fit_square(px, size)
            squares.append(sq)
            transforms.append(tr)
            m = mdata.box_mask(r.boxes, px.shape, size).astype(np.float32)
            cover.append(m.reshape(g, size // g, g, size // g).mean(axis=(1, 3)).ravel())
        maps.append(graph.features(np.stack(squares)).astype(np.float32))
    a = np.concatenate(maps)
    return a.reshape(len(a), g * g, -1), np.stack(cover), transforms


def fit(x: np.ndarray, y: np.ndarray, a: np.ndarray, target: np.ndarray, w0: np.ndarray,
        b0: float, lam: float, mu: float) -> tuple[np.ndarray, float]:
    """The head ``(w, b)`` minimising the logistic loss + ``lam`` box loss + ``mu |w - w0|^2``."""
    c = len(w0)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:c], theta[c]
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        loss = (-np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12))
                + mu * np.sum((w - w0) ** 2))
        gw = x.T @ (p - y) / len(y) + 2 * mu * (w - w0)
        if lam:
            z = a @ w.astype(np.float32)
            q = np.exp(z - z.max(axis=1, keepdims=True))
            q /= q.sum(axis=1, keepdims=True)
            loss += lam * -np.mean(np.sum(target * np.log(q + 1e-12), axis=1))
            gw = gw + lam * np.einsum("nk,nkc->c", (q - target).astype(np.float32), a) / len(a)
        return loss, np.r_[gw, np.mean(p - y)]

    r = minimize(objective, np.r_[w0, b0], jac=True, method="L-BFGS-B", options={"maxiter": 300})
    return r.x[:c], float(r.x[c])


def pointing_game(a: np.ndarray, transforms: list[GridTransform], rows: list[mdata.Row],
                  w: np.ndarray, size: int) -> float:
    """``fracture-node evaluate``'s rule on maps ``a`` with head ``w``."""
    g = int(round(np.sqrt(a.shape[1])))
    cams = upsample(gradcam_closed_form(a.reshape(len(a), g, g, -1), w.reshape(-1, 1), 0), size)
    hits = [peak_in_box(tr.to_image(cam), r.boxes) for cam, tr, r in zip(cams, transforms, rows)]
    return float(np.mean(hits))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "msk")
    p.add_argument("--lam", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    p.add_argument("--mu", type=float, default=1e-3)
    args = p.parse_args()
    registry = load_registry(ROOT / "models" / "registry.toml")
    entry = registry.get("fracture-classifier", role="classifier")
    graph = ClassifierGraph(load_graph(entry, threads=2), entry.test_time_flip)
    size = entry.input_size
    w0, b0 = graph.head_kernel[:, 0], graph.head_bias
    manifest = mdata.read_manifest(args.data)
    split = {s: mdata.in_split(manifest, s) for s in ("train", "val")}
    boxed = {s: [r for r in rows if r.boxes and r.label == "positive"] for s, rows in split.items()}
    samples = {s: mdata.fracture_samples(rows) for s, rows in split.items()}
    tr_a, tr_cover, _ = boxed_maps(graph, boxed["train"], size)
    va_a, _, va_tr = boxed_maps(graph, boxed["val"], size)
    x = pooled_features(graph, [s.row for s in samples["train"]], size)
    y = np.array([s.target for s in samples["train"]], dtype=np.float64)
    vx = pooled_features(graph, [s.row for s in samples["val"]], size)
    vy = np.array([s.target for s in samples["val"]])
    regions = {reg: np.array([s.row.dataset == "FracAtlas" and reg in s.row.body_part.split("+")
                              for s in samples["val"]]) for reg in ("HAND", "LEG")}
    target = tr_cover / tr_cover.sum(axis=1, keepdims=True)
    print(f"{entry.name} {entry.version}: {len(boxed['train'])} boxed train images, "
          f"{len(samples['train'])} train fracture samples; "
          f"{len(boxed['val'])} boxed validation images")

    def row(name: str, w: np.ndarray, b: float) -> None:
        s = vx @ w + b
        auc = ", ".join(f"{reg} AUROC {mm.auroc(vy[m], s[m]):.3f}"
                        for reg, m in regions.items())
        hits = pointing_game(va_a, va_tr, boxed["val"], w, size)
        print(f"{name}: validation pointing game {hits:.3f}; {auc}", flush=True)

    row("served head", w0, b0)
    for lam in args.lam:
        row(f"refit, box weight {lam}", *fit(x, y, tr_a, target, w0, b0, lam, args.mu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
