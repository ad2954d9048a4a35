"""The worker's processing function: a ready study through ``pipeline`` (validate,
normalise, route, classify, Grad-CAM, aggregate) and ``dicom_out`` (SC per analysed
image, SR and PDF per study).

The models are loaded once per process (:func:`processor_factory`) and stay warm;
the images of a study go through them as one batch.  A refused image is a value
with a reason, so a study in which some images are refused still gets its results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset

from dicom_out import warm_up
from dicom_out.common import OutputSettings
from dicom_out.ko import build_key_object_selection
from dicom_out.pdf import build_pdf_report
from dicom_out.sc import build_secondary_capture
from dicom_out.sr import build_structured_report
from dicom_out.wording import outcome_record
from node.config import Config
from node.errors import ConfigError
from node.jobs import InstanceRecord, StudyJob
from node.worker import ProcessedStudy, Processor
from pipeline.aggregate import aggregate_study
from pipeline.normalise import prepare
from pipeline.validate import read_metadata
from pipeline.result import (
    ImageFinding,
    ImageMetadata,
    NormalisedImage,
    Refusal,
    RefusalCode,
)

logger = logging.getLogger(__name__)

#: Refusals that mean "there was no radiograph here at all" (a report pushed with
#: the study, our own output): a study holding only these gets no results.
_NOT_IMAGES = {RefusalCode.NOT_AN_IMAGE, RefusalCode.OWN_OUTPUT}


def output_settings(config: Config) -> OutputSettings:
    """The result-object settings from ``[outputs]``; their rules (VR LO lengths with
    the "not diagnostic" suffix, distinct series numbers) become :class:`ConfigError`."""
    try:
        return _output_settings(config)
    except ValueError as exc:
        raise ConfigError(f"outputs: {exc}") from None


def _output_settings(config: Config) -> OutputSettings:
    out = config.outputs
    return OutputSettings(
        institution_name=out.institution_name or None,
        sc_series_number=out.sc_series_number,
        sc_series_description=out.sc_series_description,
        sr_series_number=out.sr_series_number,
        sr_series_description=out.sr_series_description,
        pdf_series_number=out.pdf_series_number,
        pdf_series_description=out.pdf_series_description,
    )


@dataclass(frozen=True)
class PreparedStudy:
    """Stage 1 of a study (:meth:`StudyProcessor.prepare`): its spooled instances read
    and normalised, waiting for the models."""

    job: StudyJob
    sources: Mapping[str, Dataset]
    """SOP Instance UID -> source dataset (instances that could be read), without its
    Pixel Data: once decoded, the result objects read only a source's attributes, and
    an uncompressed radiograph's pixels are most of its bytes (6 MB of the demo's tibia
    as an uncompressed CR), held while the study is in hand and pickled to a build
    process."""
    outcomes: tuple[ImageFinding | Refusal | None, ...]
    """One entry per instance: a refusal already, or ``None`` for an image to analyse."""
    to_analyse: tuple[tuple[int, NormalisedImage], ...]
    """(index into ``outcomes``, image) of the images the models must see."""
    prepare_seconds: float
    started: float
    """``time.perf_counter()`` when preparation began."""
    images: frozenset[str] = frozenset()
    """SOP Instance UIDs of the sources that held Pixel Data (the images of the study,
    as opposed to, say, an SR stored into it)."""


@dataclass(frozen=True)
class AnalysedStudy:
    """Stage 2 of a study (:meth:`StudyProcessor.analyse_many`): every instance has
    its finding or refusal; the result objects are still to be built."""

    prepared: PreparedStudy
    outcomes: tuple[ImageFinding | Refusal, ...]
    model_seconds: float
    """This study's share (by image count) of the batch it was analysed in."""
    batch_images: int
    """Images analysed together with this study's (its own included): those of the
    studies that waited for the models together."""


