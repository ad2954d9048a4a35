"""Read an msk-format ``manifest.csv`` and turn it into task samples and arrays.

A data folder is any directory with a ``manifest.csv`` in the format of
``../shared/data/msk/README.md`` (``path``, ``dataset``, ``split``, ``body_part``,
``label``, ``label_meaning``, ``patient_id``, ``study_id``, ``group_id``, ``boxes``...).
Images are 8-bit greyscale; ``/255`` gives the [0, 1] scale of
:class:`~pipeline.result.NormalisedImage`, and :func:`pipeline.resize.fit_square`
gives exactly the geometry the node uses at inference.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.resize import fit_square

logger = logging.getLogger(__name__)

ROUTER_PARTS: tuple[str, ...] = (
    "ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST", "LEG", "HIP",
)
"""Router classes other than OTHER. ``LEG`` is the lower limb from knee to foot (knee,
lower leg, ankle, foot: FracAtlas's ``LEG`` region; the validation split holds too few
UNIFESP ankles and feet to validate them one by one); ``HIP`` is the hip, pelvis and thigh."""
LEG_PARTS: frozenset[str] = frozenset({"LEG", "KNEE", "LOWER_LEG", "ANKLE", "FOOT"})
HIP_PARTS: frozenset[str] = frozenset({"HIP", "PELVIS", "THIGH"})
UPPER_LIMB_PARTS: frozenset[str] = frozenset({"ELBOW", "FINGER", "FOREARM", "HAND", "WRIST"})
"""What FracAtlas's coarse ``HAND`` region (fingers to elbow) may be routed to."""
OTHER = "OTHER"
ROUTER_CLASSES: tuple[str, ...] = ROUTER_PARTS + (OTHER,)
CLASSIFIER_PARTS: tuple[str, ...] = ("FOREARM", "HUMERUS", "WRIST")
"""Body parts whose MURA studies train the abnormality classifier."""
FRACTURE_THRESHOLD_DATASETS: tuple[str, ...] = ("FracAtlas",)
"""The fracture-labelled sets a fracture classifier's operating points are chosen on:
clinical radiographs of one hospital network with true negatives and every region, where
the web-collected sets (kaggle-multi-region, kosratdev) hold easier, often teaching-file
fractures whose sensitivity would set a threshold too high for clinical images."""
FRACTURE_FAMILIES: dict[str, frozenset[str]] = {
    "UPPER_LIMB": UPPER_LIMB_PARTS,
    "ARM_SHOULDER": frozenset({"HUMERUS", "SHOULDER"}),
    "LEG": frozenset({"LEG"}),
    "HIP": frozenset({"HIP"}),
}
"""Router parts that share one fracture operating point, chosen on the validation
images the router sends to any of them: the fracture-labelled sets name coarse regions
(FracAtlas ``HAND`` = fingers to elbow) or none, so no single finer part has enough
validation images of its own."""


@dataclass(frozen=True)
class Row:
    """One manifest row, reduced to what training and evaluation use."""

    path: Path
    dataset: str
    split: str
    body_part: str
    label: str
    label_meaning: str
    patient_id: str
    study_id: str
    group_id: str
    boxes: tuple[tuple[float, float, float, float], ...]
    label_better_mura: str = ""
    """MURA only: ``positive`` where the Better-MURA relabelling moves a normal image to abnormal."""
    manifest_body_part: str = ""
    """The manifest's body part where :data:`LABEL_AUDIT` corrected it (else empty)."""

    @property
    def study_key(self) -> str:
        """Study identity for study-level aggregation (falls back to the family)."""
        return self.study_id or self.patient_id or self.group_id or str(self.path)


@dataclass(frozen=True)
class Sample:
    """An image with an integer target for one task."""

    row: Row
    target: int
    """The class index; for a router sample with several allowed classes, ``-1``."""
    classify: bool = True
    """False for localisation-only samples: their label does not train the classifier."""
    allowed: tuple[int, ...] = ()
    """Router only: the class indices the image may rightly be given (a set-valued,
    partial label; one index for a single-part image). Empty for the classifier."""


LABEL_AUDIT = Path(__file__).with_name("label_audit.csv")
"""Body-part labels corrected by an audit that looked at every image of a label set
(pkdarabi ``FINGER``: 64 of its 294 images show the wrist and distal forearm and no
finger). :func:`read_manifest` applies it; ``Row.manifest_body_part`` keeps the label
it replaced, so an evaluation can report its figures on both."""


