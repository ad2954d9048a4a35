"""What the console shows, read from the job database (:mod:`node.status`), the
result objects the node wrote, and the model registry.  No patient names or ids:
the job database holds none, and from an SR only the finding sites are read."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from node.config import Config
from node.console.charts import horizontal_bars, percentile, stacked_bars
from node.jobs import JobStore
from node.status import status_rows

logger = logging.getLogger(__name__)

_FINDING_SITE = "Finding Site"


class BodyParts:
    """Body parts of a study, read once from its latest SR (the finding sites of
    TID 1500) and cached by file."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def of(self, sr_path: str | None) -> tuple[str, ...]:
        if not sr_path:
            return ()
        with self._lock:
            if sr_path in self._cache:
                return self._cache[sr_path]
        parts: tuple[str, ...] = ()
        try:
            ds = pydicom.dcmread(sr_path)
            found: list[str] = []
            _walk(ds, found)
            parts = tuple(dict.fromkeys(found))
        except Exception as exc:  # a missing or unreadable SR: no body part shown
            logger.debug("no body part from %s: %s", sr_path, exc)
        with self._lock:
            self._cache[sr_path] = parts
        return parts


def _walk(ds: pydicom.Dataset, found: list[str]) -> None:
    for item in ds.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if name and str(name[0].get("CodeMeaning", "")) == _FINDING_SITE:
            code = item.get("ConceptCodeSequence")
            if code:
                found.append(str(code[0].get("CodeMeaning", "")).lower())
        _walk(item, found)


@dataclass(frozen=True)
class ModelRow:
    role: str
    name: str
    version: str
    sha256: str
    metrics: Mapping[str, Any]


def models(config: Config) -> list[ModelRow]:
    """The active models with their versions, hashes and validated metrics."""
    from models.registry import RegistryError, load_registry

    try:
        registry = load_registry(config.models.registry)
    except RegistryError as exc:
        logger.warning("console: model registry unreadable: %s", exc)
        return []
    rows = []
    for role in ("router", "classifier"):
        entry = registry.models.get(getattr(config.models, role))
        if entry is not None:
            shown = {k: v for k, v in entry.metrics.items() if isinstance(v, (int, float, str))}
            rows.append(ModelRow(role, entry.name, entry.version, entry.sha256, shown))
    classifier = registry.models.get(config.models.classifier)
    try:
        heads = registry.heads_of(classifier) if classifier is not None else ()
    except RegistryError as exc:
        logger.warning("console: %s", exc)
        heads = ()
    for head in heads:  # decides the body parts of its own operating points
        shown = {k: v for k, v in head.metrics.items() if isinstance(v, (int, float, str))}
        rows.append(ModelRow(f"head ({head.finding}: {', '.join(head.supported_body_parts)})",
                             head.name, head.version, head.sha256, shown))
    return rows


def _day(epoch: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def page(config: Config, jobs: JobStore, body_parts: BodyParts, limit: int = 50) -> dict[str, Any]:
    """Everything the page template needs."""
    rows = status_rows(jobs, limit)
    reports = {r["study_instance_uid"]: r["path"] for r in jobs.query(
        "SELECT study_instance_uid, path FROM reports r WHERE generation = (SELECT "
        "MAX(generation) FROM reports q WHERE q.study_instance_uid = r.study_instance_uid)")}
    studies = []
    for s in rows["studies"]:
        times = jobs.query("SELECT last_received_at FROM studies WHERE study_instance_uid = ?",
                           [s["study_instance_uid"]])
        received = float(times[0]["last_received_at"]) if times else s["updated_at"]
        parts = body_parts.of(reports.get(s["study_instance_uid"]))
        studies.append({**s, "body_parts": ", ".join(parts) or "-",
                        "updated": time.strftime("%Y-%m-%d %H:%M:%S",
                                                 time.gmtime(s["updated_at"])),
                        "seconds": (s["updated_at"] - received) if s["state"] == "processed"
                        else None})

    # charts over time
    history = jobs.query("SELECT study_instance_uid, decision, updated_at, last_received_at, "
                         "state FROM studies WHERE state = 'processed' ORDER BY updated_at")
    days = sorted({_day(h["updated_at"]) for h in history})
    by_decision: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(days))
    by_part: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(days))
    latency: dict[str, list[float]] = defaultdict(list)
    for h in history:
        i = days.index(_day(h["updated_at"]))
        by_decision[h["decision"] or "none"][i] += 1
        for part in body_parts.of(reports.get(h["study_instance_uid"])) or ("not analysed",):
            by_part[part][i] += 1
        latency[_day(h["updated_at"])].append(h["updated_at"] - h["last_received_at"])
    delivered = jobs.query("SELECT delivered_at, created_at FROM outbox WHERE state = "
                           "'delivered' AND delivered_at IS NOT NULL")
    delivery = [d["delivered_at"] - d["created_at"] for d in delivered]
    percentiles = {f"p{int(q * 100)}": [percentile(latency[d], q) for d in days]
                   for q in (0.5, 0.9)}
    percentiles["max"] = [max(latency[d]) for d in days]
    refusals = Counter(
        (r["reason"] or "").split(":")[0] or r["outcome"]
        for r in jobs.query("SELECT outcome, reason FROM instances WHERE outcome = 'refused'"))
    charts = {
        "decisions": stacked_bars("Studies per day by decision", days, dict(by_decision)),
        "body_parts": stacked_bars("Studies per day by body part", days, dict(by_part)),
        "latency": horizontal_bars(
            "Last instance to results, seconds (all days)",
            {"p50": round(percentile([v for d in days for v in latency[d]], 0.5), 2),
             "p90": round(percentile([v for d in days for v in latency[d]], 0.9), 2),
             "p99": round(percentile([v for d in days for v in latency[d]], 0.99), 2),
             "delivery p50": round(percentile(delivery, 0.5), 2),
             "delivery p90": round(percentile(delivery, 0.9), 2)}, unit=" s"),
        "latency_days": stacked_bars("Median seconds to results per day", days,
                                     {"p50": percentiles["p50"]}),
        "refusals": horizontal_bars("Images refused by reason", dict(refusals.most_common(12))),
    }

    # destinations: the last C-STORE result of each
    destinations = []
    for dest in config.destinations:
        last_ok = jobs.query("SELECT MAX(delivered_at) AS t FROM outbox WHERE destination = ? "
                             "AND state = 'delivered'", [dest.name])[0]["t"]
        failing = jobs.query("SELECT last_error, attempts, state FROM outbox WHERE destination = ?"
                             " AND state != 'delivered' AND attempts > 0 ORDER BY id DESC LIMIT 1",
                             [dest.name])
        destinations.append({
            "name": dest.name, "address": f"{dest.ae_title}@{dest.host}:{dest.port}",
            "last_ok": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(last_ok)) if last_ok else "never",
            "error": failing[0]["last_error"] if failing else "",
            "reachable": not failing,
        })
    return {"counts": rows["counts"], "studies": studies, "problems": rows["delivery_problems"],
            "refused": rows["not_analysed"], "charts": charts, "destinations": destinations,
            "models": models(config), "ae_title": config.node.ae_title,
            "now": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