class StudyProcessor:
    """Turns a :class:`StudyJob` into a :class:`ProcessedStudy` in three stages,
    which the worker may run in different threads (``[worker] threads``):

    1. :meth:`prepare`: read and normalise the spooled instances (CPU, one study);
    2. :meth:`analyse_many`: the models on the images of one or more prepared studies
       in one batch (OpenVINO, which leaves the GIL while it runs);
    3. :meth:`build`: aggregate and build the SC, SR, PDF and KO (CPU, one study).

    Calling the object runs the three in turn on one study.  The result of a study
    does not depend on which studies shared its batch: the router's pooling groups
    images by study (:meth:`pipeline.classify.Analyser.pooling_key`).
    """

    def __init__(self, analyser: object, settings: OutputSettings) -> None:
        self.analyser = analyser
        self.settings = settings

    def __call__(self, job: StudyJob) -> ProcessedStudy:
        return self.build(self.analyse_many([self.prepare(job)])[0])

    def prepare(self, job: StudyJob) -> PreparedStudy:
        """Read and normalise every instance of ``job`` (never raises per instance)."""
        t0 = time.perf_counter()
        sources: dict[str, Dataset] = {}
        outcomes: list[ImageFinding | Refusal | None] = []
        to_analyse: list[tuple[int, NormalisedImage]] = []
        images: set[str] = set()
        for record in job.instances:
            ds, prepared = _prepare(record)
            if ds is not None:
                if "PixelData" in ds:  # decoded (or refused) now: not needed again
                    images.add(record.sop_instance_uid)
                    del ds.PixelData
                sources[record.sop_instance_uid] = ds
            if isinstance(prepared, Refusal):
                outcomes.append(prepared)
            else:
                to_analyse.append((len(outcomes), prepared))
                outcomes.append(None)
        return PreparedStudy(job=job, sources=sources, outcomes=tuple(outcomes),
                             to_analyse=tuple(to_analyse),
                             prepare_seconds=time.perf_counter() - t0, started=t0,
                             images=frozenset(images))

    def analyse_many(self, studies: Sequence[PreparedStudy]) -> list[AnalysedStudy]:
        """The models on the images of ``studies`` as one batch; one
        :class:`AnalysedStudy` per study, in order."""
        t0 = time.perf_counter()
        images = [img for study in studies for _, img in study.to_analyse]
        analysed = self.analyser.analyse(images) if images else []  # type: ignore[attr-defined]
        if len(analysed) != len(images):
            raise RuntimeError(f"the models returned {len(analysed)} outcomes for "
                               f"{len(images)} images")
        seconds = time.perf_counter() - t0
        out: list[AnalysedStudy] = []
        k = 0
        for study in studies:
            outcomes = list(study.outcomes)
            for index, _ in study.to_analyse:
                outcomes[index] = analysed[k]
                k += 1
            share = len(study.to_analyse) / len(images) if images else 0.0
            out.append(AnalysedStudy(prepared=study,
                                     outcomes=tuple(o for o in outcomes if o is not None),
                                     model_seconds=seconds * share, batch_images=len(images)))
        return out

    def build(self, study: AnalysedStudy,
              sink: Callable[[str, Dataset], None] | None = None) -> ProcessedStudy:
        """Aggregate the study and build its result objects.

        With a ``sink``, each object is handed to it as soon as it is built (the worker
        writes it to the spool and queues it, so that the PACS stores one while the next
        is built): the SCs, then the SR, the PDF and the KO.  An SC's Pixel Data is then
        dropped: the SR and the KO reference an SC by its attributes only
        (:func:`dicom_out.common.reference_dataset`), so a large study never holds all
        its heat maps at once.  The objects handed to the sink are not in the returned
        ``outputs``."""
        job = study.prepared.job
        sources = study.prepared.sources
        final = list(study.outcomes)
        models = (self.analyser.router_info, self.analyser.classifier_info)  # type: ignore[attr-defined]
        result = aggregate_study(job.study_instance_uid, final, models)

        recorded = {o.meta.sop_instance_uid: outcome_record(o) for o in final}
        if all(isinstance(o, Refusal) and o.code in _NOT_IMAGES for o in final):
            logger.info("study %s holds no radiograph; no results written",
                        job.study_instance_uid, extra={"study_uid": job.study_instance_uid})
            return ProcessedStudy(outputs=[], outcomes=recorded, decision="no-images",
                                  timings={"decode": study.prepared.prepare_seconds,
                                           "inference": study.model_seconds})

        t2 = time.perf_counter()
        outputs: list[tuple[str, Dataset]] = []
        hand = sink or (lambda kind, ds: outputs.append((kind, ds)))
        analysed = [o for o in result.outcomes() if isinstance(o, ImageFinding)]
        scs: list[Dataset] = []
        for number, f in enumerate(analysed, start=1):
            sc = build_secondary_capture(f, sources[f.meta.sop_instance_uid], self.settings,
                                         instance_number=number, series_findings=analysed)
            hand("sc", sc)
            if sink is not None:
                del sc.PixelData
            scs.append(sc)
        image_sources = {uid: ds for uid, ds in sources.items() if uid in study.prepared.images}
        report_sources = image_sources or dict(sources)
        predecessor = _read_previous(job)
        sr = build_structured_report(result, report_sources, scs, self.settings, predecessor)
        if predecessor is not None and sr.SOPInstanceUID == predecessor.SOPInstanceUID:
            sr = build_structured_report(result, report_sources, scs, self.settings, None)
        hand("sr", sr)
        hand("pdf", build_pdf_report(result, report_sources, self.settings))
        ko = build_key_object_selection(result, report_sources, scs, self.settings)
        if ko is not None:
            hand("ko", ko)
        build_seconds = time.perf_counter() - t2
        logger.info(
            "study %s: %s; %d analysed, %d refused; prepare %.0f ms, models %.0f ms "
            "(with %d image(s) of the studies waiting together), outputs %.0f ms",
            job.study_instance_uid,
            result.decision.value, len(result.findings), len(result.refusals),
            study.prepared.prepare_seconds * 1000, study.model_seconds * 1000,
            study.batch_images, build_seconds * 1000,
            extra={"study_uid": job.study_instance_uid},
        )
        return ProcessedStudy(outputs=outputs, outcomes=recorded, decision=result.decision.value,
                              timings={"decode": study.prepared.prepare_seconds,
                                       "inference": study.model_seconds,
                                       "build": build_seconds})


