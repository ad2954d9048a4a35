"""``fracture-node evaluate --data DIR --out DIR``: metrics, report and plots.

Runs the registered router and classifier through the node's own inference code
(:class:`pipeline.classify.Analyser`, hash-checked loading, the same ``fit_square``
geometry) on a folder with an msk-format ``manifest.csv`` and writes

* ``metrics.json``: ``router.{accuracy, accuracy_supported, per_class, confusion}``,
  ``fracture.image.auroc``, ``fracture.study.{auroc, kappa, sensitivity, specificity, n}``,
  ``fracture.by_body_part.<PART>.study.{...}`` (AUROC and kappa with bootstrap 95 %
  intervals, resampling whole studies / patients), ``localisation.pointing_game``, and
  the SHA-256 of the models evaluated;
* ``report.md`` and PNG plots (ROC per body part, confusion matrices, calibration
  curve, Grad-CAM examples).

Fracture metrics use rows whose ``label`` is positive/negative, whose
``label_meaning`` is one of ``--label-meaning`` (default ``abnormal-study``: MURA) and
whose body part the classifier supports.  Thresholds are the registered ones.  With
``--split`` (default ``val``, or ``all`` if the manifest has no such split) the rows
are filtered by the manifest's ``split`` column.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from models.training import data as mdata
from models.training import metrics as mm
from pipeline.classify import pooled_router_probabilities, router_answer

logger = logging.getLogger(__name__)

DEFAULT_REGISTRY = Path(__file__).resolve().parents[1] / "registry.toml"
DEFAULT_ROUTER = "bodypart-router"
DEFAULT_CLASSIFIER = "fracture-classifier"
MURA_DENSENET_KAPPA = {"HUMERUS": 0.600, "FOREARM": 0.737, "WRIST": 0.931}
BAR_REGIONS = ("HAND", "LEG")
"""FracAtlas regions with a fracture quality bar (image-level AUROC and sensitivity >= 0.90)."""


def _batched(n: int, batch: int) -> list[slice]:
    return [slice(i, min(n, i + batch)) for i in range(0, n, batch)]


def _ci(stat: Any, n: int, groups: np.ndarray | None, n_boot: int, seed: int) -> list[float]:
    lo, hi = mm.bootstrap_ci(stat, n, n_boot=n_boot, seed=seed, groups=groups)
    return [round(lo, 4), round(hi, 4)]


def evaluate_router(analyser: Any, rows: Sequence[mdata.Row], supported: Sequence[str]) -> dict[str, Any]:
    """Router accuracy, per-class recall/precision and confusion on rows with a router target."""
    classes = list(analyser.router_entry.classes)
    known = [r for r in rows if mdata.region_parts(r) is not None]
    if not known:
        return {"n": 0, "classes": classes, "accuracy": float("nan"), "accuracy_supported": float("nan"),
                "per_class": {}, "unsupported_analysed_rate": float("nan"), "n_known_region": 0,
                "supported_parts": list(supported)}
    size = analyser.router_entry.input_size
    probs = []
    for sl in _batched(len(known), 32):
        x = mdata.load_arrays([r.path for r in known[sl]], size)
        probs.append(analyser.predict_router(x.astype(np.float32)))
    p_known = np.concatenate(probs)
    # what is analysed: the classifier's parts and its heads' (pipeline.classify.Coverage)
    coverage = analyser.coverage
    safety = _router_safety(known, p_known, analyser.router_entry, coverage)
    safety["floor_sweep"] = floor_sweep(known, p_known, analyser.router_entry, coverage)
    corrected = [r for r in known if r.manifest_body_part]
    if corrected:
        # the same figure on the manifest's labels, beside the audited ones it reports
        as_manifest = [replace(r, body_part=r.manifest_body_part) if r.manifest_body_part else r for r in known]
        m = _router_safety(as_manifest, p_known, analyser.router_entry, coverage)
        safety["manifest_labels"] = {
            "n_corrected": len(corrected),
            **{k: m[k] for k in ("unsupported_analysed_rate", "unsupported_analysed_rate_ci95",
                                 "unsupported_analysed", "wrong_family_analysed", "wrong_family_analysed_rate",
                                 "n_known_region")}}
    # a class the evaluated router does not have (LEG, HIP for router 1.x) was its OTHER
    targets = [t if t is None or t in classes else mdata.OTHER for t in (mdata.router_target(r) for r in known)]
    keep = np.array([t is not None for t in targets], dtype=bool)
    items = [(r, t) for r, t in zip(known, targets) if t is not None]
    if not items:
        return {"n": 0, "classes": classes, "accuracy": float("nan"), "accuracy_supported": float("nan"),
                "per_class": {}, "supported_parts": list(supported), **safety}
    p = p_known[keep]
    y = np.array([classes.index(t) for _, t in items])
    pred = p.argmax(1)
    conf = np.zeros((len(classes), len(classes)), dtype=int)
    for a, b in zip(y, pred):
        conf[a, b] += 1
    per_class = {}
    for i, c in enumerate(classes):
        n_c = int((y == i).sum())
        per_class[c] = {
            "n": n_c,
            "recall": float(conf[i, i] / n_c) if n_c else float("nan"),
            "precision": float(conf[i, i] / conf[:, i].sum()) if conf[:, i].sum() else float("nan"),
        }
    sup = np.isin(y, [classes.index(c) for c in supported if c in classes])
    floor = analyser.router_entry.confidence_floor
    # as the node decides: pooled over the images of an examination (here: a study,
    # the manifest has no BodyPartExamined), OTHER answers kept out of the pool
    pooled = pooled_router_probabilities(p, [r.study_key for r, _ in items], classes.index(mdata.OTHER), floor)
    pred_pooled = pooled.argmax(1)
    other = y == classes.index(mdata.OTHER)
    by_dataset: dict[str, dict[str, float]] = {}
    for ds in sorted({r.dataset for r, _ in items}):
        m = np.array([r.dataset == ds for r, _ in items])
        by_dataset[ds] = {"n": int(m.sum()), "accuracy": float(np.mean(pred[m] == y[m]))}
    return {
        "n": len(items),
        "classes": classes,
        "accuracy": float(np.mean(pred == y)),
        "accuracy_supported": float(np.mean(pred[sup] == y[sup])) if sup.any() else float("nan"),
        "n_supported": int(sup.sum()),
        "supported_parts": list(supported),
        "other_recall": float(np.mean(pred[other] == y[other])) if other.any() else float("nan"),
        "pooled": {
            "accuracy": float(np.mean(pred_pooled == y)),
            "accuracy_supported": float(np.mean(pred_pooled[sup] == y[sup])) if sup.any() else float("nan"),
            "other_recall": float(np.mean(pred_pooled[other] == y[other])) if other.any() else float("nan"),
            "groups": len({r.study_key for r, _ in items}),
        },
        "below_confidence_floor": float(np.mean(p.max(1) < floor)),
        "per_class": per_class,
        "by_dataset": by_dataset,
        "confusion": conf.tolist(),
        **safety,
    }


def _router_safety(rows: Sequence[mdata.Row], p: np.ndarray, router_entry: Any,
                   classifier_entry: Any) -> dict[str, Any]:
    """The safety figure: share of images (with a known region) analysed as a part they do not show.

    "Analysed" is the node's router step without a header: the answer pooled over the
    study's images (:func:`pipeline.classify.pooled_router_probabilities`) taken as the
    node takes it (:func:`pipeline.classify.router_answer`: a part at or above the
    confidence floor, else its family when the family's parts together reach the floor,
    else not analysed) is one the classifier analyses.  An image analysed as a family
    (finding site the upper limb) is wrong when its region holds none of the family's
    parts.  The header cross-check is not applied (the manifest has no DICOM header), so
    this is the router's figure alone.
    """
    classes = list(router_entry.classes)
    families = classifier_entry.families
    answer, answer_p, allowed, analysed, wrong = _routed(rows, p, router_entry, classifier_entry)
    groups = np.array([r.study_key for r in rows])
    # a fracture classifier shares one operating point per family of parts: the image was
    # analysed as a region it does not show when even the family is wrong (a finger as a
    # wrist is a wrong finding site, a knee as a forearm is also the wrong analysis)
    fam = {part: f for f, parts in mdata.FRACTURE_FAMILIES.items() for part in parts}
    cross = np.array([an and fam.get(a, a) not in {fam.get(x, x) for x in al}
                      for an, a, al in zip(analysed, answer, allowed)], dtype=bool)
    by_dataset: dict[str, dict[str, Any]] = {}
    for ds in sorted({r.dataset for r in rows}):
        m = np.array([r.dataset == ds for r in rows])
        by_dataset[ds] = {"n": int(m.sum()), "analysed": int(analysed[m].sum()),
                          "wrong_part_analysed": int(wrong[m].sum())}
    by_region: dict[str, dict[str, Any]] = {}
    for region in sorted({"+".join(sorted(a)) for a in allowed}):
        m = np.array(["+".join(sorted(a)) == region for a in allowed])
        by_region[region] = {"n": int(m.sum()), "analysed": int(analysed[m].sum()),
                             "wrong_part_analysed": int(wrong[m].sum()),
                             "answers": {c or "UNCERTAIN": int(sum(1 for a, mm_ in zip(answer, m)
                                                                   if mm_ and a == c))
                                         for c in [*classes, *families, ""]
                                         if any(a == c for a, mm_ in zip(answer, m) if mm_)}}
    examples = [{"dataset": r.dataset, "body_part": r.body_part, "answer": a, "p": round(float(q), 3)}
                for r, a, q, w in zip(rows, answer, answer_p, wrong) if w][:20]
    rate = float(wrong.mean())
    return {
        "unsupported_analysed_rate": round(rate, 5),
        "unsupported_analysed_rate_ci95": _ci(lambda i: float(wrong[i].mean()), len(wrong), groups, 2000, 0),
        "unsupported_analysed": int(wrong.sum()),
        "wrong_family_analysed": int(cross.sum()),
        "wrong_family_analysed_rate": round(float(cross.mean()), 5),
        "wrong_family_analysed_rate_ci95": _ci(lambda i: float(cross[i].mean()), len(cross), groups, 2000, 0),
        "unsupported_analysed_with_decision": int(wrong.sum()),
        "n_known_region": len(rows),
        "analysed": int(analysed.sum()),
        "refused_unsupported": int(sum(1 for an, a in zip(analysed, answer) if not an and a)),
        **_answer_counts(answer, analysed, families),
        "safety_by_dataset": by_dataset,
        "safety_by_region": by_region,
        "wrong_part_examples": examples,
        "safety_rule": "pooled router answer (a part at or above the confidence floor, else its family "
                       "when the family's parts together reach it, else not analysed) is one the classifier "
                       "analyses and the image's region does not include it (a family: none of its parts; "
                       "FracAtlas HAND = fingers to elbow); header cross-check not applied",
    }


def _routed(rows: Sequence[mdata.Row], p: np.ndarray, router_entry: Any, classifier_entry: Any
            ) -> tuple[list[str], np.ndarray, list[frozenset[str]], np.ndarray, np.ndarray]:
    """Each image's pooled router answer as the node takes it (and its probability), the
    parts its region allows, whether it is analysed, and whether it is analysed as a part
    it does not show (a family: when its region holds none of the family's parts)."""
    families = classifier_entry.families
    supported = classifier_entry.supported_answers
    answer, answer_p = _answers(p, rows, router_entry, families)
    allowed = [mdata.region_parts(r) or frozenset() for r in rows]
    analysed = np.array([a in supported for a in answer], dtype=bool)

    def shows(a: str, al: frozenset[str]) -> bool:
        return bool(al & set(families[a])) if a in families else a in al

    wrong = np.array([an and not shows(a, al) for an, a, al in zip(analysed, answer, allowed)], dtype=bool)
    return answer, answer_p, allowed, analysed, wrong


def _answer_counts(answer: Sequence[str], analysed: np.ndarray,
                   families: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Images refused as uncertain, and analysed as a family of several parts (LEG is a
    part and its own one-part family)."""
    return {
        "refused_uncertain": int(sum(1 for a in answer if not a)),
        "family_answers": int(sum(1 for an, a in zip(analysed, answer)
                                  if an and len(families.get(a, ())) > 1)),
    }


FLOOR_GRID = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))
"""Confidence floors the sweep measures: 0.50 to 0.90."""


def floor_sweep(rows: Sequence[mdata.Row], p: np.ndarray, router_entry: Any, classifier_entry: Any,
                bar: float = 0.01, halvings: int = 20, seed: int = 0) -> dict[str, Any]:
    """The safety figure and what it costs at each confidence floor of :data:`FLOOR_GRID`,
    and an honest estimate of choosing the floor on these images.

    A higher floor refuses more images as uncertain and answers more by family (finding
    site the upper limb instead of a part): that is the price of fewer wrong parts.
    Choosing the floor on the split that then reports the figure is optimistic, so the
    rule "the lowest floor whose wrong-part rate is at most ``bar``" is also cross-fitted:
    chosen on half of the studies, measured on the other half, ``halvings`` random
    halvings (the mean and range of the held-out rates).
    """
    table, wrong_by_floor = [], {}
    for floor in FLOOR_GRID:
        answer, _, _, analysed, wrong = _routed(rows, p, replace(router_entry, confidence_floor=floor),
                                                classifier_entry)
        wrong_by_floor[floor] = wrong
        table.append({
            "floor": floor, "unsupported_analysed": int(wrong.sum()),
            "unsupported_analysed_rate": round(float(wrong.mean()), 5),
            "analysed": int(analysed.sum()),
            **_answer_counts(answer, analysed, classifier_entry.families),
        })
    groups = np.array([r.study_key for r in rows])
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    held, chosen = [], []
    for _ in range(halvings):
        first = set(rng.permutation(unique)[: len(unique) // 2])
        a = np.array([g in first for g in groups])
        floor = next((f for f in FLOOR_GRID if wrong_by_floor[f][a].mean() <= bar), FLOOR_GRID[-1])
        chosen.append(floor)
        held.append(float(wrong_by_floor[floor][~a].mean()))
    return {
        "table": table,
        "shipped_floor": router_entry.confidence_floor,
        "crossfit": {"rule": f"lowest floor of the grid with wrong-part rate <= {bar:.3f} on half of the studies, "
                             f"measured on the other half ({halvings} random halvings)",
                     "held_out_rate_mean": round(float(np.mean(held)), 5),
                     "held_out_rate_range": [round(min(held), 5), round(max(held), 5)],
                     "floors_chosen": sorted(chosen)},
    }


def evaluate_classifier(
    analyser: Any, rows: Sequence[mdata.Row], meanings: Sequence[str], n_boot: int, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Image- and study-level metrics on labelled rows of supported parts; plus plot data."""
    entry = analyser.classifier_entry
    supported = entry.supported_body_parts
    items = [r for r in rows if r.label in ("positive", "negative") and r.label_meaning in meanings
             and r.body_part in supported]
    if not items:
        logger.warning("no labelled rows of a supported body part: classifier metrics are empty")
        empty = {"n": 0, "auroc": float("nan"), "auroc_ci95": []}
        return ({"label_meanings": list(meanings), "temperature": entry.temperature,
                 "image": {**empty, "positive": 0, "ece": float("nan")},
                 "study": {**empty, "positive": 0, "negative": 0, "kappa": float("nan"), "kappa_ci95": [],
                           "kappa_crossfit": float("nan"), "sensitivity": float("nan"),
                           "specificity": float("nan")},
                 "by_body_part": {},
                 "unsupported_body_parts": sorted({r.body_part for r in rows if r.label in ("positive", "negative")
                                                   and r.label_meaning in meanings} - set(supported))},
                {"roc": {}, "calibration": (np.zeros(0), np.zeros(0)), "study_confusion": {}, "items": [],
                 "probs": np.zeros(0)})
    size = entry.input_size
    probs, logits, heat = [], [], []
    for sl in _batched(len(items), 32):
        x = mdata.load_arrays([r.path for r in items[sl]], size)
        lg, pr, hm = analyser.predict_classifier(x.astype(np.float32))
        logits.append(lg)
        probs.append(pr)
        heat.append(hm[:4].copy())
    p = np.concatenate(probs)
    y = np.array([1 if r.label == "positive" else 0 for r in items])
    patient_of = np.array([r.patient_id or r.study_key for r in items])

    def study_block(mask: np.ndarray) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
        return _study_block(items, p, y, mask, entry.operating_point, n_boot, seed)

    all_mask = np.ones(len(items), dtype=bool)
    study, sp_all, sy_all, _ = study_block(all_mask)
    fracture: dict[str, Any] = {
        "label_meanings": list(meanings),
        "temperature": entry.temperature,
        "image": {
            "n": len(items), "positive": int(y.sum()),
            "auroc": round(mm.auroc(y, p), 4),
            "auroc_ci95": _ci(lambda i: mm.auroc(y[i], p[i]), len(y), patient_of, n_boot, seed),
            "ece": round(_ece(y, p), 4),
        },
        "study": study,
        "by_body_part": {},
        "unsupported_body_parts": sorted({r.body_part for r in rows if r.label in ("positive", "negative")
                                          and r.label_meaning in meanings} - set(supported)),
    }
    plots: dict[str, Any] = {"roc": {}, "calibration": (y, p), "study_confusion": {}}
    for part in supported:
        mask = np.array([r.body_part == part for r in items])
        if not mask.any():
            continue
        block, sp, sy, thr = study_block(mask)
        fracture["by_body_part"][part] = {
            "study": block,
            "image": _image_block(y[mask], p[mask], np.array([entry.operating_point(part).threshold] * int(mask.sum())),
                                  patient_of[mask], n_boot, seed),
            "mura_densenet_kappa": MURA_DENSENET_KAPPA.get(part),
        }
        plots["roc"][part] = (sy, sp)
        plots["study_confusion"][part] = block["confusion"]
    plots["items"] = items
    plots["probs"] = p
    return fracture, plots


def _study_block(items: Sequence[mdata.Row], p: np.ndarray, y: np.ndarray, mask: np.ndarray,
                 operating_point: Any, n_boot: int, seed: int
                 ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """Study-level metrics of the images ``mask`` selects: the mean of each study's image
    probabilities against its body part's ``operating_point(part).threshold`` (MURA's
    rule), intervals by patient; and the study probabilities, labels and thresholds.
    Without an ``operating_point`` (a part no model serves) only the counts and the AUROC."""
    study_of = np.array([r.study_key for r in items])
    patient_of = np.array([r.patient_id or r.study_key for r in items])
    idx = np.flatnonzero(mask)
    keys, sp, sy = mm.study_means(list(study_of[idx]), p[idx], y[idx])
    first = {k: idx[list(study_of[idx]).index(k)] for k in keys}
    spat = np.array([patient_of[first[k]] for k in keys])
    out: dict[str, Any] = {
        "n": len(keys), "positive": int(sy.sum()), "negative": int(len(sy) - sy.sum()),
        "auroc": round(mm.auroc(sy, sp), 4),
        "auroc_ci95": _ci(lambda i: mm.auroc(sy[i], sp[i]), len(sy), spat, n_boot, seed),
    }
    if operating_point is None:
        return out, sp, sy, np.zeros(0)
    thr = np.array([operating_point(items[first[k]].body_part).threshold for k in keys])
    pred = sp >= thr
    summary = mm.binary_summary(sy, pred.astype(float), 0.5)
    out.update({
        "kappa": round(summary["kappa"], 4),
        "kappa_ci95": _ci(lambda i: mm.cohen_kappa(sy[i], pred[i]), len(sy), spat, n_boot, seed),
        "sensitivity": round(summary["sensitivity"], 4),
        "specificity": round(summary["specificity"], 4),
        "accuracy": round(summary["accuracy"], 4),
        "confusion": {"tp": summary["tp"], "fn": summary["fn"], "fp": summary["fp"], "tn": summary["tn"]},
        "threshold": [round(float(t), 4) for t in sorted(set(thr.tolist()))],
    })
    # honest threshold estimate: choose on one half of the patients, apply to the other
    out["kappa_crossfit"] = round(_crossfit_kappa(sy, sp, spat, seed), 4)
    return out, sp, sy, thr


def evaluate_heads(analyser: Any, rows: Sequence[mdata.Row], n_boot: int, seed: int) -> dict[str, Any]:
    """Each head of the classifier (registry role ``head``) on the rows labelled with what
    it measures (an abnormality head: MURA's abnormal-study labels), study level by body
    part as MURA reports it.  A part the head has an operating point for is ``served``
    (the node decides it with this head); the others are measured (AUROC) and not served.
    """
    out: dict[str, Any] = {}
    meaning = {"abnormality": "abnormal-study", "fracture": "fracture"}
    for k, head in enumerate(analyser.head_entries, start=1):
        items = [r for r in rows if r.label in ("positive", "negative")
                 and r.label_meaning == meaning[head.finding] and r.body_part != "UNKNOWN"]
        block: dict[str, Any] = {"name": head.name, "version": head.version, "sha256": head.sha256,
                                 "base": head.base, "finding": head.finding,
                                 "temperature": head.temperature, "by_body_part": {}}
        if not items:
            out[head.name] = block
            continue
        logits = np.concatenate([
            analyser.head_logits(mdata.load_arrays([r.path for r in items[sl]], head.input_size)
                                 .astype(np.float32))[:, k]
            for sl in _batched(len(items), 32)])
        p = 1.0 / (1.0 + np.exp(-logits / head.temperature))
        y = np.array([1 if r.label == "positive" else 0 for r in items])
        patient_of = np.array([r.patient_id or r.study_key for r in items])
        supported = set(head.supported_body_parts)
        for part in sorted({r.body_part for r in items}):
            mask = np.array([r.body_part == part for r in items])
            served = part in supported
            study, _, _, _ = _study_block(items, p, y, mask, head.operating_point if served else None,
                                          n_boot, seed)
            block["by_body_part"][part] = {
                "served": served, "study": study,
                "image": {"n": int(mask.sum()), "auroc": round(mm.auroc(y[mask], p[mask]), 4),
                          "auroc_ci95": _ci(lambda i, m=mask: mm.auroc(y[m][i], p[m][i]), int(mask.sum()),
                                            patient_of[mask], n_boot, seed),
                          "ece": round(_ece(y[mask], p[mask]), 4)},
                "mura_densenet_kappa": MURA_DENSENET_KAPPA.get(part),
            }
        out[head.name] = block
    return out


def _image_block(y: np.ndarray, p: np.ndarray, thr: np.ndarray, groups: np.ndarray, n_boot: int,
                 seed: int) -> dict[str, Any]:
    """Image-level AUROC (grouped bootstrap interval), sensitivity and specificity at ``thr``."""
    pred = p >= thr
    if len(set(y.tolist())) < 2:  # one label only: no AUROC, but its own rate at the threshold
        pos = y == 1
        return {"n": int(len(y)), "positive": int(y.sum()), "auroc": float("nan"), "auroc_ci95": [],
                "sensitivity": round(float(pred[pos].mean()), 4) if pos.any() else float("nan"),
                "specificity": round(float((~pred[~pos]).mean()), 4) if (~pos).any() else float("nan"),
                "threshold": sorted({round(float(t), 4) for t in thr.tolist()})}
    pos, neg = y == 1, y == 0
    sens, spec = float(pred[pos].mean()), float((~pred[neg]).mean())
    return {
        "n": int(len(y)), "positive": int(y.sum()),
        "auroc": round(mm.auroc(y, p), 4),
        "auroc_ci95": _ci(lambda i: mm.auroc(y[i], p[i]), len(y), groups, n_boot, seed),
        "sensitivity": round(sens, 4),
        "sensitivity_ci95": _ci(lambda i: float((p[i] >= thr[i])[y[i] == 1].mean()) if (y[i] == 1).any()
                                else float("nan"), len(y), groups, n_boot, seed),
        "specificity": round(spec, 4),
        "specificity_ci95": _ci(lambda i: float((p[i] < thr[i])[y[i] == 0].mean()) if (y[i] == 0).any()
                                else float("nan"), len(y), groups, n_boot, seed),
        "threshold": sorted({round(float(t), 4) for t in thr.tolist()}),
    }


def evaluate_fracture_labelled(analyser: Any, rows: Sequence[mdata.Row], n_boot: int,
                               seed: int) -> dict[str, Any]:
    """The classifier's output on fracture-labelled images (``label_meaning == 'fracture'``), image level.

    Per dataset and per FracAtlas region (``HAND``, ``LEG``, ...; ``+``-joined regions as
    they are), whether or not the region is supported: this is what the number means on
    fracture labels. Thresholds: the registered ``DEFAULT`` operating point.
    """
    entry = analyser.classifier_entry
    items = [r for r in rows if r.label in ("positive", "negative") and r.label_meaning == "fracture"]
    if not items:
        return {"n": 0, "by_dataset": {}, "by_region": {}}
    probs = []
    for sl in _batched(len(items), 32):
        x = mdata.load_arrays([r.path for r in items[sl]], entry.input_size)
        probs.append(analyser.predict_classifier(x.astype(np.float32))[1])
    p = np.concatenate(probs)
    y = np.array([1 if r.label == "positive" else 0 for r in items])
    thr = np.full(len(items), entry.operating_point("DEFAULT").threshold)
    groups = np.array([r.study_key for r in items])
    out: dict[str, Any] = {"n": len(items), "positive": int(y.sum()),
                           "image": _image_block(y, p, thr, groups, n_boot, seed), "by_dataset": {}, "by_region": {}}
    for ds in sorted({r.dataset for r in items}):
        m = np.array([r.dataset == ds for r in items])
        out["by_dataset"][ds] = _image_block(y[m], p[m], thr[m], groups[m], n_boot, seed)
    for region in sorted({r.body_part for r in items if r.dataset == "FracAtlas"}):
        m = np.array([r.dataset == "FracAtlas" and r.body_part == region for r in items])
        out["by_region"][region] = _image_block(y[m], p[m], thr[m], groups[m], n_boot, seed)
    return out


def routed_parts(predict_router: Any, router_entry: Any, rows: Sequence[mdata.Row],
                 families: Mapping[str, Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """The router's answer for each row as the node takes it without a header (softmax
    pooled over the row's study, :func:`pipeline.classify.pooled_router_probabilities`,
    then :func:`pipeline.classify.router_answer` with the classifier's ``families``: a
    part, a family, or ``""`` when uncertain) and its probability.  ``predict_router``
    maps prepared squares to the softmax (:meth:`pipeline.classify.Analyser.predict_router`,
    :meth:`pipeline.classify.RouterGraph.probabilities`)."""
    if not rows:
        return [], np.zeros(0)
    size = router_entry.input_size
    probs = np.concatenate([predict_router(mdata.load_arrays([r.path for r in rows[sl]], size).astype(np.float32))
                            for sl in _batched(len(rows), 32)])
    return _answers(probs, rows, router_entry, families)


def _answers(probs: np.ndarray, rows: Sequence[mdata.Row], router_entry: Any,
             families: Mapping[str, Sequence[str]]) -> tuple[list[str], np.ndarray]:
    classes = list(router_entry.classes)
    floor = router_entry.confidence_floor
    pooled = pooled_router_probabilities(probs, [r.study_key for r in rows], classes.index(mdata.OTHER),
                                         floor)
    answers = [router_answer(q, classes, families, floor) for q in pooled]
    return [a.part for a in answers], np.array([a.probability for a in answers])


def evaluate_served_fracture(analyser: Any, rows: Sequence[mdata.Row], n_boot: int, seed: int,
                             target_sensitivity: float = 0.90) -> tuple[dict[str, Any], dict[str, Any]]:
    """A fracture classifier as the node serves it, on the fracture-labelled images with
    true negatives (:func:`models.training.data.fracture_samples`), image level.

    Each image is routed as the node routes it without a header (:func:`routed_parts`);
    an image routed to a part the classifier does not support is refused (counted per
    region, fractured ones apart); an analysed one is positive when its calibrated
    probability reaches the operating point of the part it was routed to.
    ``by_body_part`` is keyed by FracAtlas region (``HAND`` = fingers to elbow, ``LEG`` =
    knee to foot, ...), ``by_router_part`` by the part the router chose.  Thresholds were
    chosen on this split, so ``crossfit`` (threshold chosen on half of the images,
    measured on the other half) is the honest sensitivity and specificity.
    """
    entry = analyser.classifier_entry
    supported = set(entry.supported_answers)
    items = [s.row for s in mdata.fracture_samples(rows)]
    answers, _ = routed_parts(analyser.predict_router, analyser.router_entry, items, entry.families)
    analysed = np.array([a in supported for a in answers], dtype=bool)
    probs = []
    for sl in _batched(len(items), 32):
        x = mdata.load_arrays([r.path for r in items[sl]], entry.input_size)
        probs.append(analyser.predict_classifier(x.astype(np.float32))[1])
    p = np.concatenate(probs) if probs else np.zeros(0)
    y = np.array([1 if r.label == "positive" else 0 for r in items])
    thr = np.array([entry.operating_point(a).threshold for a in answers])
    groups = np.array([r.study_key for r in items])
    region = np.array([r.body_part if r.dataset == "FracAtlas" else "" for r in items])
    a = analysed

    def block(m: np.ndarray) -> dict[str, Any]:
        out = _image_block(y[m & a], p[m & a], thr[m & a], groups[m & a], n_boot, seed)
        out.update({"routed": int(m.sum()), "refused": int((m & ~a).sum()),
                    "refused_fractured": int((m & ~a & (y == 1)).sum())})
        return out

    fracture: dict[str, Any] = {
        "label_meanings": ["fracture"],
        "temperature": entry.temperature,
        "served": True,
        "n": len(items), "analysed": int(a.sum()), "refused": int((~a).sum()),
        "image": {**block(np.ones(len(items), dtype=bool)),
                  "ece": round(_ece(y[a], p[a]), 4) if a.any() else float("nan")},
        "by_body_part": {},
        "by_router_part": {},
        "by_dataset": {},
        "unsupported_body_parts": sorted({x or "UNCERTAIN" for x in answers} - supported),
        "family_answers": int(sum(1 for x in answers if len(entry.families.get(x, ())) > 1)),
    }
    for reg in sorted(set(region.tolist()) - {""}):
        fracture["by_body_part"][reg] = {"image": block(region == reg)}
    for part in sorted(supported):
        m = np.array([x == part for x in answers])
        if m.any():
            fracture["by_router_part"][part] = block(m)
    for ds in sorted({r.dataset for r in items}):
        fracture["by_dataset"][ds] = block(np.array([r.dataset == ds for r in items]))
    family = np.array([next((f for f, parts in mdata.FRACTURE_FAMILIES.items() if x in parts), x)
                       for x in answers])
    cross = {}
    fit = np.array([r.dataset in mdata.FRACTURE_THRESHOLD_DATASETS for r in items], dtype=bool)
    if a.any():
        cross["all"] = _crossfit_sensitivity(y, p, family, groups, a, np.ones(len(y), dtype=bool),
                                             target_sensitivity, seed, fit=fit)
        for reg in fracture["by_body_part"]:
            cross[reg] = _crossfit_sensitivity(y, p, family, groups, a, region == reg, target_sensitivity,
                                               seed, fit=fit)
    fracture["crossfit"] = {"target_sensitivity": target_sensitivity, **cross}
    if a.any():
        fracture["threshold_spread"] = _threshold_spread(
            y, p, family, thr, groups, a & fit, target_sensitivity, seed)
    plots: dict[str, Any] = {
        "roc": {reg: (y[a & (region == reg)], p[a & (region == reg)]) for reg in fracture["by_body_part"]
                if len(set(y[a & (region == reg)].tolist())) == 2},
        "calibration": (y[a], p[a]), "study_confusion": {},
        "items": [r for r, k in zip(items, a) if k], "probs": p[a],
    }
    return fracture, plots


def _crossfit_sensitivity(y: np.ndarray, p: np.ndarray, family: np.ndarray, groups: np.ndarray,
                          analysed: np.ndarray, in_region: np.ndarray, target: float, seed: int,
                          reps: int = 20, fit: np.ndarray | None = None) -> dict[str, float]:
    """Sensitivity and specificity on the analysed images ``in_region`` when each family's
    threshold (the highest with sensitivity >= ``target``) is chosen on the analysed
    images (of ``fit``, default all) of one half of the groups and applied to the other
    half (mean of ``reps`` random halvings; a halving where a family has no fractured
    image to choose on is skipped)."""
    fit = np.ones(len(y), dtype=bool) if fit is None else fit
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups[analysed])
    sens, spec = [], []
    for _ in range(reps):
        half = set(rng.permutation(uniq)[: len(uniq) // 2].tolist())
        h = np.array([g in half for g in groups])
        pred = np.zeros(len(y), dtype=bool)
        ok = True
        for fam in np.unique(family[analysed]):
            for chosen_on, apply in ((h, ~h), (~h, h)):
                fm = chosen_on & fit & analysed & (family == fam)
                am = apply & analysed & (family == fam)
                if not y[fm].any():
                    ok = False
                    break
                pred[am] = p[am] >= mm.threshold_for_sensitivity(y[fm], p[fm], target)
        m = analysed & in_region
        if ok and (y[m] == 1).any() and (y[m] == 0).any():
            sens.append(float(pred[m & (y == 1)].mean()))
            spec.append(float((~pred[m & (y == 0)]).mean()))
    return {"sensitivity": round(float(np.mean(sens)), 4) if sens else float("nan"),
            "specificity": round(float(np.mean(spec)), 4) if spec else float("nan"), "halvings": len(sens)}


def _threshold_spread(y: np.ndarray, p: np.ndarray, family: np.ndarray, thr: np.ndarray,
                      groups: np.ndarray, chosen_on: np.ndarray, target: float, seed: int,
                      reps: int = 200) -> dict[str, dict[str, Any]]:
    """How steady each family's threshold rule is: the threshold the rule (the highest
    with sensitivity >= ``target``) chooses on bootstrap resamples of the groups (patients,
    id blocks) of the images it is chosen on (``chosen_on``), beside the registered one
    (``thr``).  A wide range says the operating point rests on a few fractured images."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    for fam in sorted(set(family[chosen_on].tolist())):
        m = chosen_on & (family == fam)
        if not y[m].any():
            continue
        uniq = np.unique(groups[m])
        members = {g: np.flatnonzero(m & (groups == g)) for g in uniq}
        chosen = []
        for _ in range(reps):
            idx = np.concatenate([members[g] for g in rng.choice(uniq, len(uniq))])
            if y[idx].any():
                chosen.append(mm.threshold_for_sensitivity(y[idx], p[idx], target))
        lo, med, hi = np.percentile(chosen, [2.5, 50, 97.5])
        out[str(fam)] = {"registered": round(float(thr[m][0]), 4), "median": round(float(med), 4),
                         "ci95": [round(float(lo), 4), round(float(hi), 4)],
                         "images": int(m.sum()), "fractured": int(y[m].sum()), "resamples": len(chosen)}
    return out


def _crossfit_kappa(y: np.ndarray, prob: np.ndarray, groups: np.ndarray, seed: int, reps: int = 20) -> float:
    """Mean kappa when the threshold is chosen on a random half of the patients and applied
    to the other half (both ways, ``reps`` splits): an estimate free of threshold optimism."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    vals = []
    for _ in range(reps):
        half = set(rng.permutation(uniq)[: len(uniq) // 2].tolist())
        a = np.array([g in half for g in groups])
        for fit, test in ((a, ~a), (~a, a)):
            if len(set(y[fit].tolist())) < 2 or len(set(y[test].tolist())) < 2:
                continue
            t = mm.choose_threshold(y[fit], prob[fit], "kappa")
            vals.append(mm.cohen_kappa(y[test], prob[test] >= t))
    return float(np.mean(vals)) if vals else float("nan")


def _ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (p >= lo) & (p < hi) if hi < 1 else (p >= lo) & (p <= hi)
        if m.any():
            total += m.mean() * abs(p[m].mean() - y[m].mean())
    return float(total)


def peak_in_box(img_map: np.ndarray, boxes: Sequence[Sequence[float]]) -> bool:
    """The pointing game's rule: whether the maximum of a map on the image grid (at its
    pixel's centre) lies inside any of ``boxes`` (normalised ``[x0, y0, x1, y1]``), no
    tolerance."""
    row_i, col_i = np.unravel_index(int(np.argmax(img_map)), img_map.shape)
    yy, xx = (row_i + 0.5) / img_map.shape[0], (col_i + 0.5) / img_map.shape[1]
    return any(b[0] <= xx <= b[2] and b[1] <= yy <= b[3] for b in boxes)


def pointing_game(analyser: Any, rows: Sequence[mdata.Row]) -> tuple[dict[str, Any], list[Any]]:
    """Share of positive images with boxes whose Grad-CAM maximum lies inside a box."""
    from pipeline.resize import fit_square

    items = [r for r in rows if r.boxes and r.label == "positive"]
    supported = set(analyser.classifier_entry.supported_body_parts)
    size = analyser.classifier_entry.input_size
    hits: list[bool] = []
    parts: list[str] = []
    examples: list[Any] = []
    for sl in _batched(len(items), 32):
        batch = items[sl]
        squares, transforms, pix = [], [], []
        for r in batch:
            px = mdata.load_pixels(r.path)
            sq, tr = fit_square(px, size)
            squares.append(sq)
            transforms.append(tr)
            pix.append(px)
        _, _, heat = analyser.predict_classifier(np.stack(squares))
        for r, tr, hm, px in zip(batch, transforms, heat, pix):
            img_map = tr.to_image(hm)
            hit = peak_in_box(img_map, r.boxes)
            hits.append(hit)
            parts.append(r.body_part)
            if len(examples) < 8 and (r.body_part in supported or len(examples) < 4):
                examples.append((px, img_map, r.boxes, f"{r.body_part} {'hit' if hit else 'miss'}"))
    h = np.array(hits, dtype=bool)
    parts_a = np.array(parts)
    by_part = {
        part: {"n": int((parts_a == part).sum()), "pointing_game": round(float(h[parts_a == part].mean()), 4)}
        for part in sorted(set(parts))
    }
    sup = np.isin(parts_a, list(supported))
    # box share of the image: the chance level of the pointing game
    area = [float(np.clip(sum((b[2] - b[0]) * (b[3] - b[1]) for b in r.boxes), 0, 1)) for r in items]
    return {
        "n": int(len(h)),
        "pointing_game": round(float(h.mean()), 4) if len(h) else float("nan"),
        "pointing_game_ci95": _ci(lambda i: float(h[i].mean()), len(h), None, 2000, 0) if len(h) else [],
        "n_supported_parts": int(sup.sum()),
        "pointing_game_supported_parts": round(float(h[sup].mean()), 4) if sup.any() else float("nan"),
        "mean_box_area_fraction": round(float(np.mean(area)), 4) if area else float("nan"),
        "by_body_part": by_part,
        "rule": "Grad-CAM maximum (on the image grid) inside any fracture box, no tolerance",
        "datasets": sorted({r.dataset for r in items}),
    }, examples


def write_plots(out: Path, router: dict[str, Any], plots: dict[str, Any], examples: list[Any],
                analyser: Any) -> list[str]:
    """ROC per body part, confusion matrices, calibration curve, Grad-CAM grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(5, 5))
    for part, (sy, sp) in plots["roc"].items():
        fpr, tpr, _ = mm.roc_curve(sy, sp)
        ax.plot(fpr, tpr, label=f"{part} (AUROC {mm.auroc(sy, sp):.3f}, n={len(sy)})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="Study-level ROC (validation)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc_by_body_part.png", dpi=110)
    plt.close(fig)
    files.append("roc_by_body_part.png")

    if router.get("n"):
        conf = np.array(router["confusion"])
        classes = router["classes"]
        fig, ax = plt.subplots(figsize=(6, 5.5))
        ax.imshow(conf / np.maximum(1, conf.sum(1, keepdims=True)), cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                if conf[i, j]:
                    ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set(xlabel="router", ylabel="truth", title=f"Router confusion (accuracy {router['accuracy']:.3f})")
        fig.tight_layout()
        fig.savefig(out / "router_confusion.png", dpi=110)
        plt.close(fig)
        files.append("router_confusion.png")

    parts = list(plots["study_confusion"])
    if parts:
        fig, axes = plt.subplots(1, len(parts), figsize=(3.2 * len(parts), 3.2), squeeze=False)
        for ax, part in zip(axes[0], parts):
            c = plots["study_confusion"][part]
            m = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
            ax.imshow(m, cmap="Blues")
            for i in range(2):
                for j in range(2):
                    ax.text(j, i, str(m[i, j]), ha="center", va="center")
            ax.set_xticks([0, 1], ["pred normal", "pred abnormal"], fontsize=8)
            ax.set_yticks([0, 1], ["normal", "abnormal"], fontsize=8)
            ax.set_title(f"{part} studies", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "study_confusion.png", dpi=110)
        plt.close(fig)
        files.append("study_confusion.png")

    y, p = plots["calibration"]
    edges = np.linspace(0, 1, 11)
    centers, freq, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (p >= lo) & (p <= hi if hi == 1 else p < hi)
        if m.any():
            centers.append(p[m].mean())
            freq.append(y[m].mean())
            counts.append(int(m.sum()))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.plot(centers, freq, "o-")
    for c, f, n in zip(centers, freq, counts):
        ax.annotate(str(n), (c, f), fontsize=7, xytext=(3, -8), textcoords="offset points")
    ax.set(xlabel="calibrated probability", ylabel="observed abnormal fraction",
           title=f"Calibration, images (T={analyser.classifier_entry.temperature:.2f})")
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)
    files.append("calibration.png")

    # Grad-CAM grid: MURA examples (highest and lowest scores) + box images
    from pipeline.resize import fit_square

    items, probs = plots["items"], plots["probs"]
    order = np.argsort(-probs)
    picks = [i for i in order if items[i].label == "positive"][:4] + [i for i in order[::-1] if items[i].label == "negative"][:2]
    tiles = []
    size = analyser.classifier_entry.input_size
    for i in picks:
        px = mdata.load_pixels(items[i].path)
        sq, tr = fit_square(px, size)
        _, pr, hm = analyser.predict_classifier(sq[None])
        tiles.append((px, tr.to_image(hm[0]), (), f"{items[i].body_part} {items[i].label} p={pr[0]:.2f}"))
    tiles += examples[:6]
    if tiles:
        cols = 4
        rows_n = int(np.ceil(len(tiles) / cols))
        fig, axes = plt.subplots(rows_n, cols, figsize=(3 * cols, 3 * rows_n), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, (px, hm, boxes, title) in zip(axes.ravel(), tiles):
            ax.imshow(px, cmap="gray")
            ax.imshow(hm, cmap="jet", alpha=0.35, vmin=0, vmax=1)
            for b in boxes:
                h, w = px.shape
                ax.add_patch(plt.Rectangle((b[0] * w, b[1] * h), (b[2] - b[0]) * w, (b[3] - b[1]) * h,
                                           fill=False, ec="lime", lw=1.2))
            ax.set_title(title, fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "gradcam_examples.png", dpi=100)
        plt.close(fig)
        files.append("gradcam_examples.png")
    return files


def _fmt_ci(v: float, ci: Sequence[float]) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def _served_fracture_lines(f: dict[str, Any]) -> list[str]:
    """The fracture section of ``report.md`` (``f``: :func:`evaluate_served_fracture`'s metrics)."""
    cross = f.get("crossfit", {})
    target = cross.get("target_sensitivity", 0.90)

    def row(label: str, b: dict[str, Any], bars: bool) -> str:
        cf = cross.get(label, {}) if bars or label == "all" else {}
        verdict = ""
        if bars and label not in BAR_REGIONS:
            verdict = "-"
        elif bars:
            ok_a = b["auroc"] >= 0.90
            ok_s = b["sensitivity"] >= 0.90
            ok_c = bool(cf) and cf["sensitivity"] >= 0.90
            verdict = (f"AUROC {'met' if ok_a else 'MISSED'}, sensitivity {'met' if ok_s else 'MISSED'} "
                       f"(cross-fitted: {'met' if ok_c else 'MISSED'})")
        return (f"| {label} | {b['routed']} ({b['refused']} refused, {b['refused_fractured']} of them fractured) | "
                f"{b['n']} ({b['positive']}) | {_fmt_ci(b['auroc'], b.get('auroc_ci95', []))} | "
                f"{_fmt_ci(b['sensitivity'], b.get('sensitivity_ci95', []))} | "
                f"{_fmt_ci(b['specificity'], b.get('specificity_ci95', []))} | "
                + (f"{cf['sensitivity']:.3f} / {cf['specificity']:.3f}" if cf else "-") + f" | {verdict} |")

    head = ["| set | routed (refused) | analysed (fractured) | AUROC [95% CI] | sensitivity [95% CI] | "
            "specificity [95% CI] | sens / spec, threshold cross-fitted | bars (AUROC >= 0.90, sens >= 0.90) |",
            "|---|---|---|---|---|---|---|---|"]
    lines = [
        "",
        "## Fracture classifier, as served (image level, fracture labels)",
        "",
        f"The {f['n']} validation images of the fracture-labelled sets with true negatives, each routed as the "
        f"node routes it without a header; {f['refused']} were refused (routed to a part the classifier does "
        f"not support). An analysed image is positive when its calibrated probability (temperature "
        f"{f['temperature']:.3f}) reaches the operating point of the part it was routed to. Per FracAtlas "
        f"region (HAND = fingers to elbow, LEG = knee to foot):",
        "",
        *head,
    ]
    lines += [row(reg, v["image"], True) for reg, v in f["by_body_part"].items()]
    lines.append(row("all", f["image"], False))
    lines += ["", "Per router part (the part each image was analysed as):", "", *head]
    lines += [row(part, b, False) for part, b in f["by_router_part"].items()]
    lines += ["", "Per dataset:", "", *head]
    lines += [row(ds, b, False) for ds, b in f["by_dataset"].items()]
    lines += [
        "",
        f"The thresholds (the highest with sensitivity >= {target:.2f} on the "
        f"{'/'.join(mdata.FRACTURE_THRESHOLD_DATASETS)} images, one per family of router parts) and the "
        "temperature were chosen on this same split, so the sensitivity and specificity columns are optimistic; "
        "the cross-fitted pair (thresholds chosen the same way on half of the images, measured on the other "
        "half, 20 random halvings) is the honest estimate. AUROC does not depend on the thresholds. Expected calibration error "
        f"{f['image'].get('ece', float('nan')):.3f}. Router answers not analysed: "
        f"{', '.join(f['unsupported_body_parts']) or 'none'}.",
    ]
    spread = f.get("threshold_spread", {})
    if spread:
        lines += ["", "How steady the threshold rule is: the threshold it chooses on 200 bootstrap resamples "
                  "(of patients or id blocks) of the images it was chosen on, beside the registered one. A wide "
                  "range means the operating point rests on a few fractured images.", "",
                  "| family | images (fractured) | registered threshold | rule on resamples: median [95% range] |",
                  "|---|---|---|---|"]
        lines += [f"| {fam} | {v['images']} ({v['fractured']}) | {v['registered']:.3f} | "
                  f"{v['median']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] |" for fam, v in spread.items()]
    return lines


def _mura_lines(f: dict[str, Any], title: str, heads: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The MURA study-level table of ``report.md`` (``f``: :func:`evaluate_classifier`'s
    metrics; ``heads``: the body parts each head decides instead)."""
    decided = {part: name for name, parts in (heads or {}).items() for part in parts}
    missing = [f"{part} (decided by {decided[part]}, below)" if part in decided else part
               for part in f["unsupported_body_parts"]]
    lines = [
        "",
        f"## {title}",
        "",
        "| body part | studies (pos/neg) | AUROC [95% CI] | kappa [95% CI] | kappa, threshold cross-fitted | sens | spec | MURA DenseNet kappa | bars (AUROC >= 0.90, kappa > paper) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for part, b in f["by_body_part"].items():
        s = b["study"]
        ref = b.get("mura_densenet_kappa")
        ok_a = s["auroc"] >= 0.90
        ok_k = ref is not None and s["kappa"] > ref
        lines.append(
            f"| {part} | {s['n']} ({s['positive']}/{s['negative']}) | {_fmt_ci(s['auroc'], s['auroc_ci95'])} | "
            f"{_fmt_ci(s['kappa'], s['kappa_ci95'])} | {s['kappa_crossfit']:.3f} | {s['sensitivity']:.3f} | "
            f"{s['specificity']:.3f} | {ref if ref is not None else '-'} | "
            f"AUROC {'met' if ok_a else 'MISSED'}, kappa {'met' if ok_k else 'MISSED'} |"
        )
    s = f["study"]
    lines += [
        f"| all supported | {s['n']} ({s['positive']}/{s['negative']}) | {_fmt_ci(s['auroc'], s['auroc_ci95'])} | "
        f"{_fmt_ci(s['kappa'], s['kappa_ci95'])} | {s['kappa_crossfit']:.3f} | {s['sensitivity']:.3f} | {s['specificity']:.3f} | | |",
        "",
        f"Image level: AUROC {_fmt_ci(f['image']['auroc'], f['image']['auroc_ci95'])} on {f['image']['n']} images; "
        f"expected calibration error {f['image']['ece']:.3f} (temperature {f['temperature']:.3f}).",
        "",
        "Thresholds (and the temperature) were chosen on this same validation split, so the kappa, "
        "sensitivity and specificity columns are optimistic; the cross-fitted kappa (threshold chosen on "
        "half of the patients, measured on the other half, 20 random halvings) is the honest estimate. "
        "AUROC does not depend on the threshold or the temperature.",
        "",
        "Labelled body parts without a validated operating point of this classifier (answered 'not "
        f"analysed: unsupported body part' unless a head decides them): {', '.join(missing) or 'none'}.",
        "",
    ]
    return lines


def _heads_lines(m: dict[str, Any]) -> list[str]:
    """The heads' section of ``report.md`` (:func:`evaluate_heads`)."""
    lines: list[str] = []
    for name, h in m.get("heads", {}).items():
        lines += [
            "",
            f"## Head `{name}` {h['version']}: {h['finding']} on the pooled features of `{h['base']}` "
            "(study level = mean of image probabilities)",
            "",
            "Fitted, calibrated (temperature {:.2f}) and given its thresholds on the train split only "
            "(`python -m models.training.head`): no parameter of the head was chosen on these "
            "validation figures, so they need no cross-fitting. A served part is decided by this head in the node; the others are measured "
            "and not served.".format(h["temperature"]),
            "",
            "| body part | served | studies (pos/neg) | AUROC [95% CI] | kappa [95% CI] | sens | spec | "
            "image AUROC (images) | MURA DenseNet kappa | bars (AUROC >= 0.92, kappa > paper) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for part, b in h["by_body_part"].items():
            s, ref = b["study"], b.get("mura_densenet_kappa")
            image = f"{b['image']['auroc']:.3f} ({b['image']['n']})"
            if b["served"]:
                ok_a, ok_k = s["auroc"] >= 0.92, ref is not None and s["kappa"] > ref
                lines.append(
                    f"| {part} | yes | {s['n']} ({s['positive']}/{s['negative']}) | "
                    f"{_fmt_ci(s['auroc'], s['auroc_ci95'])} | {_fmt_ci(s['kappa'], s['kappa_ci95'])} | "
                    f"{s['sensitivity']:.3f} | {s['specificity']:.3f} | {image} | {ref if ref is not None else '-'} | "
                    f"AUROC {'met' if ok_a else 'MISSED'}, kappa {'met' if ok_k else 'MISSED'} |")
            else:
                lines.append(
                    f"| {part} | no | {s['n']} ({s['positive']}/{s['negative']}) | "
                    f"{_fmt_ci(s['auroc'], s['auroc_ci95'])} | - | - | - | {image} | "
                    f"{ref if ref is not None else '-'} | not served |")
        lines.append("")
    return lines


def write_report(out: Path, metrics: dict[str, Any], files: Sequence[str]) -> None:
    """``report.md`` summarising ``metrics.json`` against the quality bars."""
    m = metrics
    f, r, loc = m["fracture"], m["router"], m["localisation"]
    lines = [
        "# fracture-node model evaluation",
        "",
        f"Generated {m['generated']} by `fracture-node evaluate` on `{m['data']}` "
        f"(split `{m['split']}`), {m['n_boot']} bootstrap resamples of whole patients/studies.",
        "",
        "| model | name | version | input | test-time flip | served in | SHA-256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for role in ("router", "classifier"):
        mi = m["models"][role]
        grid = f", Grad-CAM grid {mi['feature_grid']} x {mi['feature_grid']}" if "feature_grid" in mi else ""
        lines.append(f"| {role} | {mi['name']} | {mi['version']} | {mi.get('input_size', '?')} px{grid} | "
                     f"{'yes' if mi.get('test_time_flip') else 'no'} | {mi.get('precision', 'fp32')} | "
                     f"`{mi['sha256']}` |")
    for h in m["models"].get("heads", []):
        lines.append(f"| head ({h['finding']}: {', '.join(h['supported_body_parts'])}) | {h['name']} | "
                     f"{h['version']} | the classifier's pooled features | as the classifier | as the "
                     f"classifier | `{h['sha256']}` |")
    if f.get("served"):
        lines += _served_fracture_lines(f)
        lines += _mura_lines(f["mura_abnormality"], "Fracture output on MURA's abnormal-study labels "
                             "(cross-check, study level = mean of image probabilities)",
                             {h["name"]: h["supported_body_parts"] for h in m["models"].get("heads", [])})
    else:
        lines += _mura_lines(f, "Abnormality classifier (study level = mean of image probabilities)")
    lines += _heads_lines(m)
    lines += [
        "",
        "## Fracture-labelled images (image level; label_meaning `fracture`)",
        "",
        "The classifier's probability on images labelled fracture / no fracture, at the registered DEFAULT "
        "threshold, per dataset and per FracAtlas region (supported or not):",
        "",
        "| set | images (pos) | AUROC [95% CI] | sensitivity [95% CI] | specificity [95% CI] |",
        "|---|---|---|---|---|",
    ]
    fl = f.get("fracture_labelled", {})
    for label, blocks in (("dataset", fl.get("by_dataset", {})), ("FracAtlas region", fl.get("by_region", {}))):
        for k, b in blocks.items():
            lines.append(f"| {label} {k} | {b['n']} ({b['positive']}) | {_fmt_ci(b['auroc'], b.get('auroc_ci95', []))} | "
                         f"{_fmt_ci(b['sensitivity'], b.get('sensitivity_ci95', []))} | "
                         f"{_fmt_ci(b['specificity'], b.get('specificity_ci95', []))} |")
    lines += [
        "",
        "## Body-part router: safety",
        "",
        f"Images analysed as a body part they do not show (`router.unsupported_analysed_rate`): "
        f"{r.get('unsupported_analysed', 0)} of {r.get('n_known_region', 0)} validation images with a known region = "
        f"{_fmt_ci(100 * r.get('unsupported_analysed_rate', float('nan')), [100 * c for c in r.get('unsupported_analysed_rate_ci95', [])])} % "
        f"(bar <= 1 %). Of them, {r.get('wrong_family_analysed', 0)} = "
        f"{_fmt_ci(100 * r.get('wrong_family_analysed_rate', float('nan')), [100 * c for c in r.get('wrong_family_analysed_rate_ci95', [])])} % "
        f"were analysed as a region they do not show even by family (upper limb, arm and shoulder, leg, hip: "
        f"a fracture classifier's operating points are per family), the rest as a neighbouring part of the right "
        f"region (e.g. a finger as a wrist: a wrong finding site). "
        f"Analysed: {r.get('analysed', 0)}, {r.get('family_answers', 0)} of them as a family (the router "
        f"sure of the family, of none of its parts: finding site the upper limb); refused as unsupported: "
        f"{r.get('refused_unsupported', 0)}; refused as uncertain (sure of neither): "
        f"{r.get('refused_uncertain', 0)}. Rule: {r.get('safety_rule', '')}.",
        "",
    ]
    sweep = r.get("floor_sweep")
    if sweep:
        cf = sweep["crossfit"]
        lines += [
            f"What the confidence floor trades (this router's floor: {sweep['shipped_floor']}): a higher floor "
            "refuses more images as uncertain (needs human review) and analyses more as a family of parts "
            "(finding site the upper limb) for fewer wrong parts. Choosing it on this split is optimistic; "
            f"cross-fitted ({cf['rule']}): held-out wrong-part rate {100 * cf['held_out_rate_mean']:.2f} % "
            f"(range {100 * cf['held_out_rate_range'][0]:.2f}-{100 * cf['held_out_rate_range'][1]:.2f} %).",
            "",
            "| floor | wrong part analysed | rate | analysed | refused as uncertain | analysed as a family |",
            "|---|---|---|---|---|---|",
        ] + [f"| {t['floor']:.2f}{' (this router)' if abs(t['floor'] - sweep['shipped_floor']) < 1e-9 else ''} | "
             f"{t['unsupported_analysed']} | {100 * t['unsupported_analysed_rate']:.2f} % | {t['analysed']} | "
             f"{t['refused_uncertain']} | {t['family_answers']} |" for t in sweep["table"]] + [""]
    ml = r.get("manifest_labels")
    if ml:
        lines += [
            f"Body parts as `models/training/label_audit.csv` corrects them ({ml['n_corrected']} of these images "
            f"have a manifest body part the audit replaced; the file's header says which label sets were looked "
            f"at, image by image). On the manifest's own labels the figure is "
            f"{ml['unsupported_analysed']} of {ml['n_known_region']} = "
            f"{_fmt_ci(100 * ml['unsupported_analysed_rate'], [100 * c for c in ml['unsupported_analysed_rate_ci95']])} % "
            f"({ml['wrong_family_analysed']} by family).",
            "",
        ]
    lines += [
        "| region (allowed answers) | n | analysed | wrong part analysed | router answers |",
        "|---|---|---|---|---|",
    ] + [f"| {k} | {v['n']} | {v['analysed']} | {v['wrong_part_analysed']} | "
         f"{', '.join(f'{c} {n}' for c, n in v['answers'].items())} |" for k, v in r.get("safety_by_region", {}).items()]
    lines += [
        "",
        "| dataset | n | analysed | wrong part analysed |",
        "|---|---|---|---|",
    ] + [f"| {k} | {v['n']} | {v['analysed']} | {v['wrong_part_analysed']} |"
         for k, v in r.get("safety_by_dataset", {}).items()]
    lines += [
        "",
        "## Body-part router",
        "",
    ]
    if not r.get("pooled"):
        lines += ["No image with a router label in this folder.", ""]
        r = {**r, "pooled": {"groups": 0, "accuracy": float("nan"), "accuracy_supported": float("nan"),
                             "other_recall": float("nan")}, "n_supported": 0, "below_confidence_floor": float("nan"),
             "by_dataset": {}}
    lines += [
        f"Accuracy {r['accuracy']:.3f} on {r['n']} validation images; on the classifier-supported parts "
        f"({', '.join(r['supported_parts'])}) {r['accuracy_supported']:.3f} (n={r['n_supported']}; bar 0.97); "
        f"OTHER recall {r['per_class'].get('OTHER', {}).get('recall', float('nan')):.3f} (bar 0.95). "
        f"{100 * r['below_confidence_floor']:.1f}% of images fall below the confidence floor.",
        "",
        f"As the node decides (router probabilities pooled over the images of an examination, here each of "
        f"the {r['pooled']['groups']} studies; an image the router itself calls OTHER stays out of the pool): "
        f"accuracy {r['pooled']['accuracy']:.3f}, on the supported parts {r['pooled']['accuracy_supported']:.3f} "
        f"(bar 0.97), OTHER recall {r['pooled']['other_recall']:.3f} (bar 0.95). The tables below are per image, "
        f"each image alone.",
        "",
        "| class | n | recall | precision |",
        "|---|---|---|---|",
    ]
    for c, v in r["per_class"].items():
        lines.append(f"| {c} | {v['n']} | {v['recall']:.3f} | {v['precision']:.3f} |")
    lines += [
        "",
        "| dataset | n | accuracy |",
        "|---|---|---|",
    ] + [f"| {d} | {v['n']} | {v['accuracy']:.3f} |" for d, v in r["by_dataset"].items()]
    lines += [
        "",
        "## Localisation (Grad-CAM pointing game)",
        "",
        f"{_fmt_ci(loc['pointing_game'], loc.get('pointing_game_ci95', []))} on {loc['n']} positive images with "
        f"fracture boxes ({', '.join(loc['datasets'])}); {loc['pointing_game_supported_parts']:.3f} on the "
        f"{loc['n_supported_parts']} of a supported body part. Rule: {loc['rule']}. Boxes cover "
        f"{100 * loc['mean_box_area_fraction']:.1f}% of the image on average (chance level). Bar 0.70 (issue 13).",
        "",
        "| body part | n | pointing game |",
        "|---|---|---|",
    ] + [f"| {p} | {v['n']} | {v['pointing_game']:.3f} |" for p, v in loc["by_body_part"].items()]
    lines += ["", "## Plots", ""] + [f"![{x}]({x})" for x in files] + [""]
    (out / "report.md").write_text("\n".join(lines))


def run(data: Path, out: Path, registry: Path, router: str, classifier: str, split: str | None,
        meanings: Sequence[str], n_boot: int, seed: int, manifest_labels: bool = False) -> dict[str, Any]:
    """Evaluate and write ``metrics.json``, ``report.md`` and plots to ``out``; with
    ``manifest_labels`` the manifest's body parts as they are, without the label audit."""
    from pipeline.classify import Analyser

    out.mkdir(parents=True, exist_ok=True)
    analyser = Analyser.load(registry, router, classifier)
    all_rows = mdata.read_manifest(data, None if manifest_labels else mdata.LABEL_AUDIT)
    if split is None:
        split = "val" if any(r.split == "val" for r in all_rows) else "all"
    rows = mdata.in_split(all_rows, split)
    logger.info("evaluating on %d rows (split %s)", len(rows), split)
    supported = analyser.coverage.supported_body_parts
    router_m = evaluate_router(analyser, rows, supported)
    logger.info("router accuracy %.4f", router_m["accuracy"])
    if analyser.classifier_entry.finding == "fracture":
        # the finding is a fracture probability: measured on fracture labels as served;
        # MURA's abnormal-study labels stay a cross-check (kept under the existing keys)
        fracture_m, plots = evaluate_served_fracture(analyser, rows, n_boot, seed)
        mura, _ = evaluate_classifier(analyser, rows, meanings, n_boot, seed)
        fracture_m["mura_abnormality"] = mura
        fracture_m["study"] = mura["study"]
        logger.info("fracture image AUROC %.4f (n=%d analysed)", fracture_m["image"]["auroc"],
                    fracture_m["image"]["n"])
    else:
        fracture_m, plots = evaluate_classifier(analyser, rows, meanings, n_boot, seed)
        logger.info("study AUROC %.4f (n=%d)", fracture_m["study"]["auroc"], fracture_m["study"]["n"])
    fracture_m["fracture_labelled"] = evaluate_fracture_labelled(analyser, rows, n_boot, seed)
    heads_m = evaluate_heads(analyser, rows, n_boot, seed)
    loc_m, examples = pointing_game(analyser, rows)
    r_e, c_e = analyser.router_entry, analyser.classifier_entry
    metrics = {
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data": str(data),
        "split": split,
        "n_boot": n_boot,
        "models": {
            "router": {"name": r_e.name, "version": r_e.version, "sha256": r_e.sha256,
                       "precision": r_e.precision,
                       "input_size": r_e.input_size, "test_time_flip": r_e.test_time_flip},
            "classifier": {"name": c_e.name, "version": c_e.version, "sha256": c_e.sha256,
                           "precision": c_e.precision,
                           "input_size": c_e.input_size, "test_time_flip": c_e.test_time_flip,
                           "feature_grid": analyser.classifier_grid, "finding": c_e.finding},
            "heads": [{"name": h.name, "version": h.version, "sha256": h.sha256, "base": h.base,
                       "base_sha256": h.base_sha256, "finding": h.finding,
                       "supported_body_parts": list(h.supported_body_parts)}
                      for h in analyser.head_entries],
        },
        "router": router_m,
        "heads": heads_m,
        "fracture": fracture_m,
        "localisation": loc_m,
    }
    files = write_plots(out, router_m, plots, examples, analyser)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    write_report(out, metrics, files)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``fracture-node evaluate``."""
    p = argparse.ArgumentParser(prog="fracture-node evaluate", description="Evaluate the registered models.")
    p.add_argument("--data", type=Path, required=True, help="folder with manifest.csv (msk format)")
    p.add_argument("--out", type=Path, required=True, help="output folder (metrics.json, report.md, PNGs)")
    p.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY)
    p.add_argument("--router", default=DEFAULT_ROUTER)
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER)
    p.add_argument("--split", default=None, help="manifest split to use (default val if present, else all)")
    p.add_argument("--manifest-labels", action="store_true",
                   help="the manifest's body parts as they are, without models/training/label_audit.csv")
    p.add_argument("--label-meaning", nargs="+", default=["abnormal-study"])
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """``fracture-node evaluate ...``"""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    m = run(args.data, args.out, args.registry, args.router, args.classifier, args.split,
            args.label_meaning, args.n_boot, args.seed, args.manifest_labels)
    s = m["fracture"]["study"]
    print(f"router accuracy {m['router']['accuracy']:.3f}; wrong part analysed "
          f"{m['router'].get('unsupported_analysed', 0)} of {m['router'].get('n_known_region', 0)}; "
          f"study AUROC {s['auroc']:.3f} {s['auroc_ci95']} (n={s['n']}), "
          f"kappa {s['kappa']:.3f}; pointing game {m['localisation']['pointing_game']:.3f}")
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
