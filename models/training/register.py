"""Calibrate a trained model on the validation split and write it into the registry.

``python -m models.training.register --task classifier --run RUN --name NAME --version V``

* copies ``RUN/model.keras`` to ``models/weights/<name>-<version>.keras`` and records
  its SHA-256 and a Device UID;
* exports it to the serving graph ``models/weights/<name>-<version>.onnx``
  (:mod:`models.training.export`, checked against Keras) and records that file and
  its SHA-256: the node runs the graph, never the Keras file;
* classifier: fits the temperature on validation image logits (binary NLL), then per
  body part with enough validation studies (``--min-studies`` with both labels)
  chooses the threshold on study means (MURA's rule) that maximises Cohen's kappa,
  with a doubt band of ``--doubt`` on either side.  Only those body parts become
  *supported*; ``DEFAULT`` is the pooled threshold for needs-review images;
* router: records the classes and the confidence floor;
* if ``models/eval/metrics.json`` exists for exactly the registered hashes, the key
  metrics are copied into the entry (``--attach-metrics``);
* ``--variant-of NAME --precision bf16`` registers the same weights and graph served in
  bfloat16 (:class:`models.runtime.OpenVinoGraph`) as a model of its own: new version
  and Device UID, a classifier's temperature and operating points chosen again on the
  bf16 outputs (routed by ``--router``, itself a bf16 variant), no metrics until its
  own evaluation is attached.

Other models already in the registry are kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.registry import DEFAULT_PART, FRACATLAS_REGIONS, PRECISIONS, device_uid_for, sha256_of
from models.training import data as mdata
from models.training import metrics as mm
from models.training.export import with_graph, export_entry, registry_fields

logger = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parents[1]
def architecture(output_stride: int, arch: str = "mobilenet_v2") -> str:
    """The registry's architecture text for a run's backbone (its module's ``ARCHITECTURE``)
    and output stride."""
    from models.training.train import arch_module

    text = str(arch_module(arch).ARCHITECTURE)
    if output_stride == 32:
        return text
    return text.replace("), GAP", f"; output stride {output_stride}: last stage dilated), GAP")


def lineage(init_from: str | None, registered: Mapping[str, Mapping[str, Any]]) -> str:
    """Where a second-stage run started: the registered model it was initialised from.

    The starting weights are usually replaced by the new version, so the text carries
    the earlier model's name, version, hash and its own training text.
    """
    if not init_from:
        return ""
    path = Path(init_from)
    sha = sha256_of(path) if path.is_file() else None
    if sha is None:
        return f"; second stage, initialised from {path.name}"
    for name, entry in registered.items():
        if entry.get("sha256") == sha:
            return (f"; second stage, initialised from {name} {entry.get('version', '?')} "
                    f"(sha256 {sha[:12]}..., itself: {entry.get('training_data', 'not recorded')})")
    return f"; second stage, initialised from {path.name} (sha256 {sha[:12]}...)"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return repr(round(f, 6)) if np.isfinite(f) else "nan"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v)} to TOML")


def dump_registry(models: Mapping[str, Mapping[str, Any]]) -> str:
    """Write the registry TOML (scalars first, then sub-tables, one level of nesting deep)."""
    lines = [
        "# fracture-node model registry (written by models/training/register.py).",
        "# Paths are relative to this file. The loader verifies sha256 before loading",
        "# and loads with Keras safe_mode. Thresholds apply to calibrated probabilities",
        "# sigmoid(logit / temperature); body parts absent from operating_points are",
        "# unsupported ('not analysed: unsupported body part').",
        "",
    ]
    for name, entry in models.items():
        lines.append(f"[models.{name}]")
        tables = {k: v for k, v in entry.items() if isinstance(v, Mapping)}
        for k, v in entry.items():
            if not isinstance(v, Mapping):
                lines.append(f"{k} = {_toml_value(v)}")
        for tname, table in tables.items():
            subtables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
            plain = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
            if plain or not subtables:
                lines.append("")
                lines.append(f"[models.{name}.{tname}]")
                for k, v in plain.items():
                    key = k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)
                    lines.append(f"{key} = {_toml_value(v)}")
            for sname, sub in subtables.items():
                lines.append("")
                lines.append(f"[models.{name}.{tname}.{sname}]")
                for k, v in sub.items():
                    lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _operating_point(threshold: float, doubt: float) -> dict[str, Any]:
    """A registry operating point: ``threshold`` and a doubt band of ``doubt`` either side."""
    return {"threshold": threshold,
            "doubt_band": [max(0.0, threshold - doubt), min(1.0, threshold + doubt)]}


def _calibrated(graph: Any, samples: Sequence[mdata.Sample], size: int,
                test_time_flip: bool) -> tuple[np.ndarray, float, np.ndarray]:
    """Targets, fitted temperature and calibrated probabilities of ``samples``, from the
    logits the node computes (:class:`pipeline.classify.ClassifierGraph` on ``graph``)."""
    from pipeline.classify import ClassifierGraph

    x = mdata.load_arrays([s.row.path for s in samples], size)
    classifier = ClassifierGraph(graph, test_time_flip)
    logits = np.concatenate([classifier.logits(classifier.features(x[i : i + 32]))
                             for i in range(0, len(x), 32)])
    y = np.array([s.target for s in samples])
    temperature = mm.fit_temperature(logits, y)
    return y, temperature, mm.sigmoid(logits / temperature)


def calibrate_classifier(
    graph: Any, data_dir: Path, size: int, min_studies: int, doubt: float, test_time_flip: bool = False
) -> tuple[float, dict[str, dict[str, Any]], dict[str, Any]]:
    """Temperature, operating points and a calibration summary from the validation split.

    The logits are those the node computes (:class:`pipeline.classify.ClassifierGraph`
    on the exported ``graph``, a :class:`models.runtime.ServingGraph`): with
    ``test_time_flip``, the head on the mean of the image's and its mirror's maps.
    """
    rows = mdata.in_split(mdata.read_manifest(data_dir), "val")
    samples = [s for s in mdata.classifier_samples(rows) if s.row.body_part in mdata.CLASSIFIER_PARTS]
    y, temperature, prob = _calibrated(graph, samples, size, test_time_flip)
    points: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {"temperature": temperature, "n_images": len(y), "parts": {}}
    supported_keys: list[str] = []
    supported_idx: list[int] = []
    for part in mdata.CLASSIFIER_PARTS:
        idx = [i for i, s in enumerate(samples) if s.row.body_part == part]
        keys = [samples[i].row.study_key for i in idx]
        _, sp, sy = mm.study_means(keys, prob[idx], y[idx])
        n_pos, n_neg = int(sy.sum()), int(len(sy) - sy.sum())
        info = {"studies": len(sy), "positive": n_pos, "negative": n_neg}
        if min(n_pos, n_neg) < 10 or len(sy) < min_studies:
            info["supported"] = False
            info["reason"] = f"only {len(sy)} validation studies ({n_pos} positive): too few to validate"
            summary["parts"][part] = info
            logger.info("%s not supported: %s", part, info["reason"])
            continue
        t = mm.choose_threshold(sy, sp, "kappa")
        points[part] = _operating_point(t, doubt)
        info.update({"supported": True, "threshold": t, **mm.binary_summary(sy, sp, t)})
        summary["parts"][part] = info
        supported_keys += keys
        supported_idx += idx
        logger.info("%s: threshold %.3f %s", part, t, info)
    _, sp, sy = mm.study_means(supported_keys, prob[supported_idx], y[supported_idx])
    t = mm.choose_threshold(sy, sp, "kappa")
    points[DEFAULT_PART] = _operating_point(t, doubt)
    return temperature, points, summary


def calibrate_fracture(
    graph: Any, router: Any, router_entry: Any, data_dir: Path, size: int, min_images: int, doubt: float,
    sensitivity: float, test_time_flip: bool = False,
    threshold_datasets: Sequence[str] = mdata.FRACTURE_THRESHOLD_DATASETS,
) -> tuple[float, dict[str, dict[str, Any]], dict[str, Any]]:
    """Temperature and operating points of a fracture classifier from the validation split.

    The validation images are the fracture-labelled ones with true negatives
    (:func:`models.training.data.fracture_samples`), routed as the node routes them;
    the temperature is fitted on all of them.  Each family of router parts
    (:data:`models.training.data.FRACTURE_FAMILIES`) whose routed images of
    ``threshold_datasets`` (clinical radiographs with true negatives: FracAtlas) hold at
    least ``min_images`` fractured and ``min_images`` unfractured ones gets one
    threshold, the highest with image-level sensitivity at least ``sensitivity`` on
    them, and a doubt band of ``doubt`` on either side; its parts become supported.  The
    others stay unsupported, with the counts as the reason.
    """
    from models.training.evaluate import routed_parts

    rows = mdata.in_split(mdata.read_manifest(data_dir), "val")
    samples = mdata.fracture_samples(rows)
    items = [s.row for s in samples]
    answers, _ = routed_parts(router.probabilities, router_entry, items, mdata.FRACTURE_FAMILIES)
    y, temperature, prob = _calibrated(graph, samples, size, test_time_flip)
    points: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {"temperature": temperature, "n_images": len(y), "parts": {}, "families": {}}
    chosen: list[int] = []
    for family, parts in mdata.FRACTURE_FAMILIES.items():
        # routed to one of its parts, or to the family itself (router_answer)
        idx = [i for i, a in enumerate(answers)
               if (a in parts or a == family) and items[i].dataset in threshold_datasets]
        n_pos = int(y[idx].sum())
        n_neg = len(idx) - n_pos
        info: dict[str, Any] = {"parts": sorted(parts), "images": len(idx), "positive": n_pos, "negative": n_neg}
        if min(n_pos, n_neg) < min_images:
            info["supported"] = False
            info["reason"] = (f"only {len(idx)} {'/'.join(threshold_datasets)} validation images routed "
                              f"here ({n_pos} fractured, {n_neg} not): too few to validate")
        else:
            t = mm.threshold_for_sensitivity(y[idx], prob[idx], sensitivity)
            info.update({"supported": True, "threshold": t, **mm.binary_summary(y[idx], prob[idx], t)})
            for part in sorted(parts):
                points[part] = _operating_point(t, doubt)
            chosen += idx
        summary["families"][family] = info
        for part in sorted(parts):
            summary["parts"][part] = {k: v for k, v in info.items() if k != "parts"}
        logger.info("%s: %s", family, info)
    if not chosen:
        raise SystemExit("no family of router parts has enough fracture-labelled validation images")
    t = mm.threshold_for_sensitivity(y[chosen], prob[chosen], sensitivity)
    points[DEFAULT_PART] = _operating_point(t, doubt)
    return temperature, points, summary


def _serving_graph(graph_path: Path, precision: str) -> Any:
    """The exported graph as the node would serve it in ``precision``."""
    from models.runtime import OpenVinoGraph

    return OpenVinoGraph(graph_path, precision=precision)


def _calibrate_fracture_entry(entry: dict[str, Any], graph_path: Path, args: argparse.Namespace) -> None:
    """Temperature, operating points, families and notes of a fracture classifier's
    entry, chosen on the validation split routed as ``args.router`` routes it, on the
    outputs of the graph served in the entry's precision."""
    from models.registry import load_registry
    from models.runtime import load_graph
    from pipeline.classify import RouterGraph

    router_entry = load_registry(args.registry).get(args.router, role="router")
    precision = str(entry.get("precision", "fp32"))
    if router_entry.precision != precision:
        raise SystemExit(f"--router {args.router} is served in {router_entry.precision}, the classifier "
                         f"in {precision}: calibrate on the router the node will run beside it")
    router = RouterGraph(load_graph(router_entry), router_entry.test_time_flip)
    temperature, points, summary = calibrate_fracture(
        _serving_graph(graph_path, precision), router, router_entry, args.data, int(entry["input_size"]),
        args.min_images, args.doubt, args.sensitivity, bool(entry.get("test_time_flip", False)),
    )
    entry["temperature"] = temperature
    entry["finding"] = "fracture"
    entry["confidence_floor"] = 0.0
    entry["notes"] = (
        f"Fracture probability. Temperature fitted on the validation split's fracture-labelled "
        f"images, thresholds chosen on its {'/'.join(mdata.FRACTURE_THRESHOLD_DATASETS)} images, "
        f"each routed as {router_entry.name} {router_entry.version} routes it (image level, the "
        f"highest threshold with sensitivity >= {args.sensitivity:.2f}, one per family of router "
        f"parts){', on the bf16 outputs' if precision == 'bf16' else ''}. " + "; ".join(
            f"{k} ({', '.join(v['parts'])}): " + (v.get("reason") or
            f"supported, threshold chosen on {v['images']} images, {v['positive']} fractured")
            for k, v in summary["families"].items()
        )
    )
    entry["operating_points"] = points
    entry["families"] = {f: sorted(parts) for f, parts in mdata.FRACTURE_FAMILIES.items()}


def variant_entry(base: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A registry entry for ``base``'s weights and graph served in ``args.precision``.

    The files and their hashes are the same; the version, Device UID and architecture
    text say what differs; the metrics are dropped (they were measured in the other
    arithmetic) until ``--attach-metrics`` brings the variant's own.
    """
    if "graph" not in base:
        raise SystemExit(f"--variant-of {args.variant_of}: it has no exported graph")
    if args.precision == base.get("precision", "fp32"):
        raise SystemExit(f"--variant-of {args.variant_of}: it is already served in {args.precision}")
    entry = {k: v for k, v in base.items() if k != "metrics"}
    entry["version"] = args.version
    entry["device_uid"] = device_uid_for(args.name, args.version, str(base["sha256"]))
    entry["precision"] = args.precision
    entry["architecture"] = (f"{base['architecture']}; served in {args.precision} (OpenVINO, the "
                             f"graph of {args.variant_of} {base['version']})")
    if base.get("role") == "router":
        entry["notes"] = (f"{base.get('notes', '')} The weights and graph of {args.variant_of} "
                          f"{base['version']}, run in {args.precision}.").strip()
    return entry


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("router", "classifier"), required=True)
    p.add_argument("--run", type=Path, help="training run folder with model.keras (not with --variant-of "
                   "or --skip-copy)")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--data", type=Path, default=MODELS_DIR.parent.parent / "shared" / "data" / "msk")
    p.add_argument("--registry", type=Path, default=MODELS_DIR / "registry.toml")
    p.add_argument("--min-studies", type=int, default=40)
    p.add_argument("--doubt", type=float, default=0.1)
    p.add_argument("--confidence-floor", type=float, default=None,
                   help="router: the probability its pooled answer needs to name a part (default 0.5 for a "
                        "new router; with --skip-copy: set it, as a new --version of the same weights)")
    p.add_argument("--router", default="bodypart-router",
                   help="fracture classifier: the registered router that routes its validation images")
    p.add_argument("--sensitivity", type=float, default=0.90,
                   help="fracture classifier: image-level sensitivity its thresholds are chosen for")
    p.add_argument("--min-images", type=int, default=20,
                   help="fracture classifier: fractured and unfractured validation images a family needs")
    p.add_argument("--attach-metrics", type=Path, default=None, help="metrics.json to copy into the entry")
    p.add_argument("--skip-copy", action="store_true", help="entry exists: only (re)attach metrics")
    p.add_argument("--recalibrate", action="store_true",
                   help="with --skip-copy: choose a fracture classifier's temperature and operating "
                        "points again (the router or the routing rule changed)")
    p.add_argument("--variant-of", metavar="NAME",
                   help="register NAME's weights and graph served in --precision as a model of its own")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="with --variant-of: the arithmetic the graph is served in")
    p.add_argument("--test-time-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the mirrored image at inference (classifier: mean feature map; router: mean "
                        "logits); a new run's default is off; with --skip-copy: change it, as a new --version "
                        "of the same weights (a classifier with --recalibrate)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    existing: dict[str, Any] = {}
    if args.registry.exists():
        existing = tomllib.loads(args.registry.read_text()).get("models", {})
    if args.run is None and not (args.variant_of or args.skip_copy):
        p.error("--run is required unless --variant-of or --skip-copy is given")
    if args.variant_of:
        entry = variant_entry(existing[args.variant_of], args)
        if entry.get("finding") == "fracture":
            _calibrate_fracture_entry(entry, args.registry.parent.resolve() / entry["graph"], args)
    elif args.skip_copy:
        entry = dict(existing[args.name])
        previous = None
        new_flip = args.test_time_flip is not None and bool(args.test_time_flip) != bool(entry.get("test_time_flip"))
        new_point = args.confidence_floor is not None or args.recalibrate or new_flip
        if new_flip and entry.get("finding") == "fracture" and not args.recalibrate:
            raise SystemExit(f"--{'' if args.test_time_flip else 'no-'}test-time-flip changes {args.name}'s "
                             "logits: add --recalibrate (its temperature and operating points are chosen again)")
        if args.confidence_floor is not None and not 0.0 <= args.confidence_floor < 1.0:
            raise SystemExit(f"--confidence-floor must be in [0, 1) (got {args.confidence_floor})")
        if args.version != entry["version"]:
            if not new_point:
                raise SystemExit(f"--skip-copy --version {args.version}: {args.name} is {entry['version']}; a "
                                 "new version of the same weights needs a new operating point "
                                 "(--confidence-floor, --recalibrate or --[no-]test-time-flip)")
            # the same weights at a new operating point (confidence floor, thresholds): its
            # results are not the old version's, so it is a version with a Device UID of its own
            previous = f"{args.name} {entry['version']}"
            entry["version"] = args.version
            entry["device_uid"] = device_uid_for(args.name, args.version, str(entry["sha256"]))
            entry.pop("metrics", None)  # measured on the old version's outputs: --attach-metrics the new
        elif new_point:
            raise SystemExit(f"--skip-copy with a new operating point: give {args.name} a new --version "
                             f"(it is {entry['version']}): its results differ from that version's")
        if args.confidence_floor is not None:
            if entry.get("role") != "router":
                raise SystemExit(f"--confidence-floor: {args.name} is not a router")
            old_floor = entry.get("confidence_floor")
            entry["confidence_floor"] = args.confidence_floor
            entry["notes"] = (f"{entry['notes']} Confidence floor {args.confidence_floor} "
                              f"(was {old_floor}).")
        if new_flip:
            entry["test_time_flip"] = bool(args.test_time_flip)
        if args.recalibrate:
            if entry.get("finding") != "fracture" or "graph" not in entry:
                raise SystemExit(f"--recalibrate: {args.name} is not a fracture classifier with a graph")
            _calibrate_fracture_entry(entry, args.registry.parent.resolve() / entry["graph"], args)
        if previous is not None:
            notes = str(entry.get("notes", "")).strip()
            mirror = ("" if not new_flip else ", served with the mirrored image" if entry["test_time_flip"]
                      else ", served without the mirrored image (no test-time flip)")
            entry["notes"] = (f"{notes}{'' if not notes or notes.endswith('.') else '.'} "
                              f"The weights and graph of {previous}{mirror}.").strip()
    else:
        import keras

        from models.training.train import arch_module

        cfg = json.loads((args.run / "config.json").read_text())
        arch = str(cfg.get("arch", "mobilenet_v2"))  # runs from before --arch: MobileNetV2
        history = json.loads((args.run / "state.json").read_text())["history"]
        dest = args.registry.parent.resolve() / "weights" / f"{args.name}-{args.version}.keras"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.run / "model.keras", dest)
        sha = sha256_of(dest)
        size = int(cfg["size"])
        entry = {
            "version": args.version,
            "role": args.task,
            "architecture": architecture(int(cfg.get("output_stride", 32)), arch),
            "input_size": size,
            "classes": (list(mdata.ROUTER_CLASSES) if args.task == "router" else
                        ["no fracture", "fracture"] if cfg.get("finding") == "fracture" else ["normal", "abnormal"]),
            "weights": str(dest.relative_to(args.registry.parent.resolve())),
            "sha256": sha,
            "device_uid": device_uid_for(args.name, args.version, sha),
            "feature_layer": arch_module(arch).FEATURE_LAYER,
            "test_time_flip": bool(args.test_time_flip),
        }
        model = keras.models.load_model(dest, compile=False, safe_mode=True)
        graph_path, graph_sha = export_entry(model, size, dest)
        entry = with_graph(entry, registry_fields(graph_path, graph_sha, args.registry.parent))
        train_desc = (
            f"../shared/data/msk manifest split=train; {len(history)} epochs at {size} px, "
            f"seed {cfg['seed']}, lr {cfg['learning_rate']}, frozen blocks {cfg['freeze_blocks']}"
            + (f", label smoothing {cfg['label_smoothing']}" if cfg.get("label_smoothing") else "")
            + (f", output stride {cfg['output_stride']}" if cfg.get("output_stride", 32) != 32 else "")
            + (f", class weights to the power {cfg['class_weight_power']}"
               if cfg.get("class_weight_power", 1.0) != 1.0 else "")
            + (f", mean of the last {cfg['average_last']} epochs' weights" if cfg.get("average_last", 1) > 1 else "")
            + (f", blocks 0-{cfg['cache_below_block'] - 1} run once per augmentation draw "
               f"({min(cfg['cache_variants'], len(history))} draws per image, cached); only block "
               f"{cfg['cache_below_block']} onwards and the head trained" if cfg.get("cache_below_block") else "")
            + lineage(cfg.get("init_from"), existing)
        )
        if args.task == "router":
            entry["training_data"] = (
                "MURA humerus/forearm/wrist" + (f" (at most {cfg['max_per_class']} per label set)"
                                                if cfg.get("max_per_class") else "")
                + ", pkdarabi positives with body part"
                + (f" (corrected by models/training/label_audit.csv, sha256 {cfg['label_audit'][:12]}...: "
                   "pkdarabi FINGER images that show the wrist and no finger are FOREARM+WRIST)"
                   if cfg.get("label_audit") else "")
                + ", UNIFESP images, arnnv, uci-shoulder-implant (SHOULDER)"
                + ("; LEG = knee to foot (FracAtlas LEG, UNIFESP knee/lower leg/ankle/foot, knee crops), "
                   "HIP = hip/pelvis/thigh (FracAtlas HIP, UNIFESP); OTHER = UNIFESP parts outside the limbs; "
                   "set-valued labels, loss -log sum_{c in S} p_c: FracAtlas HAND (fingers to elbow) = "
                   "{ELBOW, FINGER, FOREARM, HAND, WRIST}, +-joined regions = the union of their parts. "
                   if "LEG" in mdata.ROUTER_CLASSES else
                   "; OTHER = UNIFESP out-of-scope parts + knee crops. ") + train_desc
            )
            entry["temperature"] = 1.0
            entry["confidence_floor"] = 0.5 if args.confidence_floor is None else args.confidence_floor
            entry["notes"] = "Body-part router; OTHER and parts without classifier metrics are refused."
        elif cfg.get("finding") == "fracture":
            entry["training_data"] = (
                "fracture-labelled radiographs with true negatives (train split of ../shared/data/msk: "
                + ", ".join(mdata.FRACTURE_DATASETS) + "), image-level fracture labels"
                + (", and MURA's normal humerus/forearm/wrist images as fracture negatives"
                   if cfg.get("normal_mura", False) else "") + ". " + (
                    f"Activation map supervised by the fracture boxes of the train split "
                    f"(FracAtlas, pkdarabi, roboflow-sr2022; weight {cfg['localisation_weight']}; "
                    f"box-only sets do not enter the classification loss). "
                    if cfg.get("localisation_weight") else ""
                ) + (
                    f"An auxiliary output on the same pooled features learned MURA's study-level "
                    f"'abnormal' labels of the humerus, forearm and wrist (weight "
                    f"{cfg['abnormality_weight']}; MURA's abnormal images enter only that loss; "
                    f"the output is not in the served graph). "
                    if cfg.get("abnormality_weight") else ""
                ) + train_desc
            )
            _calibrate_fracture_entry(entry, graph_path, args)
        else:
            temperature, points, summary = calibrate_classifier(
                _serving_graph(graph_path, "fp32"), args.data, size, args.min_studies, args.doubt, args.test_time_flip
            )
            entry["training_data"] = (
                "MURA v1.1 (train split of ../shared/data/msk: humerus, forearm, wrist, unknown), "
                "study-level 'abnormal' labels. " + (
                    f"Activation map supervised by the fracture boxes of the train split's boxed positives "
                    f"(weight {cfg['localisation_weight']}; their labels do not enter the classification loss). "
                    if cfg.get("localisation_weight") else ""
                ) + train_desc
            )
            entry["temperature"] = temperature
            # what the probability means, named so in every output (dicom_out/wording.py):
            # the run's own --finding (MURA's study-level "abnormal" unless it says fracture)
            entry["finding"] = cfg.get("finding", "abnormality")
            entry["confidence_floor"] = 0.0
            entry["notes"] = (
                "Abnormality (MURA sense, not only fracture). Temperature and thresholds chosen on "
                "the validation split (kappa-optimal on study means). " + "; ".join(
                    f"{k}: {v.get('reason', 'supported')}" for k, v in summary["parts"].items()
                )
            )
            entry["operating_points"] = points
    if args.attach_metrics is not None:
        metrics = json.loads(args.attach_metrics.read_text())
        role = args.task
        measured = metrics["models"][role]
        if measured["sha256"] != entry["sha256"] or measured.get("precision", "fp32") != entry.get("precision", "fp32"):
            raise SystemExit(f"{args.attach_metrics} was not produced for {entry['sha256']} served in "
                             f"{entry.get('precision', 'fp32')}")
        if "version" in measured and measured["version"] != entry["version"]:
            raise SystemExit(f"{args.attach_metrics} measured {args.name} {measured['version']}, not "
                             f"{entry['version']}: run evaluate on this version")
        if bool(measured.get("test_time_flip", entry.get("test_time_flip"))) != bool(entry.get("test_time_flip")):
            raise SystemExit(f"{args.attach_metrics} was measured with test_time_flip = "
                             f"{str(bool(measured['test_time_flip'])).lower()}, {args.name} {entry['version']} "
                             f"serves {str(bool(entry.get('test_time_flip'))).lower()}: run evaluate on this version")
        try:
            source = str(args.attach_metrics.resolve().relative_to(MODELS_DIR.parent))
        except ValueError:
            source = str(args.attach_metrics)
        entry["metrics"] = flatten_metrics(metrics, role, source)
    existing[args.name] = entry
    args.registry.write_text(dump_registry(existing))
    print(f"registered {args.name} {args.version} sha256 {entry['sha256']}"
          + (f", graph sha256 {entry['graph_sha256']}" if "graph_sha256" in entry else ""))
    return 0


def flatten_metrics(metrics: Mapping[str, Any], role: str,
                    source: str = "models/eval/metrics.json") -> dict[str, Any]:
    """The headline numbers of ``metrics.json`` for one model, as flat TOML keys."""
    out: dict[str, Any] = {"source": source, "split": metrics.get("split", "")}
    if role == "router":
        r = metrics["router"]
        out.update({"accuracy": r["accuracy"], "accuracy_supported": r["accuracy_supported"],
                    "other_recall": r["per_class"].get("OTHER", {}).get("recall", float("nan")), "n": r["n"]})
        if "pooled" in r:
            out.update({"pooled_accuracy_supported": r["pooled"]["accuracy_supported"],
                        "pooled_other_recall": r["pooled"]["other_recall"]})
        if "unsupported_analysed_rate" in r:
            out.update({"unsupported_analysed_rate": r["unsupported_analysed_rate"],
                        "unsupported_analysed_rate_ci95": r["unsupported_analysed_rate_ci95"],
                        "n_known_region": r["n_known_region"]})
        return out
    f = metrics["fracture"]
    if f.get("served"):  # a fracture classifier: image level on fracture labels, per FracAtlas region
        out.update({"image_auroc": f["image"]["auroc"], "image_auroc_ci95": f["image"]["auroc_ci95"],
                    "images": f["image"]["n"], "sensitivity": f["image"]["sensitivity"],
                    "specificity": f["image"]["specificity"],
                    "sensitivity_crossfit": f["crossfit"].get("all", {}).get("sensitivity", float("nan")),
                    "specificity_crossfit": f["crossfit"].get("all", {}).get("specificity", float("nan"))})
        for region, m in f["by_body_part"].items():
            if region.lower() not in FRACATLAS_REGIONS or not np.isfinite(m["image"]["auroc"]):
                continue  # a +-joined region, or too few analysed images of both labels
            b, low = m["image"], f"fracatlas_{region.lower()}"
            out[f"{low}_image_auroc"] = b["auroc"]
            out[f"{low}_image_auroc_ci95"] = b.get("auroc_ci95", [])
            out[f"{low}_images"] = b["n"]
            out[f"{low}_image_sensitivity"] = b["sensitivity"]
            out[f"{low}_image_specificity"] = b["specificity"]
        out["pointing_game"] = metrics["localisation"]["pointing_game"]
        return out
    out.update({"image_auroc": f["image"]["auroc"], "study_auroc": f["study"]["auroc"],
                "study_auroc_ci95": f["study"]["auroc_ci95"], "study_kappa": f["study"]["kappa"],
                "studies": f["study"]["n"]})
    for part, m in f["by_body_part"].items():
        s = m["study"]
        out[f"{part.lower()}_study_auroc"] = s["auroc"]
        out[f"{part.lower()}_study_auroc_ci95"] = s["auroc_ci95"]
        out[f"{part.lower()}_study_kappa"] = s["kappa"]
        out[f"{part.lower()}_studies"] = s["n"]
    out["pointing_game"] = metrics["localisation"]["pointing_game"]
    return out


if __name__ == "__main__":
    sys.exit(main())