def _prepare(record: InstanceRecord) -> tuple[Dataset | None, NormalisedImage | Refusal]:
    """Read and normalise one spooled instance; any failure becomes a Refusal, so one
    bad instance never stops its study (``prepare`` promises not to raise; this is
    the worker's second line of defence, found necessary by fuzzing).

    The identity of a refused instance is the job database's record of what was
    received (checked at the network edge), so a dataset that reads back damaged or
    empty is still named and referenced; its dataset is not used as a source.
    """
    meta = ImageMetadata(
        study_instance_uid=record.study_instance_uid,
        series_instance_uid=record.series_instance_uid,
        sop_instance_uid=record.sop_instance_uid,
        sop_class_uid=record.sop_class_uid,
        transfer_syntax_uid=record.transfer_syntax_uid,
    )
    try:
        ds = pydicom.dcmread(record.path)
    except Exception as exc:
        return None, Refusal(meta, RefusalCode.DECODE_FAILED, f"unreadable dataset: {exc}")
    mismatch = [
        keyword for keyword, expected in (
            ("SOPInstanceUID", record.sop_instance_uid),
            ("StudyInstanceUID", record.study_instance_uid),
            ("SeriesInstanceUID", record.series_instance_uid),
        ) if str(ds.get(keyword, "") or "") != expected
    ]
    if mismatch:
        logger.warning("instance %s reads back without its identifiers (%s); refused",
                       record.sop_instance_uid, ", ".join(mismatch),
                       extra={"sop_uid": record.sop_instance_uid,
                              "study_uid": record.study_instance_uid})
        return None, Refusal(meta, RefusalCode.DECODE_FAILED,
                             f"dataset reads back damaged: {', '.join(mismatch)} missing or "
                             "different from what was received")
    try:
        prepared = prepare(ds)
    except Exception as exc:
        logger.exception("instance %s could not be normalised", record.sop_instance_uid,
                         extra={"sop_uid": record.sop_instance_uid})
        return ds, Refusal(read_metadata(ds), RefusalCode.DECODE_FAILED,
                           f"malformed dataset: {type(exc).__name__}: {exc}")
    return ds, prepared


def _read_previous(job: StudyJob) -> Dataset | None:
    if job.previous_report is None or not job.previous_report.exists():
        return None
    try:
        return pydicom.dcmread(job.previous_report)
    except Exception:
        logger.warning("previous SR of study %s unreadable; new version without predecessor",
                       job.study_instance_uid)
        return None


class StudyProcessorFactory:
    """Loads the active models once per process (hash checked) and returns the node's
    :class:`StudyProcessor` (see :func:`processor_factory`).  The node knows by its type
    that the processor it makes can have its result objects built in build processes
    (:mod:`node.builder`)."""

    def __init__(self, config: Config, threads: int) -> None:
        self.config = config
        self.threads = threads

    def __call__(self) -> StudyProcessor:
        from pipeline.classify import Analyser

        config = self.config
        started = time.perf_counter()
        streams = config.worker.resolved_model_streams
        analyser = Analyser.load(config.models.registry, config.models.router,
                                 config.models.classifier, threads=self.threads, streams=streams,
                                 max_batch=config.worker.images_per_run)
        logger.info("models %s and %s loaded in %.1f s (%d stream(s) of %d intra-op thread(s) "
                    "per graph)", config.models.router, config.models.classifier,
                    time.perf_counter() - started, streams, self.threads)
        warm_up()  # the result objects' tables and fonts, before the first study
        return StudyProcessor(analyser, output_settings(config))


def processor_factory(config: Config, model_threads: int | None = None
                      ) -> StudyProcessorFactory:
    """A factory that loads the active models once per process (hash checked) and
    returns the processing function.

    Parameters
    ----------
    config
        The node's configuration.
    model_threads
        Inference threads per graph; default ``config.worker.model_threads``
        (the cores left beside the worker's study threads).
    """
    return StudyProcessorFactory(config, model_threads or config.worker.model_threads)
