"""Process one study: choose the series, segment it, store SEG + SRs, index it, queue the forwards.

:func:`process_job` is what a worker runs for every claimed job. It never raises for bad input:
an :class:`~dicom_node.series.InputError` (or any other failure) ends as a failed job (or a
failed attempt, retried) whose message names the study/series and what to do. Re-running the
same content does nothing, recognised from Orthanc's index without downloading anything; new
content replaces the objects we stored for that series (the old ones are deleted from Orthanc).
Output UIDs derive from the content fingerprint: a re-run after a crash stores the very same
objects, which Orthanc keeps once (the job lists them as ``adopted``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dicom_node import phi
from dicom_node.config import NodeConfig
from dicom_node.identity import (
    DEVICE_NAME,
    MEASUREMENT_SERIES_NUMBER,
    NODE_NAME,
    SIMILAR_CASES_SERIES_NUMBER,
    dataset_bytes,
    derived_uid,
)
from dicom_node.jobs import JobStore, Lease, LeaseLost
from dicom_node.orthanc_client import OrthancClient, OrthancError
from dicom_node.pseudonyms import Pseudonymizer
from dicom_node.reports.measurement import build_measurement_report
from dicom_node.reports.similar_cases import ReportedQuery, build_similar_cases_report
from dicom_node.seg import build_segmentation
from dicom_node.series import InputError, SeriesCandidate, SeriesGeometry, read_geometry, read_hu, select_series
from dicom_node.similar.query import SimilarQuery, find_similar, open_index, study_record
from dicom_node.source_headers import repair_source_headers
from index.lesions import Lesion, measure_lesions
from index.records import SliceRecord
from models.anatomy import AxisDirections, NeckAnatomy, analyse_neck
from models.plausibility import filter_candidates
from models.weights import AlgorithmInfo

log = logging.getLogger("abscess_node.pipeline")
MAX_REPORTED_LESIONS = 20


class SegmenterLike(Protocol):
    """What the pipeline needs of ``models.segmenter.Segmenter``."""

    info: AlgorithmInfo

    def run(self, slices_hu: np.ndarray, batch_size: int = 8, pixel_spacing_mm: tuple[float, float] | None = None) -> Any:
        """Probabilities and embeddings for [n, H, W] HU slices of the given pixel spacing."""


class LeaseKeeper:
    """The worker's hold on its job, as the pipeline sees it: stages, and a check before every write.

    The heartbeat thread sets :attr:`lost` when a renewal fails; :meth:`check` also asks the
    store, so a worker that was stopped (SIGSTOP) past its lease and then resumed finds out
    before it stores anything, and stops.
    """

    def __init__(self, store: JobStore, lease: Lease) -> None:
        self.store = store
        self.lease = lease
        self.lost = threading.Event()

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this worker still holds the job."""
        if self.lost.is_set() or not self.store.holds(self.lease):
            self.lost.set()
            raise LeaseLost(f"job {self.lease.job_id} was taken from worker {self.lease.worker}")

    def update(self, **fields: Any) -> None:
        """Record progress (raises :class:`LeaseLost` when the job is no longer ours)."""
        self.store.update(self.lease, **fields)


