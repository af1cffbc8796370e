"""The similar-case gallery: the ranked cases of one study, with thumbnails of their best-matching
slice pairs (query slice beside matched slice, the abscess overlay drawn).

Runs in the similar-cases service (the plugin only relays: rendering needs pydicom, highdicom,
numpy and Pillow). Every gallery goes through :meth:`SimilarCaseService.answer`, so the access
policy, the pseudonymisation and the audit apply exactly as for the REST and C-FIND answers.
Thumbnail URLs name no UID: each answer gets opaque references (:class:`ThumbnailReferences`),
bound to the user who received it and valid for an hour, which only this service resolves.
Pseudonymised answers carry no viewer link either (opening the study would show the patient).
"""

from __future__ import annotations

import base64
import collections
import io
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import pydicom
from PIL import Image
from scipy import ndimage

from dicom_node.jobs import JobStore
from dicom_node.orthanc_client import OrthancClient, OrthancError
from dicom_node.similar.policy import Caller
from dicom_node.similar.query import query_index
from dicom_node.similar.rest import answer_params, error_answer
from dicom_node.similar.service import SimilarCaseService

log = logging.getLogger("abscess_node.gallery")

THUMBNAIL_PIXELS = 256
"""Longest side of a thumbnail."""
WINDOW_HU = (40.0, 400.0)
"""Soft-tissue window (level, width) in HU: the abscess core and its enhancing rim."""
OVERLAY_RGB = (255, 64, 0)
"""The abscess overlay: its outline in this colour, its area tinted with it."""
OVERLAY_ALPHA = 0.4
REFERENCE_SECONDS = 3600.0
MAX_REFERENCES = 20_000
MAX_PAIRS = 5
MAX_CACHED_THUMBNAILS = 256
THUMBNAIL_PATH = "/abscess-node/thumbnails/"


def viewer_url(study_uid: str) -> str:
    """Where the node's OHIF opens a study."""
    return f"/ohif/viewer?StudyInstanceUIDs={study_uid}"