def read_label_audit(path: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """``(dataset, path relative to the data folder) -> (manifest body part, audited body part)``."""
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    return {(rec["dataset"], rec["path"]): (rec["manifest_body_part"].upper(), rec["audited_body_part"].upper())
            for rec in csv.DictReader(lines)}


def read_manifest(data_dir: Path, audit: Path | None = LABEL_AUDIT) -> list[Row]:
    """Parse ``data_dir/manifest.csv`` (paths resolved against ``data_dir``), with the
    body-part corrections of ``audit`` (``None``: the manifest's labels as they are).

    An audit row whose manifest label is not the manifest's (another version of the
    data) is not applied, with a warning."""
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist: a data folder needs manifest.csv")
    corrections = read_label_audit(audit) if audit is not None else {}
    rows: list[Row] = []
    applied = 0
    with manifest.open(newline="") as fh:
        for rec in csv.DictReader(fh):
            body_part, manifest_body_part = (rec.get("body_part") or "").upper(), ""
            fix = corrections.get((rec.get("dataset", ""), rec["path"]))
            if fix is not None and fix[0] == body_part:
                body_part, manifest_body_part = fix[1], body_part
                applied += 1
            elif fix is not None:
                logger.warning("label audit: %s is %s in the manifest, not %s: not corrected",
                               rec["path"], body_part, fix[0])
            boxes_raw = (rec.get("boxes") or "").strip()
            boxes = tuple(tuple(float(v) for v in b) for b in json.loads(boxes_raw or "[]"))
            rows.append(
                Row(
                    path=data_dir / rec["path"],
                    dataset=rec.get("dataset", ""),
                    split=rec.get("split", ""),
                    body_part=body_part,
                    label=rec.get("label", ""),
                    label_meaning=rec.get("label_meaning", ""),
                    patient_id=rec.get("patient_id", ""),
                    study_id=rec.get("study_id", ""),
                    group_id=rec.get("group_id", ""),
                    boxes=boxes,  # type: ignore[arg-type]
                    label_better_mura=rec.get("label_better_mura", "") or "",
                    manifest_body_part=manifest_body_part,
                )
            )
    logger.info("read %d rows from %s (%d body parts corrected by the label audit)", len(rows), manifest, applied)
    return rows


def in_split(rows: Iterable[Row], split: str) -> list[Row]:
    """Rows of ``split`` (``"all"`` keeps every row)."""
    return [r for r in rows if split == "all" or r.split == split]


def router_target(row: Row) -> str | None:
    """The one router class a row shows, or ``None`` when it shows no single class.

    Used for the router's accuracy and confusion (a single right answer); training
    uses the set-valued :func:`region_parts` instead, which every region contributes to.

    Single upper-limb parts map to themselves; images whose every region is in the
    knee-to-foot set (UNIFESP knee, lower leg, ankle, foot, FracAtlas ``LEG``, the knee
    crops) are ``LEG``; hip, pelvis and thigh are ``HIP``; images whose every region is
    outside all of these (chest, spine, skull, ...) are ``OTHER``. FracAtlas's ``HAND``
    (fingers to elbow, no finer label), multi-region images that mix classes, and
    ``UNKNOWN`` are skipped.
    """
    if not row.body_part or row.body_part == "UNKNOWN":
        return None
    parts = row.body_part.split("+")
    if row.dataset == "FracAtlas" and "HAND" in parts:
        return None
    if len(parts) == 1 and parts[0] in ROUTER_PARTS:
        return parts[0]
    if all(p in LEG_PARTS for p in parts):
        return "LEG"
    if all(p in HIP_PARTS for p in parts):
        return "HIP"
    known = set(ROUTER_PARTS) | LEG_PARTS | HIP_PARTS
    if all(p not in known for p in parts):
        return OTHER
    return None


def region_parts(row: Row) -> frozenset[str] | None:
    """The router classes an image may rightly be analysed as, or ``None`` if unknown.

    The safety figure (``router.unsupported_analysed_rate``) counts an image analysed as
    a part outside this set. FracAtlas ``HAND`` allows any part from fingers to elbow.
    """
    if not row.body_part or row.body_part == "UNKNOWN":
        return None
    allowed: set[str] = set()
    for p in row.body_part.split("+"):
        if row.dataset == "FracAtlas" and p == "HAND":
            allowed |= UPPER_LIMB_PARTS
        elif p in LEG_PARTS:
            allowed.add("LEG")
        elif p in HIP_PARTS:
            allowed.add("HIP")
        elif p in ROUTER_PARTS:
            allowed.add(p)
        else:
            allowed.add(OTHER)
    return frozenset(allowed)


def router_samples(
    rows: Sequence[Row], max_per_class: int | None, seed: int
) -> list[Sample]:
    """Router samples with set-valued labels, optionally capped per label set (random, seeded).

    Every row with a known region teaches the router classes :func:`region_parts`
    allows: one class for a single-part image, several for a coarse or ``+``-joined
    region (FracAtlas ``HAND`` = fingers to elbow, UNIFESP ``HAND+WRIST``, ...). The
    training loss for a set ``S`` is ``-log sum_{c in S} p_c``
    (:func:`models.training.train.set_cross_entropy`), so a FracAtlas upper limb pulls
    the router towards the upper limb without naming the part, and no dataset is
    learned as a class of its own. The cap applies to each distinct label set.
    """
    by_set: dict[frozenset[str], list[Row]] = {}
    for r in rows:
        allowed = region_parts(r)
        if allowed is not None:
            by_set.setdefault(allowed, []).append(r)
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    for allowed, members in sorted(by_set.items(), key=lambda kv: sorted(kv[0])):
        if max_per_class is not None and len(members) > max_per_class:
            idx = rng.choice(len(members), size=max_per_class, replace=False)
            members = [members[i] for i in sorted(idx)]
        idx_set = tuple(sorted(ROUTER_CLASSES.index(c) for c in allowed))
        target = idx_set[0] if len(idx_set) == 1 else -1
        out.extend(Sample(r, target, allowed=idx_set) for r in members)
    logger.info("router samples: %s", dict(Counter(
        "+".join(ROUTER_CLASSES[i] for i in s.allowed) for s in out)))
    return out


def allowed_matrix(samples: Sequence[Sample], n_classes: int) -> np.ndarray:
    """``(n, n_classes)`` float32 0/1 matrix: row ``i`` marks the classes sample ``i`` allows."""
    m = np.zeros((len(samples), n_classes), dtype=np.float32)
    for i, s in enumerate(samples):
        m[i, list(s.allowed)] = 1.0
    return m


def mura_labelled(row: Row) -> bool:
    """Whether ``row`` is a MURA image of a classifier part (humerus, forearm, wrist) with
    its study's label (normal or abnormal)."""
    return (row.dataset == "MURA-v1.1" and row.body_part in CLASSIFIER_PARTS
            and row.label in ("positive", "negative"))


def classifier_samples(rows: Sequence[Row], datasets: Sequence[str] = ("MURA-v1.1",)) -> list[Sample]:
    """Abnormality samples: labelled rows of ``datasets`` (positive -> 1, negative -> 0)."""
    out = [
        Sample(r, 1 if r.label == "positive" else 0)
        for r in rows
        if r.dataset in datasets and r.label in ("positive", "negative")
    ]
    logger.info("classifier samples: %d (%d positive)", len(out), sum(s.target for s in out))
    return out


FRACTURE_DATASETS: tuple[str, ...] = (
    "FracAtlas", "kaggle-multi-region", "kosratdev-eeeh", "kosratdev-roboflow", "arnnv-web-smoke",
)
"""Fracture-labelled sets with both fractured and non-fractured images. Sets with
positives only (bone-break-classification; pkdarabi and roboflow-sr2022, whose box-less
images are ``unknown``) would teach "this source means fracture"; their boxes still
supervise the activation map (:func:`box_samples`)."""


def fracture_samples(rows: Sequence[Row], datasets: Sequence[str] = FRACTURE_DATASETS,
                     normal_mura: bool = True) -> list[Sample]:
    """Fracture samples: rows with ``label_meaning == 'fracture'`` of ``datasets`` (fracture -> 1),
    and with ``normal_mura`` MURA's normal images of the humerus, forearm and wrist (-> 0).

    FracAtlas's fractured images carry boxes, so they teach the label and the map at once.
    A study a radiologist read as normal shows no fracture (images the Better-MURA list
    moves to abnormal are left out); MURA's abnormal studies are not fracture labels and
    stay out.  Without those negatives a model that never saw MURA's images flagged 88 %
    of the normal MURA forearm studies of the validation split (classifier 2.0.0).
    """
    out = [
        Sample(r, 1 if r.label == "positive" else 0)
        for r in rows
        if r.dataset in datasets and r.label_meaning == "fracture" and r.label in ("positive", "negative")
    ]
    if normal_mura:
        out += [Sample(r, 0) for r in rows
                if mura_labelled(r) and r.label == "negative" and r.label_better_mura in ("", "negative")]
    logger.info("fracture samples: %d (%d positive, %d with boxes)", len(out), sum(s.target for s in out),
                sum(1 for s in out if s.row.boxes))
    return out


def abnormality_only_samples(rows: Sequence[Row], exclude: Iterable[Path] = ()) -> list[Sample]:
    """MURA's labelled images of the humerus, forearm and wrist not in ``exclude`` (the
    fracture samples already hold MURA's normal ones): the abnormal studies, and the
    normal images the Better-MURA list moves to abnormal.  They train only the
    auxiliary abnormality output (``classify=False``: not the fracture loss), since
    MURA's *abnormal* is not a fracture label."""
    skip = set(exclude)
    out = [Sample(r, 0, classify=False) for r in rows if mura_labelled(r) and r.path not in skip]
    logger.info("abnormality-only samples: %d (%d abnormal)", len(out),
                sum(1 for s in out if s.row.label == "positive"))
    return out


def box_samples(rows: Sequence[Row], exclude: Iterable[Path] = ()) -> list[Sample]:
    """Localisation-only samples: positive rows with fracture boxes, not in ``exclude``.

    They teach where a fracture is (the Grad-CAM), not whether the image is abnormal:
    fracture sets hold positives only, and their label means "fracture", not MURA's
    "abnormal study", so their label is kept out of the classification loss.
    """
    skip = set(exclude)
    out = [Sample(r, 1, classify=False) for r in rows if r.boxes and r.label == "positive" and r.path not in skip]
    logger.info("localisation samples: %d images with boxes", len(out))
    return out


def box_mask(boxes: Sequence[Sequence[float]], image_shape: tuple[int, int], size: int) -> np.ndarray:
    """``(size, size)`` uint8 mask of ``boxes`` (normalised ``[x0, y0, x1, y1]``) on the square grid.

    Uses the geometry of :func:`pipeline.resize.fit_square` for an image of ``image_shape``.
    """
    rows, cols = image_shape
    scale = size / float(max(rows, cols))
    new_rows = max(1, min(size, int(round(rows * scale))))
    new_cols = max(1, min(size, int(round(cols * scale))))
    top, left = (size - new_rows) // 2, (size - new_cols) // 2
    mask = np.zeros((size, size), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        r0 = top + int(np.floor(min(y0, y1) * new_rows))
        r1 = top + int(np.ceil(max(y0, y1) * new_rows))
        c0 = left + int(np.floor(min(x0, x1) * new_cols))
        c1 = left + int(np.ceil(max(x0, x1) * new_cols))
        mask[max(r0, 0) : max(r1, r0 + 1), max(c0, 0) : max(c1, c0 + 1)] = 1
    return mask


def load_masks(samples: Sequence[Sample], size: int) -> np.ndarray:
    """Box masks ``(n, size, size)`` uint8 for ``samples`` (zeros where a row has no boxes)."""
    out = np.zeros((len(samples), size, size), dtype=np.uint8)
    for i, s in enumerate(samples):
        if s.row.boxes:
            img = cv2.imread(str(s.row.path), cv2.IMREAD_GRAYSCALE)
            if img is None:
                raise OSError(f"cannot read image {s.row.path}")
            out[i] = box_mask(s.row.boxes, img.shape, size)
    return out


def load_pixels(path: Path) -> np.ndarray:
    """An 8-bit greyscale image as float32 in [0, 1]."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise OSError(f"cannot read image {path}")
    return img.astype(np.float32) / 255.0


def load_square(path: Path, size: int) -> np.ndarray:
    """:func:`load_pixels` then :func:`pipeline.resize.fit_square` (the node's geometry)."""
    return fit_square(load_pixels(path), size)[0]


def load_arrays(paths: Sequence[Path], size: int, workers: int = 2) -> np.ndarray:
    """Stack of squares, ``(n, size, size)`` float16 (read in parallel threads)."""
    out = np.zeros((len(paths), size, size), dtype=np.float16)

    def one(i: int) -> None:
        out[i] = load_square(paths[i], size)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(len(paths))))
    return out
