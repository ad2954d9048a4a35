"""Fit a second dense head on a registered classifier's pooled features, and register it.

The fracture classifier's finding is a fracture probability.  MURA labels whole
studies *abnormal* (fracture, hardware, degenerative change, lesion), a different
question, and on the humerus no fracture operating point can be validated (FracAtlas
has 10 fractured shoulder and arm images in its validation split).  A head answers
MURA's question from the features the classifier already computes for every image:
logistic regression on the global average of its last feature map (the mean of the
image's and its mirror's, exactly as :class:`pipeline.classify.ClassifierGraph` serves
it), so it costs one dot product per image and its Grad-CAM is the same closed form.

Everything is chosen on the train split, none of it on the validation split that
``fracture-node evaluate`` then reports:

* the L2 strength, by 5-fold cross-validation grouped by patient (the pooled
  out-of-fold study AUROC);
* the temperature, by the out-of-fold negative log-likelihood;
* each part's threshold, the one with the highest study-level Cohen's kappa of the
  out-of-fold study means (MURA's rule), with a doubt band of 0.1 either side.

The train split's features are optimistic (the backbone saw those images while it
learned fracture, MURA's normal images among its negatives), so the out-of-fold figures
printed here are not the model's metrics: ``--attach-metrics`` copies the validation
figures of ``fracture-node evaluate`` into the entry.

    python -m models.training.head --version 1.0.0 --parts HUMERUS
    fracture-node evaluate --data ../shared/data/msk --out models/eval
    python -m models.training.head --version 1.0.0 --parts HUMERUS --attach-metrics models/eval/metrics.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.registry import device_uid_for, load_registry, sha256_of
from models.training import data as mdata
from models.training import metrics as mm
from models.training.register import MODELS_DIR, _operating_point, dump_registry

logger = logging.getLogger(__name__)

LAMBDAS = (0.1, 0.03, 0.01)
"""L2 strengths tried (on standardised features, per image)."""
FOLDS = 5
DOUBT = 0.1
TEMPERATURES = tuple(round(0.5 + 0.05 * i, 2) for i in range(51))
"""0.50 to 3.00."""
THRESHOLDS = tuple(round(0.05 + 0.01 * i, 2) for i in range(91))
"""0.05 to 0.95."""


def pooled_features(graph: Any, rows: Sequence[mdata.Row], size: int, batch: int = 32) -> np.ndarray:
    """``(n, c)`` float64: the global average of ``graph``'s (a
    :class:`pipeline.classify.ClassifierGraph`) feature map for each row's image."""
    out = []
    for start in range(0, len(rows), batch):
        x = mdata.load_arrays([r.path for r in rows[start:start + batch]], size).astype(np.float32)
        out.append(graph.features(x).mean(axis=(1, 2), dtype=np.float64))
    return np.concatenate(out)


def fit_logistic(x: np.ndarray, y: np.ndarray, lam: float, iterations: int = 50) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method: ``(c + 1,)`` weights, the
    last one the (unpenalised) bias, for ``x`` ``(n, c)`` and labels ``y`` in {0, 1}."""
    xb = np.c_[x, np.ones(len(x))]
    k = xb.shape[1]
    penalty = lam * np.r_[np.ones(k - 1), 0.0]
    beta = np.zeros(k)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-xb @ beta))
        grad = xb.T @ (p - y) / len(y) + penalty * beta
        hess = (xb * (p * (1 - p))[:, None]).T @ xb / len(y) + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-9:
            break
    return beta


def folds_by_patient(rows: Sequence[mdata.Row], folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """A fold index per row; all rows of a patient (else of a study) in one fold."""
    groups = [r.patient_id or r.study_key for r in rows]
    unique = sorted(set(groups))
    np.random.default_rng(seed).shuffle(unique)
    fold = {g: i % folds for i, g in enumerate(unique)}
    return np.array([fold[g] for g in groups])


def out_of_fold(x: np.ndarray, y: np.ndarray, fold: np.ndarray, lam: float) -> np.ndarray:
    """Each row's logit from the head fitted on the other folds."""
    z = np.zeros(len(y))
    for k in np.unique(fold):
        held = fold == k
        beta = fit_logistic(x[~held], y[~held], lam)
        z[held] = np.c_[x[held], np.ones(int(held.sum()))] @ beta
    return z


def _study_auroc(rows: Sequence[mdata.Row], p: np.ndarray, y: np.ndarray) -> float:
    _, sp, sy = mm.study_means([r.study_key for r in rows], p, y)
    return mm.auroc(sy, sp)