class Stopwatch:
    """Seconds spent per pipeline stage, in order; each stage is also recorded in the job (the watchdog reads it)."""

    def __init__(self, keeper: LeaseKeeper | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.keeper = keeper

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block under ``name`` (accumulates)."""
        if self.keeper is not None:
            self.keeper.update(stage=name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def series_candidates(client: OrthancClient, orthanc_study_id: str) -> list[SeriesCandidate]:
    """Describe every series of the study from Orthanc's index (one instance's tags each)."""
    candidates = []
    for series in client.series_of_study(orthanc_study_id):
        tags = series.get("MainDicomTags", {})
        orientation, thickness = None, None
        if series.get("Instances"):
            first = client.instance_tags(series["Instances"][0])
            with contextlib.suppress(ValueError, TypeError):
                orientation = tuple(float(v) for v in str(first.get("ImageOrientationPatient", "")).split("\\"))
            with contextlib.suppress(ValueError, TypeError):
                thickness = float(first.get("SliceThickness"))
        candidates.append(SeriesCandidate(
            series_uid=tags.get("SeriesInstanceUID", series["ID"]), modality=tags.get("Modality", ""),
            description=tags.get("SeriesDescription", ""), instance_count=len(series.get("Instances", [])),
            image_orientation=orientation, slice_thickness=thickness, orthanc_id=series["ID"]))
    return candidates


def content_fingerprint(instance_uids: list[str], algorithm: AlgorithmInfo, config: NodeConfig) -> str:
    """Hash of what determines our output: the series' instances, the weights and the SEG settings.

    Computed from Orthanc's index (SOP Instance UIDs, no pixel data), so an unchanged study is
    recognised without downloading it; our output UIDs derive from it, so a re-run after a crash
    stores the same objects again, which Orthanc keeps once.
    """
    digest = hashlib.sha256()
    for uid in sorted(instance_uids):
        digest.update(uid.encode() + b"\n")
    digest.update(f"{algorithm.name}|{algorithm.version}|{config.segmentation_type}|{config.threshold}".encode())
    digest.update(f"|{config.lesion_rules}|{config.rejected_candidates_segment}|"
                  f"{config.series_rules.require_neck_coverage}".encode())
    return digest.hexdigest()


def axis_directions(geometry: SeriesGeometry) -> AxisDirections:
    """How the series' voxel axes lie in the patient (for :func:`models.anatomy.analyse_neck`).

    Columns follow the first ImageOrientationPatient vector, rows the second, slices the normal
    (the geometry sorts them along it, lowest first).
    """
    orientation = [float(v) for v in geometry.headers[0].ImageOrientationPatient]
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, column)
    return AxisDirections(z_superior=bool(normal[2] > 0), y_posterior=bool(column[1] > 0), x_left=bool(row[0] > 0))


def is_contrast_enhanced(geometry: SeriesGeometry) -> bool:
    """Whether the series says a contrast agent was given (Contrast/Bolus Agent, 0018,0010)."""
    return bool(str(geometry.headers[0].get("ContrastBolusAgent", "") or "").strip())


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """What a worker holds for one job: settings, job store, Orthanc, the network, pseudonyms, its lease."""

    config: NodeConfig
    store: JobStore
    client: OrthancClient
    segmenter: SegmenterLike
    pseudonymizer: Pseudonymizer
    keeper: LeaseKeeper


def process_job(job: dict[str, Any], context: WorkerContext) -> str | None:
    """Run one claimed job to the end of its attempt; never raises for bad input. Returns the job's
    new state (None when the lease was lost: the outcome is another worker's).

    Bad input (:class:`InputError`) fails the job for good; Orthanc errors, a full disk and
    unexpected errors fail the attempt, which is retried (after a back-off) until
    ``MaxAttempts``. A job whose lease was lost is left alone: another worker has it.
    Nothing that identifies the patient (name, ID, birth date, accession number) reaches the log
    or the job's error text: they are redacted for the duration of the job (:mod:`dicom_node.phi`).
    """
    watch = Stopwatch(context.keeper)
    reset_peak_rss()
    job_id = job["id"]
    config = context.config
    work_dir = config.work_directory / f"job-{job_id}"
    retry = False
    with contextlib.ExitStack() as redaction:
        try:
            study = context.client.study(job["orthanc_study_id"])
            redaction.enter_context(phi.identifiers(
                [*phi.identifiers_of(study.get("PatientMainDicomTags", {})),
                 *phi.identifiers_of(study.get("MainDicomTags", {}))]))
            state, message, result = _process(job, study, context, watch, work_dir)
        except LeaseLost as lost:
            log.warning("job %s: %s; stopping without writing anything more", job_id, lost)
            shutil.rmtree(work_dir, ignore_errors=True)
            return None
        except InputError as error:
            state, message, result = "failed", str(error), None
        except OrthancError as error:
            state, message, result, retry = "failed", f"Orthanc REST error: {error}", None, True
        except OSError as error:
            if error.errno != errno.ENOSPC:
                log.exception("job %s: unexpected error", job_id)
            state, message, result, retry = "failed", _os_error_message(error, config), None, True
        except Exception as error:  # a bug or an environment problem: keep the worker alive, report it
            log.exception("job %s: unexpected error", job_id)
            state, message, result, retry = ("failed", f"internal error ({type(error).__name__}: {error}); see the worker "
                                             "log", None, True)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        message = phi.redact(message) if message else message
        try:
            new_state = context.store.finish(context.keeper.lease, state, error=message, result=result,
                                             timings=watch.seconds, retry=retry, max_attempts=config.max_attempts)
        except LeaseLost as lost:
            log.warning("job %s: %s; its outcome is not recorded", job_id, lost)
            return None
        log.info("job %s study %s: %s %s", job_id, job.get("study_uid") or job["orthanc_study_id"], new_state,
                 f"({message})" if message else "")
        return new_state


def _os_error_message(error: OSError, config: NodeConfig) -> str:
    """An operating-system error in words; a full disk says where and how much is left."""
    if error.errno == errno.ENOSPC:
        free = shutil.disk_usage(config.work_directory).free // (1024 * 1024) if config.work_directory.exists() else 0
        return (f"disk full while writing {error.filename or 'scratch data'} (WorkDirectory={config.work_directory}: "
                f"{free} MB free); free space there or point WorkDirectory at a larger disk")
    return f"operating system error {error.errno} ({error.strerror}) on {error.filename or 'a file'}"


def _process(job: dict[str, Any], study: dict[str, Any], context: WorkerContext, watch: Stopwatch,
             work_dir: Path) -> tuple[str, str | None, dict[str, Any] | None]:
    config, store, client, segmenter = context.config, context.store, context.client, context.segmenter
    pseudonymizer, keeper = context.pseudonymizer, context.keeper
    orthanc_study_id = job["orthanc_study_id"]
    with watch.stage("select"):
        study_uid = study["MainDicomTags"].get("StudyInstanceUID", "")
        keeper.update(study_uid=study_uid)
        candidates = series_candidates(client, orthanc_study_id)
        eligible, skipped = select_series(candidates, config.series_rules)
    if not eligible:
        reasons = "; ".join(f"{uid}: {why}" for uid, why in skipped.items()) or "the study has no series"
        keeper.update(selection={"chosen": None, "skipped": skipped})
        return "skipped", f"no series to segment in study {study_uid} ({reasons})", None

    geometry, chosen, fingerprint, previous = None, None, "", None
    for candidate in eligible:
        with watch.stage("select"):
            instances = client.get_json(f"/series/{candidate.orthanc_id}/instances")
            if len(instances) > config.series_rules.max_slices:
                raise InputError(
                    f"series {candidate.series_uid} has {len(instances)} instances, more than "
                    f"SeriesRules.MaxSlices={config.series_rules.max_slices}; raise MaxSlices to process it")
            fingerprint = content_fingerprint(
                [i.get("MainDicomTags", {}).get("SOPInstanceUID", i["ID"]) for i in instances], segmenter.info, config)
            previous = store.output_for(candidate.series_uid)
            if (previous and previous["fingerprint"] == fingerprint and not job.get("force")
                    and all(client.instance_exists(i) for i in previous["objects"].get("orthanc_ids", []))):
                # typically our own SEG/SRs arriving made the study stable again: recognised from
                # Orthanc's index, nothing downloaded
                keeper.update(series_uid=candidate.series_uid)
                return "skipped", None, {"unchanged": True, "note": "same content as already processed; nothing to do",
                                         **previous["objects"]}
        with watch.stage("download"):
            paths = client.download_instances([i["ID"] for i in instances], work_dir / candidate.orthanc_id)
        with watch.stage("geometry"):
            try:
                geometry = read_geometry(paths, config.series_rules.max_slices,
                                         config.series_rules.max_pixels_per_slice)
                chosen = candidate
                break
            except InputError as error:
                skipped[candidate.series_uid] = f"unusable: {error}"
                if candidate is eligible[-1]:
                    keeper.update(selection={"chosen": None, "skipped": skipped})
                    raise
    assert geometry is not None and chosen is not None
    with watch.stage("geometry"):
        # what highdicom copies from the source into our SEG/SRs, repaired so that they stay valid
        repaired = repair_source_headers(geometry.headers)
        geometry = dataclasses.replace(geometry, headers=repaired.headers)
    skipped.pop(chosen.series_uid, None)
    selection = {"chosen": chosen.series_uid, "why": f"{chosen.modality}, {geometry.shape[0]} slices, axial, "
                 f"ranked first by {config.series_rules.prefer}", "skipped": skipped,
                 "warnings": [*geometry.warnings, *(f"source header: {finding}" for finding in repaired.findings)]}
    keeper.update(series_uid=chosen.series_uid, selection=selection)

    with watch.stage("load"):
        volume_hu = _load_volume(geometry, config, work_dir / "volume_hu.f32")
    with watch.stage("anatomy"):
        anatomy = analyse_neck(volume_hu, geometry.spacing_mm, axis_directions(geometry))
    selection["neck"] = anatomy.summary()
    keeper.update(selection=selection)
    if not anatomy.covers_neck and config.series_rules.require_neck_coverage:
        return "skipped", (f"series {chosen.series_uid}: {anatomy.reason}; not segmented "
                           "(SeriesRules.RequireNeckCoverage)"), {"neck": anatomy.summary()}
    with watch.stage("segment"):
        segmented = _segment(geometry, volume_hu, segmenter, config)
    with watch.stage("plausibility"):
        plausible = filter_candidates(segmented.mask, volume_hu, geometry.spacing_mm, anatomy, config.lesion_rules,
                                      contrast=is_contrast_enhanced(geometry))
    with watch.stage("measure"):
        measured = _measure(plausible.kept, volume_hu, geometry.spacing_mm, anatomy)
        # a report of hundreds of specks helps nobody: the largest MAX_REPORTED_LESIONS are reported
        lesions = sorted(measured, key=lambda lesion: -lesion.volume_ml)[:MAX_REPORTED_LESIONS]
    with watch.stage("seg"):
        kept_values = (np.where(plausible.kept, segmented.probabilities, 0.0) if config.segmentation_type == "FRACTIONAL"
                       else plausible.kept)
        seg = build_segmentation(geometry.headers, kept_values, segmenter.info, config.segmentation_type,
                                 rejected=plausible.rejected if config.rejected_candidates_segment else None,
                                 uid_seed=fingerprint)
    with watch.stage("sr"):
        measurements = build_measurement_report(
            geometry.headers, seg if lesions else None, lesions, segmenter.info, series_number=MEASUREMENT_SERIES_NUMBER,
            instance_number=1, manufacturer=NODE_NAME, device_name=DEVICE_NAME,
            candidates_removed=plausible.removed_by_rule(),
            series_instance_uid=derived_uid(fingerprint, "measurements-series"),
            sop_instance_uid=derived_uid(fingerprint, "measurements"))
    with watch.stage("index"):
        keeper.check()
        with open_index(config.index_directory, config.index_lock_timeout_seconds,
                        on_rebuild=store.requeue_for_reindex, vector_encoding=config.index_vector_encoding,
                        database_url=config.index_database, ef_search=config.index_ef_search) as index:
            index.replace_study(
                study_record(study, chosen.series_uid, chosen.orthanc_id, fingerprint),
                [SliceRecord(i, str(h.SOPInstanceUID), float(z)) for i, (h, z) in enumerate(zip(geometry.headers, geometry.positions))],
                segmented.slice_embeddings, _kept_roi_embeddings(segmented.roi_embeddings, plausible.kept), lesions)
            similar = find_similar(index, SimilarQuery(study_uid, k=config.similar_cases_top_k))
            index_size = {"studies": len(index.study_uids()), "slice": index.vector_count("slice"),
                          "roi": index.vector_count("roi")}
    outputs = {"seg": seg, "measurements": measurements}
    if config.similar_cases_report != "off":
        with watch.stage("sr"):
            # stored in this patient's study: other patients appear only as keyed pseudonyms unless
            # the admin chose SimilarCasesReport "identified"
            shown = similar if config.similar_cases_report == "identified" else [pseudonymizer.case(c) for c in similar]
            listed = "|".join(f"{case.study_uid}:{case.score:.6f}" for case in similar)
            outputs["similar_cases"] = build_similar_cases_report(
                geometry.headers, shown, ReportedQuery(mode="study", k=config.similar_cases_top_k, requested_by=DEVICE_NAME),
                segmenter.info, series_number=SIMILAR_CASES_SERIES_NUMBER, instance_number=1, manufacturer=NODE_NAME,
                device_name=DEVICE_NAME, series_instance_uid=derived_uid(fingerprint, "similar-cases-series"),
                sop_instance_uid=derived_uid(fingerprint, "similar-cases", listed))
    with watch.stage("store"):
        keeper.check()  # a worker that lost its job writes nothing (and our UIDs make a late store harmless)
        stored = {name: client.store(dataset_bytes(dataset)) for name, dataset in outputs.items()}
        new_ids = [answer["ID"] for answer in stored.values()]
        objects: dict[str, Any] = {"orthanc_ids": new_ids}
        for name, answer in stored.items():
            objects[name] = {"orthanc_id": answer["ID"], "sop_instance_uid": outputs[name].SOPInstanceUID,
                             "series_uid": outputs[name].SeriesInstanceUID, "url": f"/instances/{answer['ID']}"}
        store.record_output(keeper.lease, chosen.series_uid, study_uid, fingerprint, objects)
        replaced = []
        for old_id in (previous or {}).get("objects", {}).get("orthanc_ids", []):
            if old_id not in new_ids and client.delete_instance(old_id):
                replaced.append(old_id)
        adopted = [name for name, answer in stored.items() if answer.get("Status") == "AlreadyStored"]
    with watch.stage("forward"):
        to_forward = [answer["ID"] for name, answer in stored.items()
                      if name != "similar_cases" or config.forward_similar_cases_report]
        if config.forward_to:
            store.add_forwards(keeper.lease, study_uid, to_forward, list(config.forward_to))
    mask = plausible.kept
    result = {**objects, "replaced": replaced, "adopted": adopted, "frames": int(mask.shape[0]),
              "lesion_voxels": int(mask.sum()), "slices_with_lesion": int(mask.any(axis=(1, 2)).sum()),
              "lesions": [lesion.as_dict() for lesion in lesions], "lesions_found": len(measured),
              "plausibility": plausible.summary(), "neck": anatomy.summary(),
              "similar_studies": [{"rank": case.rank, "study_uid": case.study_uid, "score": round(case.score, 6)}
                                  for case in similar],
              "algorithm": segmenter.info.as_dict(), "source_repairs": repaired.findings,
              "peak_rss_mb": peak_rss_mb(), "index_size": index_size}
    return "done", None, result


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement for this process (Linux: clear_refs 5 resets VmHWM)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process since :func:`reset_peak_rss`, in MiB (None if unknown)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def _measure(mask: np.ndarray, volume_hu: np.ndarray, spacing_mm: tuple[float, float, float],
             anatomy: NeckAnatomy) -> list[Lesion]:
    """Lesion descriptors with each lesion's deep neck space and side.

    Measured on the mask's bounding box only (memory stays bounded on long series).
    """
    if not mask.any():
        return []
    box = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((max(0, int(present[0]) - 2), min(mask.shape[axis], int(present[-1]) + 3)))
    (z0, z1), (y0, y1), (x0, x1) = box
    lesions = []
    for lesion in measure_lesions(mask[z0:z1, y0:y1, x0:x1], np.asarray(volume_hu[z0:z1, y0:y1, x0:x1]), spacing_mm):
        placed = lesion.shifted(z0, y0, x0)
        location = anatomy.locate(placed.centroid_zyx)
        lesions.append(placed.located(location.space, location.side))
    return lesions


@dataclasses.dataclass
class Segmented:
    """What segmenting one series yields (arrays in source slice order)."""

    mask: np.ndarray
    probabilities: np.ndarray
    slice_embeddings: np.ndarray
    roi_embeddings: np.ndarray


def _kept_roi_embeddings(roi_embeddings: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """ROI embeddings of the slices that hold a kept lesion; zero rows (no ROI) where only rejected
    candidates were (a region query must not match a rejected speck in the petrous bone)."""
    return np.where(kept.any(axis=(1, 2))[:, None], roi_embeddings, 0.0).astype(np.float32)


def _load_volume(geometry: SeriesGeometry, config: NodeConfig, volume_path: Path) -> np.ndarray:
    """Decode the series into a memory-mapped float32 HU volume, ``ChunkSlices`` slices at a time.

    The anatomy, the network and the measurements read it from there, so a 2,000-slice series
    does not need its float volume in RAM.
    """
    volume_path.parent.mkdir(parents=True, exist_ok=True)
    volume_hu = np.lib.format.open_memmap(volume_path, mode="w+", dtype=np.float32, shape=geometry.shape)
    for start in range(0, geometry.shape[0], config.chunk_slices):
        stop = min(geometry.shape[0], start + config.chunk_slices)
        volume_hu[start:stop] = read_hu(geometry, start, stop)
    volume_hu.flush()
    return volume_hu


def _segment(geometry: SeriesGeometry, volume_hu: np.ndarray, segmenter: SegmenterLike, config: NodeConfig) -> Segmented:
    """Run the network chunk by chunk on the memory-mapped volume (one chunk in memory at a time)."""
    n = geometry.shape[0]
    mask = np.zeros(geometry.shape, dtype=bool)
    keep_probabilities = config.segmentation_type == "FRACTIONAL"
    probabilities_u8 = np.zeros(geometry.shape, dtype=np.uint8) if keep_probabilities else None
    slice_embeddings, roi_embeddings = [], []
    for start in range(0, n, config.chunk_slices):
        stop = min(n, start + config.chunk_slices)
        output = segmenter.run(np.asarray(volume_hu[start:stop]), batch_size=config.inference_batch_size,
                               pixel_spacing_mm=geometry.spacing_mm[1:])
        mask[start:stop] = output.probabilities > config.threshold
        if probabilities_u8 is not None:
            probabilities_u8[start:stop] = np.rint(output.probabilities * 255).astype(np.uint8)
        slice_embeddings.append(output.slice_embeddings)
        roi_embeddings.append(output.roi_embeddings)
    probabilities = (probabilities_u8.astype(np.float32) / 255.0) if probabilities_u8 is not None else np.empty(0, np.float32)
    return Segmented(mask, probabilities, np.concatenate(slice_embeddings), np.concatenate(roi_embeddings))