class ThumbnailReferences:
    """Opaque, per-answer references to one slice of one study, bound to the user who got them.

    Args:
        lifetime_seconds: how long a reference resolves.
        capacity: at most this many references are kept (the oldest go first).
    """

    def __init__(self, lifetime_seconds: float = REFERENCE_SECONDS, capacity: int = MAX_REFERENCES) -> None:
        self.lifetime_seconds = lifetime_seconds
        self.capacity = capacity
        self._references: collections.OrderedDict[str, tuple[str, str, str, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def issue(self, user: str, study_uid: str, sop_instance_uid: str) -> str:
        """A new random reference (URL-safe) to the slice, for ``user`` only."""
        token = secrets.token_urlsafe(18)
        with self._lock:
            self._references[token] = (user, study_uid, sop_instance_uid, time.monotonic() + self.lifetime_seconds)
            while len(self._references) > self.capacity:
                self._references.popitem(last=False)
        return token

    def resolve(self, token: str, user: str) -> tuple[str, str] | None:
        """(study UID, SOP Instance UID) of a reference, or None (unknown, expired or another user's)."""
        with self._lock:
            found = self._references.get(token)
        if found is None or found[0] != user or found[3] < time.monotonic():
            return None
        return found[1], found[2]


def render_thumbnail(slice_hu: np.ndarray, mask: np.ndarray | None, size: int = THUMBNAIL_PIXELS) -> bytes:
    """A PNG of one CT slice in the soft-tissue window, the abscess mask drawn over it.

    Args:
        slice_hu: [rows, columns] HU values.
        mask: [rows, columns] bool, or None when the slice has no segmentation.
        size: the thumbnail's longest side in pixels.
    """
    level, width = WINDOW_HU
    grey = np.clip((slice_hu.astype(np.float32) - (level - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)
    rows, columns = grey.shape
    scale = size / max(rows, columns)
    shape = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    picture = np.asarray(Image.fromarray(grey).resize(shape, Image.Resampling.BILINEAR), dtype=np.float32)
    rgb = np.repeat(picture[..., None], 3, axis=-1)
    if mask is not None and mask.any():
        area = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(shape, Image.Resampling.NEAREST)) > 0
        outline = area & ~ndimage.binary_erosion(area, iterations=2)
        colour = np.array(OVERLAY_RGB, dtype=np.float32)
        rgb[area] = (1 - OVERLAY_ALPHA) * rgb[area] + OVERLAY_ALPHA * colour
        rgb[outline] = colour
    buffer = io.BytesIO()
    Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


class SliceSource(Protocol):
    """Where the gallery gets a slice's HU values and its abscess mask."""

    def slice_hu(self, study_uid: str, sop_instance_uid: str) -> np.ndarray:
        """[rows, columns] HU of the slice. Raises LookupError when the study has no such slice."""

    def mask(self, study_uid: str, sop_instance_uid: str) -> np.ndarray | None:
        """The slice's abscess mask from the node's SEG of the study (None without a SEG)."""


class OrthancSlices:
    """Slices and SEG masks from Orthanc (the node's own SEG, found through the job store's outputs).

    Args:
        client: Orthanc's REST API.
        store: the job store (which SEG the node stored for which study).
        cached_segmentations: decoded SEGs kept in memory (a gallery asks several slices of each).
    """

    def __init__(self, client: OrthancClient, store: JobStore, cached_segmentations: int = 8) -> None:
        self.client = client
        self.store = store
        self.cached_segmentations = cached_segmentations
        self._segmentations: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def slice_hu(self, study_uid: str, sop_instance_uid: str) -> np.ndarray:
        """The slice as Orthanc holds it, in HU (Rescale Slope/Intercept applied)."""
        found = self.client.post_json("/tools/find", {"Level": "Instance", "Query": {
            "StudyInstanceUID": study_uid, "SOPInstanceUID": sop_instance_uid}})
        if not found:
            raise LookupError(f"Orthanc holds no instance {sop_instance_uid} in study {study_uid}")
        dataset = pydicom.dcmread(io.BytesIO(self.client.instance_bytes(found[0])))
        slope = float(dataset.get("RescaleSlope", 1) or 1)
        intercept = float(dataset.get("RescaleIntercept", 0) or 0)
        return dataset.pixel_array.astype(np.float32) * slope + intercept

    def mask(self, study_uid: str, sop_instance_uid: str) -> np.ndarray | None:
        """The slice's frame of the node's SEG (segments combined), or None."""
        import highdicom as hd

        for output in self.store.outputs_of_study(study_uid):
            seg_id = ((output.get("objects") or {}).get("seg") or {}).get("orthanc_id")
            if not seg_id:
                continue
            with self._lock:
                segmentation = self._segmentations.pop(seg_id, None)
            if segmentation is None:
                segmentation = hd.seg.segread(io.BytesIO(self.client.instance_bytes(seg_id)))
            with self._lock:
                self._segmentations[seg_id] = segmentation
                while len(self._segmentations) > self.cached_segmentations:
                    self._segmentations.popitem(last=False)
            try:
                return segmentation.get_pixels_by_source_instance(
                    [sop_instance_uid], combine_segments=True, skip_overlap_checks=True)[0] > 0
            except (KeyError, ValueError):  # this SEG does not cover the slice
                continue
        return None


class Gallery:
    """Gallery answers and their thumbnails.

    Args:
        service: the similar-case service (policy, search, pseudonyms, audit).
        slices: where slices and masks come from (Orthanc, through the service's client).
    """

    def __init__(self, service: SimilarCaseService, slices: SliceSource | None = None) -> None:
        self.service = service
        if slices is None:
            if service.client is None:
                raise ValueError("the gallery needs the service's Orthanc client (or a slice source)")
            slices = OrthancSlices(service.client, JobStore(service.config.jobs_database))
        self.slices = slices
        self.references = ThumbnailReferences()
        self._thumbnails: collections.OrderedDict[tuple[str, str], bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def answer(self, study_uid: str, params: Mapping[str, str], user: str) -> tuple[int, Any]:
        """``GET /abscess-node/studies/{id}/gallery``: the ranked cases with their slice pairs.

        Args:
            study_uid: the query study.
            params: those of the REST query (``k``, ``mode``, ``filters`` ...) and ``pairs``
                (slice pairs per case, 1 to 5, default 1).
            user: the HTTP user Orthanc authenticated.

        Returns:
            (HTTP status, JSON body): 200 with ``query``, ``pseudonymized`` and ``cases``
            (rank, score, mode, study, lesions, viewer_url, pairs with thumbnail URLs); the
            statuses of :func:`dicom_node.similar.rest.rest_query` otherwise.
        """
        try:
            pairs = int(params.get("pairs", "1"))
            if not 1 <= pairs <= MAX_PAIRS:
                raise ValueError(pairs)
        except ValueError:
            return 400, {"error": f"pairs must be a whole number from 1 to {MAX_PAIRS}"}
        try:
            request, answer = answer_params(self.service, study_uid, {k: v for k, v in params.items() if k != "pairs"},
                                            user)
            with query_index(self.service.config.index_directory) as index:  # a read: never waits for a writer
                query_slices = index.slice_instance_uids(answer.query.study_uid)
        except Exception as error:  # noqa: BLE001 - every failure becomes an HTTP answer
            return error_answer(error)
        pseudonymized = self.service.config.pseudonymize_similar_cases
        cases = []
        for shown, indexed in zip(answer.cases, answer.indexed_cases):
            entry = {key: value for key, value in shown.as_dict().items() if key != "best_slices"}
            entry["viewer_url"] = None if pseudonymized else viewer_url(indexed.study_uid)
            entry["pairs"] = [
                {"query_slice": pair.query_slice, "matched_slice": pair.matched_slice,
                 "similarity": round(pair.similarity, 6),
                 "query_thumbnail": self._url(user, answer.query.study_uid, query_slices.get(pair.query_slice, "")),
                 "matched_thumbnail": self._url(user, indexed.study_uid, pair.matched_sop_instance_uid)}
                for pair in indexed.best_slices[:pairs]]
            cases.append(entry)
        return 200, {"query": {"study_uid": study_uid, "k": request.k, "mode": answer.query.mode,
                               "filters": list(answer.query.filters), "viewer_url": viewer_url(study_uid)},
                     "pseudonymized": pseudonymized, "cases": cases}

    def _url(self, user: str, study_uid: str, sop_instance_uid: str) -> str | None:
        if not sop_instance_uid:
            return None
        return THUMBNAIL_PATH + self.references.issue(user, study_uid, sop_instance_uid)

    def thumbnail(self, token: str, user: str) -> tuple[int, Any]:
        """``GET /abscess-node/thumbnails/{reference}``: ``{"png": base64}`` of the referenced slice.

        Returns:
            200; 403 when the policy no longer allows the user; 404 for an unknown, expired or
            another user's reference; 502 when Orthanc cannot give the slice.
        """
        caller = Caller("rest", user)
        if not self.service.policy.allows(caller):
            return 403, {"error": self.service.policy.refusal(caller)}
        resolved = self.references.resolve(token, user)
        if resolved is None:
            return 404, {"error": "unknown or expired thumbnail; reload the gallery"}
        with self._lock:
            png = self._thumbnails.get(resolved)
        if png is None:
            try:
                png = render_thumbnail(self.slices.slice_hu(*resolved), self.slices.mask(*resolved))
            except (LookupError, OrthancError) as error:
                log.warning("thumbnail of a slice of study %s: %s", resolved[0], error)
                return 502, {"error": "the slice could not be read from Orthanc; see the similar-cases service log"}
            with self._lock:
                self._thumbnails[resolved] = png
                while len(self._thumbnails) > MAX_CACHED_THUMBNAILS:
                    self._thumbnails.popitem(last=False)
        return 200, {"png": base64.b64encode(png).decode()}
