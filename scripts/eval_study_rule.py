"""Measure the study rule against MURA's plain mean rule on the validation split.

For every labelled validation study of a supported body part, the model that decides
the part as the node runs it (the shipped classifier, or its abnormality head for the
humerus: the registered test-time flip setting, temperature and the part's doubt band)
gives each image a probability and a decision.  Two study rules are compared:

* **mean**: the decision of the mean of the image probabilities (MURA's rule; what
  the node did before);
* **node**: the decision of ``pipeline.aggregate.part_decision``: never milder than
  the most severe image decision.

Sensitivity and specificity are reported twice: with *flagged* = positive or doubtful
(what a reviewer is sent to look at, and what the KOS selects) and with positive only.
95 % Wilson intervals.  Writes ``docs/study_rule.md`` and ``docs/study_rule.json``.

Run: ``.venv/bin/python scripts/eval_study_rule.py [--data ../shared/data/msk]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.training import data as mdata  # noqa: E402
from pipeline.aggregate import decide, part_decision  # noqa: E402
from pipeline.result import Decision  # noqa: E402

FLAGGED = (Decision.POSITIVE, Decision.DOUBTFUL)


def wilson(k: int, n: int) -> list[float]:
    """95 % Wilson score interval of k successes in n."""
    if n == 0:
        return [float("nan"), float("nan")]
    z = 1.959964
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def rates(truth: list[bool], called: list[bool]) -> dict[str, Any]:
    tp = sum(t and c for t, c in zip(truth, called))
    fn = sum(t and not c for t, c in zip(truth, called))
    tn = sum(not t and not c for t, c in zip(truth, called))
    fp = sum(not t and c for t, c in zip(truth, called))
    return {
        "sensitivity": round(tp / (tp + fn), 4) if tp + fn else float("nan"),
        "sensitivity_ci95": wilson(tp, tp + fn),
        "specificity": round(tn / (tn + fp), 4) if tn + fp else float("nan"),
        "specificity_ci95": wilson(tn, tn + fp),
        "tp": tp, "fn": fn, "tn": tn, "fp": fp,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "msk")
    parser.add_argument("--registry", type=Path, default=ROOT / "models" / "registry.toml")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)

    from pipeline.classify import Analyser

    analyser = Analyser.load(args.registry, "bodypart-router", "fracture-classifier")
    entry = analyser.classifier_entry
    coverage = analyser.coverage
    rows = [r for r in mdata.in_split(mdata.read_manifest(args.data), "val")
            if r.label in ("positive", "negative") and r.label_meaning == "abnormal-study"
            and r.body_part in coverage.supported_body_parts]
    probs: list[float] = []
    for start in range(0, len(rows), 32):
        batch = rows[start:start + 32]
        x = mdata.load_arrays([r.path for r in batch], entry.input_size)
        logits = analyser.head_logits(x.astype(np.float32))  # the classifier's, then each head's
        for row, z in zip(batch, logits):
            model = coverage.model(row.body_part)
            probs.append(float(1.0 / (1.0 + np.exp(-z[coverage.column(row.body_part)] / model.temperature))))
    studies: dict[str, list[tuple[mdata.Row, float]]] = defaultdict(list)
    for row, p in zip(rows, probs):
        studies[row.study_key].append((row, p))

    by_part: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    diluted = 0
    for items in studies.values():
        part = items[0][0].body_part
        band = coverage.operating_point(part).doubt_band
        ps = [p for _, p in items]
        images = [decide(p, band) for p in ps]
        _, by_mean, by_node = part_decision(ps, images, band)
        diluted += int(by_mean not in FLAGGED and by_node in FLAGGED)
        for key in (part, f"ALL {coverage.model(part).finding}"):
            rec = by_part[key]
            rec["truth"].append(items[0][0].label == "positive")
            rec["mean_flagged"].append(by_mean in FLAGGED)
            rec["node_flagged"].append(by_node in FLAGGED)
            rec["mean_positive"].append(by_mean is Decision.POSITIVE)
            rec["node_positive"].append(by_node is Decision.POSITIVE)

    results: dict[str, Any] = {
        "classifier": {"name": entry.name, "version": entry.version, "sha256": entry.sha256},
        "heads": [{"name": h.name, "version": h.version, "sha256": h.sha256, "finding": h.finding,
                   "body_parts": list(h.supported_body_parts)} for h in coverage.heads],
        "split": "val", "images": len(rows), "studies": len(studies),
        "studies_flagged_only_by_the_node_rule": diluted, "by_body_part": {},
    }
    for key, rec in sorted(by_part.items()):
        results["by_body_part"][key] = {
            "studies": len(rec["truth"]), "positive": sum(rec["truth"]),
            **{f"{rule}_{what}": rates(rec["truth"], rec[f"{rule}_{what}"])
               for rule in ("mean", "node") for what in ("flagged", "positive")},
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study_rule.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Study rule: never milder than the most severe image, against the plain mean",
        "",
        f"Produced by `scripts/eval_study_rule.py` for {entry.name} {entry.version} "
        f"(sha256 `{entry.sha256[:12]}…`)"
        + "".join(f" and its head {h.name} {h.version} ({h.finding}: "
                  f"{', '.join(h.supported_body_parts).lower()}, sha256 `{h.sha256[:12]}…`)"
                  for h in coverage.heads)
        + " on the validation split of `../shared/data/msk` "
        f"(MURA studies of the supported parts: {len(studies)} studies, {len(rows)} images; "
        "labels are MURA's study-level *abnormal*). Image decisions use each part's doubt "
        "band; 95 % Wilson intervals.",
        *([] if entry.finding == "abnormality" else [
            "",
            f"The classifier's output is a *{entry.finding}* probability while these labels "
            "are abnormality (fracture, hardware, degenerative change, lesion): an abnormal "
            f"study without a {entry.finding} that is not flagged counts as a miss here, so "
            "the sensitivities understate what the node is for; the comparison of the two "
            "rules on the same images is the point of this table."]),
        "",
        f"The node's rule flags {diluted} studies that the plain mean leaves negative "
        "(a positive or doubtful view diluted by normal views).",
        "",
        "| part | studies (pos) | rule | flagged = positive or doubtful: sensitivity | specificity "
        "| positive only: sensitivity | specificity |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(r: dict[str, Any], key: str) -> str:
        lo, hi = r[f"{key}_ci95"]
        return f"{r[key]:.3f} [{lo:.3f}, {hi:.3f}]"

    for key, r in results["by_body_part"].items():
        for rule, name in (("mean", "mean of images (MURA)"), ("node", "node: ≥ most severe image")):
            f, p = r[f"{rule}_flagged"], r[f"{rule}_positive"]
            lines.append(f"| {key} | {r['studies']} ({r['positive']}) | {name} | "
                         f"{fmt(f, 'sensitivity')} | {fmt(f, 'specificity')} | "
                         f"{fmt(p, 'sensitivity')} | {fmt(p, 'specificity')} |")
    if entry.finding == "abnormality":
        lines += ["", "The operating thresholds were chosen on this same split for the mean "
                  "rule (see the model card), so both rows carry that optimism."]
    else:
        lines += ["", f"The classifier's operating thresholds were chosen on this split's {entry.finding}-"
                  "labelled FracAtlas images, image by image (see the model card), not on "
                  "these studies."]
    for h in coverage.heads:
        lines += ["", f"{h.name}'s threshold ({', '.join(h.supported_body_parts).lower()}) was chosen on "
                  "the train split's out-of-fold study means (the mean rule), nothing on this split; "
                  f"its probability measures {h.finding}, which is what these labels say."]
    (args.out / "study_rule.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