def best_threshold(rows: Sequence[mdata.Row], p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(threshold, kappa): the highest study-level kappa of the study means over
    :data:`THRESHOLDS` (the lowest such threshold on ties)."""
    _, sp, sy = mm.study_means([r.study_key for r in rows], p, y)
    kappas = [mm.cohen_kappa(sy, (sp >= t).astype(float)) for t in THRESHOLDS]
    i = int(np.argmax(kappas))
    return THRESHOLDS[i], float(kappas[i])


def fit_head(x: np.ndarray, y: np.ndarray, rows: Sequence[mdata.Row], parts: Sequence[str]
             ) -> dict[str, Any]:
    """Choose the L2 strength, fit, calibrate and choose thresholds (see the module
    docstring); returns the head in feature units and the out-of-fold figures."""
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    xs = (x - mu) / sd
    fold = folds_by_patient(rows)
    cv = {lam: _study_auroc(rows, 1 / (1 + np.exp(-out_of_fold(xs, y, fold, lam))), y) for lam in LAMBDAS}
    lam = max(LAMBDAS, key=lambda v: (round(cv[v], 4), v))  # ties: the stronger penalty
    z = out_of_fold(xs, y, fold, lam)
    nll = {t: float(np.mean(np.logaddexp(0, -z / t) * y + np.logaddexp(0, z / t) * (1 - y)))
           for t in TEMPERATURES}
    temperature = min(TEMPERATURES, key=lambda t: nll[t])
    p = 1 / (1 + np.exp(-z / temperature))
    points = {}
    for part in parts:
        m = np.array([r.body_part == part for r in rows])
        if not m.any():
            raise SystemExit(f"no train rows of {part}: cannot choose its operating point")
        sel = [r for r, keep in zip(rows, m) if keep]
        threshold, kappa = best_threshold(sel, p[m], y[m])
        points[part] = {"threshold": threshold, "kappa_oof": kappa,
                        "study_auroc_oof": _study_auroc(sel, p[m], y[m])}
    beta = fit_logistic(xs, y, lam)
    kernel = beta[:-1] / sd
    bias = float(beta[-1] - np.sum(beta[:-1] * mu / sd))
    return {"kernel": kernel, "bias": bias, "lambda": lam, "cv_study_auroc": cv,
            "temperature": temperature, "points": points}


def flatten_head_metrics(metrics: Mapping[str, Any], name: str, source: str) -> dict[str, Any]:
    """The served parts' validation figures of ``metrics.json`` (``heads.<name>``) as
    flat TOML keys (``humerus_study_auroc`` ...), as :func:`models.registry.validation_summary`
    reads them."""
    block = metrics["heads"][name]
    out: dict[str, Any] = {"source": source, "split": metrics.get("split", "")}
    for part, m in block["by_body_part"].items():
        if not m["served"]:
            continue
        s, low = m["study"], part.lower()
        out[f"{low}_study_auroc"] = s["auroc"]
        out[f"{low}_study_auroc_ci95"] = s["auroc_ci95"]
        out[f"{low}_study_kappa"] = s["kappa"]
        out[f"{low}_study_kappa_ci95"] = s["kappa_ci95"]
        out[f"{low}_study_sensitivity"] = s["sensitivity"]
        out[f"{low}_study_specificity"] = s["specificity"]
        out[f"{low}_studies"] = s["n"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.training.head", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=MODELS_DIR.parent.parent / "shared" / "data" / "msk")
    p.add_argument("--registry", type=Path, default=MODELS_DIR / "registry.toml")
    p.add_argument("--classifier", default="fracture-classifier")
    p.add_argument("--name", default="abnormality-head")
    p.add_argument("--version", required=True)
    p.add_argument("--parts", nargs="+", default=["HUMERUS"],
                   help="body parts the head decides (given operating points)")
    p.add_argument("--train-parts", nargs="+", default=["FOREARM", "HUMERUS", "WRIST"],
                   help="body parts whose MURA train images fit the head")
    p.add_argument("--attach-metrics", type=Path, default=None,
                   help="metrics.json of `fracture-node evaluate` to copy into the registered entry")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    text = args.registry.read_text(encoding="utf-8")
    import tomllib

    existing = tomllib.loads(text)["models"]
    if args.attach_metrics is not None:
        entry = existing.get(args.name)
        if entry is None or entry.get("version") != args.version:
            raise SystemExit(f"{args.name} {args.version} is not registered in {args.registry}")
        metrics = json.loads(args.attach_metrics.read_text())
        measured = {h["name"]: h for h in metrics["models"].get("heads", [])}.get(args.name)
        if measured is None or measured["sha256"] != entry["sha256"]:
            raise SystemExit(f"{args.attach_metrics} was not produced for {args.name} sha256 {entry['sha256']}")
        try:
            source = str(args.attach_metrics.resolve().relative_to(MODELS_DIR.parent))
        except ValueError:
            source = str(args.attach_metrics)
        entry["metrics"] = flatten_head_metrics(metrics, args.name, source)
        args.registry.write_text(dump_registry(existing))
        print(f"attached {source} to {args.name} {args.version}")
        return 0

    from models.runtime import load_graph, write_head
    from pipeline.classify import ClassifierGraph

    registry = load_registry(args.registry)
    base = registry.get(args.classifier, role="classifier")
    rows = [r for r in mdata.in_split(mdata.read_manifest(args.data), "train")
            if r.dataset == "MURA-v1.1" and r.label in ("positive", "negative")
            and r.body_part in args.train_parts]
    y = np.array([1.0 if r.label == "positive" else 0.0 for r in rows])
    logger.info("%d MURA train images (%d abnormal) of %s", len(rows), int(y.sum()), ", ".join(args.train_parts))
    graph = ClassifierGraph(load_graph(base), base.test_time_flip)
    x = pooled_features(graph, rows, base.input_size)
    fit = fit_head(x, y, rows, args.parts)
    for lam, auc in fit["cv_study_auroc"].items():
        print(f"lambda {lam}: out-of-fold study AUROC {auc:.4f} (train split, optimistic)")
    print(f"chosen lambda {fit['lambda']}, temperature {fit['temperature']}")
    for part, pt in fit["points"].items():
        print(f"{part}: threshold {pt['threshold']} (out-of-fold kappa {pt['kappa_oof']:.3f}, "
              f"study AUROC {pt['study_auroc_oof']:.3f})")

    weights = MODELS_DIR / "weights" / f"{args.name}-{args.version}.json"
    about = (f"{args.name} {args.version}: logit = mean(features) @ kernel + bias on the features of "
             f"{base.name} {base.version} (weights sha256 {base.sha256})")
    write_head(weights, fit["kernel"], fit["bias"], about)
    digest = sha256_of(weights)
    counts = {part: sum(1 for r in rows if r.body_part == part) for part in args.train_parts}
    entry: dict[str, Any] = {
        "version": args.version,
        "role": "head",
        "base": base.name,
        "base_sha256": base.sha256,
        "architecture": (f"Dense head (L2 logistic regression) on the global average of the last feature "
                         f"map of {base.name} {base.version} (MobileNetV2), the mean of the image's and "
                         "its mirror's as the classifier serves it"),
        "input_size": base.input_size,
        "classes": ["normal study", "abnormal study"],
        "weights": str(weights.relative_to(args.registry.parent)),
        "sha256": digest,
        "device_uid": device_uid_for(args.name, args.version, digest),
        "feature_layer": base.feature_layer,
        "test_time_flip": base.test_time_flip,
        "training_data": (
            "MURA v1.1 images of the train split of ../shared/data/msk ("
            + ", ".join(f"{k.lower()} {v}" for k, v in counts.items())
            + f"; {int(y.sum())} of {len(y)} from abnormal studies), study-level abnormal labels; "
            f"L2 strength {fit['lambda']} chosen by {FOLDS}-fold cross-validation grouped by patient on "
            "the train split; temperature and thresholds (highest study kappa) on its out-of-fold "
            "predictions; the backbone is frozen"),
        "temperature": fit["temperature"],
        "finding": "abnormality",
        "confidence_floor": 0.0,
        "notes": ("Abnormality probability (MURA's abnormal study: fracture, hardware, degenerative change, "
                  "lesion), not a fracture probability. Decides " + ", ".join(args.parts)
                  + "; validated on the validation split by fracture-node evaluate (heads)."),
        "operating_points": {part: _operating_point(pt["threshold"], DOUBT) for part, pt in fit["points"].items()},
    }
    existing[args.name] = entry
    args.registry.write_text(dump_registry(existing))
    load_registry(args.registry).heads_of(base)  # the entry reads back and fits its base
    print(f"registered {args.name} {args.version} sha256 {digest} on {base.name} {base.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
