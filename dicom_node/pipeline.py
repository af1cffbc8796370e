"""Process one study: choose the series, segment it, store SEG + SRs, index it, forward.

:func:`process_job` is what a worker runs for every claimed job. It never raises for bad input:
an :class:`~dicom_node.series.InputError` (or any other failure) ends as a failed job whose
message names the study/series and what to do. Re-running the same content does nothing; new
content replaces the objects we stored for that series (the old ones are deleted from Orthanc).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dicom_node.config import NodeConfig
from dicom_node.identity import (
    DEVICE_NAME,
    MEASUREMENT_SERIES_NUMBER,
    NODE_NAME,
    SIMILAR_CASES_SERIES_NUMBER,
    dataset_bytes,
)
from dicom_node.jobs import JobStore
from dicom_node.orthanc_client import OrthancClient, OrthancError
from dicom_node.reports.measurement import build_measurement_report
from dicom_node.reports.similar_cases import ReportedQuery, build_similar_cases_report
from dicom_node.seg import build_segmentation
from dicom_node.series import InputError, SeriesCandidate, SeriesGeometry, read_geometry, read_hu, select_series
from dicom_node.similar.query import SimilarQuery, find_similar, open_index, study_record
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


class Stopwatch:
    """Seconds spent per pipeline stage, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block under ``name`` (accumulates)."""
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


def content_fingerprint(geometry: SeriesGeometry, algorithm: AlgorithmInfo, config: NodeConfig) -> str:
    """Hash of what determines our output: the slices, the weights and the SEG settings."""
    digest = hashlib.sha256()
    for header in geometry.headers:
        digest.update(str(header.SOPInstanceUID).encode() + b"\n")
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


def process_job(job: dict[str, Any], config: NodeConfig, store: JobStore, client: OrthancClient,
                segmenter: SegmenterLike) -> None:
    """Run one claimed job to its end state (done, skipped or failed); never raises for bad input."""
    watch = Stopwatch()
    reset_peak_rss()
    job_id = job["id"]
    work_dir = config.work_directory / f"job-{job_id}"
    try:
        state, message, result = _process(job, config, store, client, segmenter, watch, work_dir)
    except InputError as error:
        state, message, result = "failed", str(error), None
    except OrthancError as error:
        state, message, result = "failed", f"Orthanc REST error: {error}", None
    except Exception as error:  # a bug or an environment problem: keep the worker alive, report it
        log.exception("job %s: unexpected error", job_id)
        state, message, result = "failed", f"internal error ({type(error).__name__}: {error}); see the worker log", None
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    store.finish(job_id, state, error=message, result=result, timings=watch.seconds)
    log.info("job %s study %s: %s %s", job_id, job.get("study_uid") or job["orthanc_study_id"], state,
             f"({message})" if message else "")


def _process(job: dict[str, Any], config: NodeConfig, store: JobStore, client: OrthancClient,
             segmenter: SegmenterLike, watch: Stopwatch, work_dir: Path) -> tuple[str, str | None, dict[str, Any] | None]:
    job_id, orthanc_study_id = job["id"], job["orthanc_study_id"]
    with watch.stage("select"):
        study = client.study(orthanc_study_id)
        study_uid = study["MainDicomTags"].get("StudyInstanceUID", "")
        store.update(job_id, study_uid=study_uid)
        candidates = series_candidates(client, orthanc_study_id)
        eligible, skipped = select_series(candidates, config.series_rules)
    if not eligible:
        reasons = "; ".join(f"{uid}: {why}" for uid, why in skipped.items()) or "the study has no series"
        store.update(job_id, selection={"chosen": None, "skipped": skipped})
        return "skipped", f"no series to segment in study {study_uid} ({reasons})", None

    geometry, chosen = None, None
    for candidate in eligible:
        with watch.stage("download"):
            instance_ids = client.get_json(f"/series/{candidate.orthanc_id}")["Instances"]
            if len(instance_ids) > config.series_rules.max_slices:
                raise InputError(
                    f"series {candidate.series_uid} has {len(instance_ids)} instances, more than "
                    f"SeriesRules.MaxSlices={config.series_rules.max_slices}; raise MaxSlices to process it")
            paths = client.download_instances(instance_ids, work_dir / candidate.orthanc_id)
        with watch.stage("geometry"):
            try:
                geometry = read_geometry(paths, config.series_rules.max_slices)
                chosen = candidate
                break
            except InputError as error:
                skipped[candidate.series_uid] = f"unusable: {error}"
                if candidate is eligible[-1]:
                    store.update(job_id, selection={"chosen": None, "skipped": skipped})
                    raise
    assert geometry is not None and chosen is not None
    skipped.pop(chosen.series_uid, None)
    selection = {"chosen": chosen.series_uid, "why": f"{chosen.modality}, {geometry.shape[0]} slices, axial, "
                 f"ranked first by {config.series_rules.prefer}", "skipped": skipped, "warnings": geometry.warnings}
    store.update(job_id, series_uid=chosen.series_uid, selection=selection)

    fingerprint = content_fingerprint(geometry, segmenter.info, config)
    previous = store.output_for(chosen.series_uid)
    if (previous and previous["fingerprint"] == fingerprint and not job.get("force")
            and all(client.instance_exists(i) for i in previous["objects"].get("orthanc_ids", []))):
        return "skipped", None, {"unchanged": True, "note": "same content as already processed; nothing to do",
                                 **previous["objects"]}

    with watch.stage("load"):
        volume_hu = _load_volume(geometry, config, work_dir / "volume_hu.f32")
    with watch.stage("anatomy"):
        anatomy = analyse_neck(volume_hu, geometry.spacing_mm, axis_directions(geometry))
    selection["neck"] = anatomy.summary()
    store.update(job_id, selection=selection)
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
                                 rejected=plausible.rejected if config.rejected_candidates_segment else None)
    with watch.stage("sr"):
        measurements = build_measurement_report(
            geometry.headers, seg if lesions else None, lesions, segmenter.info, series_number=MEASUREMENT_SERIES_NUMBER,
            instance_number=1, manufacturer=NODE_NAME, device_name=DEVICE_NAME,
            candidates_removed=plausible.removed_by_rule())
    with watch.stage("index"):
        with open_index(config.index_directory) as index:
            index.replace_study(
                study_record(study, chosen.series_uid, chosen.orthanc_id, fingerprint),
                [SliceRecord(i, str(h.SOPInstanceUID), float(z)) for i, (h, z) in enumerate(zip(geometry.headers, geometry.positions))],
                segmented.slice_embeddings, _kept_roi_embeddings(segmented.roi_embeddings, plausible.kept), lesions)
            similar = find_similar(index, SimilarQuery(study_uid, k=config.similar_cases_top_k),
                                   config.pseudonymize_similar_cases)
    with watch.stage("sr"):
        similar_report = build_similar_cases_report(
            geometry.headers, similar, ReportedQuery(mode="study", k=config.similar_cases_top_k, requested_by=DEVICE_NAME),
            segmenter.info, series_number=SIMILAR_CASES_SERIES_NUMBER, instance_number=1, manufacturer=NODE_NAME,
            device_name=DEVICE_NAME)
    with watch.stage("store"):
        stored = {name: client.store(dataset_bytes(dataset)) for name, dataset in
                  (("seg", seg), ("measurements", measurements), ("similar_cases", similar_report))}
        new_ids = [answer["ID"] for answer in stored.values()]
        replaced = []
        for old_id in (previous or {}).get("objects", {}).get("orthanc_ids", []):
            if old_id not in new_ids and client.delete_instance(old_id):
                replaced.append(old_id)
        objects = {"orthanc_ids": new_ids}
        for (name, answer), dataset in zip(stored.items(), (seg, measurements, similar_report)):
            objects[name] = {"orthanc_id": answer["ID"], "sop_instance_uid": dataset.SOPInstanceUID,
                             "series_uid": dataset.SeriesInstanceUID, "url": f"/instances/{answer['ID']}"}
        store.record_output(chosen.series_uid, study_uid, fingerprint, objects)
    forwarded = []
    with watch.stage("forward"):
        for modality in config.forward_to:
            forwarded.append(client.send_to_modality(modality, new_ids, retries=config.forward_retries))
    mask = plausible.kept
    result = {**objects, "replaced": replaced, "forwarded": forwarded, "frames": int(mask.shape[0]),
              "lesion_voxels": int(mask.sum()), "slices_with_lesion": int(mask.any(axis=(1, 2)).sum()),
              "lesions": [lesion.as_dict() for lesion in lesions], "lesions_found": len(measured),
              "plausibility": plausible.summary(), "neck": anatomy.summary(),
              "similar_studies": [{"rank": case.rank, "study_uid": case.study_uid, "score": round(case.score, 6)}
                                  for case in similar],
              "algorithm": segmenter.info.as_dict(),
              "peak_rss_mb": peak_rss_mb()}
    failed_forwards = [f for f in forwarded if f["state"] != "Success"]
    if failed_forwards:
        names = ", ".join(f"{f['modality']} ({f['error'] or 'failed'})" for f in failed_forwards)
        return "failed", f"SEG and SRs stored, but forwarding failed after {config.forward_retries} attempt(s) to: {names}", result
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
