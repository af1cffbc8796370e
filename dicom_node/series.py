"""Series selection and CT volume loading.

* :func:`select_series` ranks the series of a study against the configured
  :class:`~dicom_node.config.SeriesRules` and says why every other series was skipped.
* :func:`read_geometry` reads the headers of one series (no pixel data), checks that they form one
  axial stack, sorts slices along the slice normal, resolves duplicate positions and reports
  uneven spacing and gantry tilt.
* :func:`read_hu` then decodes any slice range to Hounsfield units (JPEG 2000, JPEG-LS and JPEG
  lossless through pylibjpeg), so long series are processed in bounded chunks.

Errors a user can act on are raised as :class:`InputError` with the series/instance UID and tag.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.config import SeriesRules


class InputError(ValueError):
    """The study or series cannot be processed; the message says what and what to do."""


@dataclasses.dataclass(frozen=True)
class SeriesCandidate:
    """What is known of a series before its instances are downloaded."""

    series_uid: str
    modality: str
    description: str
    instance_count: int
    image_orientation: tuple[float, ...] | None = None
    slice_thickness: float | None = None
    orthanc_id: str = ""


def select_series(candidates: Sequence[SeriesCandidate], rules: SeriesRules) -> tuple[list[SeriesCandidate], dict[str, str]]:
    """Rank the series that may be segmented.

    Returns:
        ``(eligible, skipped)``: eligible series best first; ``skipped`` maps every other
        SeriesInstanceUID to the reason it was not chosen.
    """
    eligible, skipped = [], {}
    for series in candidates:
        reason = _ineligibility(series, rules)
        if reason:
            skipped[series.series_uid] = reason
        else:
            eligible.append(series)
    if rules.prefer == "thinnest":
        eligible.sort(key=lambda s: (s.slice_thickness or math.inf, -s.instance_count))
    else:
        eligible.sort(key=lambda s: (-s.instance_count, s.slice_thickness or math.inf))
    for series in eligible[1:]:
        skipped[series.series_uid] = f"eligible, but {eligible[0].series_uid} ranks first ({rules.prefer})"
    return eligible, skipped


def _ineligibility(series: SeriesCandidate, rules: SeriesRules) -> str:
    if series.modality.upper() not in rules.modalities:
        return f"modality {series.modality or '(none)'} is not in SeriesRules.Modalities {list(rules.modalities)}"
    lowered = series.description.lower()
    for word in rules.exclude_descriptions:
        if word.lower() in lowered:
            return f"SeriesDescription contains {word!r} (SeriesRules.ExcludeDescriptions)"
    if series.instance_count < rules.min_slices:
        return f"{series.instance_count} instance(s), fewer than SeriesRules.MinSlices={rules.min_slices}"
    if rules.require_axial:
        if series.image_orientation is None or len(series.image_orientation) != 6:
            return "no usable ImageOrientationPatient (0020,0037); cannot tell whether it is axial"
        tilt = _normal_tilt_degrees(series.image_orientation)
        if tilt > rules.axial_tolerance_degrees:
            return f"not axial: slice normal is {tilt:.0f} deg from the patient z axis (tolerance {rules.axial_tolerance_degrees})"
    return ""


def _normal_tilt_degrees(orientation: Sequence[float]) -> float:
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    norm = np.linalg.norm(normal)
    if norm == 0:
        return 90.0
    return math.degrees(math.acos(min(1.0, abs(normal[2]) / norm)))


@dataclasses.dataclass
class SeriesGeometry:
    """One validated, sorted stack of axial slices (headers only).

    Attributes:
        series_uid: SeriesInstanceUID.
        paths: instance files, sorted along the slice normal (index 0 = lowest position).
        headers: their datasets without pixel data, same order.
        positions: distance of each slice along the normal (mm).
        spacing_mm: (dz, dy, dx): median slice step, row spacing, column spacing.
        warnings: uneven spacing, gantry tilt, dropped duplicates, in words.
    """

    series_uid: str
    paths: list[Path]
    headers: list[pydicom.Dataset]
    positions: np.ndarray
    spacing_mm: tuple[float, float, float]
    warnings: list[str]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        return len(self.paths), int(self.headers[0].Rows), int(self.headers[0].Columns)


REQUIRED_TAGS = {
    "ImagePositionPatient": "(0020,0032)",
    "ImageOrientationPatient": "(0020,0037)",
    "PixelSpacing": "(0028,0030)",
    "Rows": "(0028,0010)",
    "Columns": "(0028,0011)",
    "SOPInstanceUID": "(0008,0018)",
}
CONSISTENT_TAGS = ("SeriesInstanceUID", "Rows", "Columns", "FrameOfReferenceUID")


def read_geometry(paths: Sequence[Path | str], max_slices: int | None = None,
                  max_pixels_per_slice: int | None = None) -> SeriesGeometry:
    """Read and check the headers of one series (no pixel data is decoded here).

    Raises:
        InputError: unreadable file, missing geometry tags, mixed series, a single slice, more
            slices than ``max_slices``, images larger than ``max_pixels_per_slice``, multi-frame
            or multi-sample images (checked from the headers, before any pixel is decoded).
    """
    if max_slices is not None and len(paths) > max_slices:
        raise InputError(
            f"series has {len(paths)} instances, more than SeriesRules.MaxSlices={max_slices}; "
            "raise MaxSlices if this node should process it")
    headers = []
    for path in paths:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as error:
            raise InputError(f"instance file {Path(path).name} cannot be read as DICOM ({error}); "
                             "re-send the series") from None
        missing = [f"{tag} {code}" for tag, code in REQUIRED_TAGS.items() if tag not in ds or ds.get(tag) in (None, "")]
        if missing:
            raise InputError(f"instance {ds.get('SOPInstanceUID', '?')} of series {ds.get('SeriesInstanceUID', '?')} "
                             f"lacks {', '.join(missing)}; the volume geometry cannot be built")
        _check_image_size(ds, max_pixels_per_slice)
        headers.append(ds)
    if not headers:
        raise InputError("series has no instances")
    series_uid = str(headers[0].get("SeriesInstanceUID", "?"))
    for tag in CONSISTENT_TAGS:
        values = {str(ds.get(tag, "")) for ds in headers}
        if len(values) > 1:
            raise InputError(f"series {series_uid} mixes several values of {tag} ({len(values)} distinct): "
                             "it is not one image stack; split it at the modality")
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in headers])
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise InputError(f"series {series_uid} mixes slice orientations (ImageOrientationPatient differs): "
                         "it is not one image stack")
    row, column = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)
    xyz = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    distances = xyz @ normal
    order = np.argsort(distances, kind="stable")
    warnings: list[str] = []

    kept: list[int] = []
    for index in order:
        if kept and abs(distances[index] - distances[kept[-1]]) < 1e-3:
            # duplicate position: keep the instance with the highest InstanceNumber (latest reconstruction)
            previous = kept[-1]
            if int(headers[index].get("InstanceNumber", 0) or 0) > int(headers[previous].get("InstanceNumber", 0) or 0):
                kept[-1] = index
            continue
        kept.append(index)
    if len(kept) < len(order):
        warnings.append(f"{len(order) - len(kept)} instance(s) at duplicate positions ignored "
                        "(kept the highest InstanceNumber)")
    if len(kept) < 2:
        raise InputError(f"series {series_uid} has a single slice position; a volume needs at least 2 slices")

    positions = distances[kept]
    steps = np.diff(positions)
    dz = float(np.median(steps))
    if steps.max() - steps.min() > 0.1 * dz + 1e-3:
        warnings.append(f"uneven slice spacing: steps from {steps.min():.2f} to {steps.max():.2f} mm "
                        f"(median {dz:.2f} mm used for measurements)")
    stack_direction = xyz[kept[-1]] - xyz[kept[0]]
    tilt = math.degrees(math.acos(min(1.0, abs(float(stack_direction @ normal)) / float(np.linalg.norm(stack_direction)))))
    if tilt > 0.5:
        warnings.append(f"gantry tilt of {tilt:.1f} deg: slices are sheared; measurements along z are approximate")
    dy, dx = (float(v) for v in headers[kept[0]].PixelSpacing)
    return SeriesGeometry(series_uid=series_uid, paths=[Path(paths[i]) for i in kept], headers=[headers[i] for i in kept],
                          positions=positions, spacing_mm=(dz, dy, dx), warnings=warnings)


def _check_image_size(ds: pydicom.Dataset, max_pixels_per_slice: int | None) -> None:
    """Refuse, from the header alone, what would make decoding allocate more than one bounded slice."""
    where = f"instance {ds.get('SOPInstanceUID', '?')} of series {ds.get('SeriesInstanceUID', '?')}"
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        raise InputError(f"{where} has a malformed Rows, Columns, NumberOfFrames or SamplesPerPixel") from None
    if rows < 1 or columns < 1:
        raise InputError(f"{where} declares an empty image ({rows} x {columns})")
    if max_pixels_per_slice is not None and rows * columns > max_pixels_per_slice:
        raise InputError(f"{where} declares {rows} x {columns} pixels, more than "
                         f"SeriesRules.MaxPixelsPerSlice={max_pixels_per_slice}; not decoded (raise the limit if "
                         "this is a genuine CT)")
    if frames != 1 or samples != 1:
        raise InputError(f"{where} has {frames} frame(s) of {samples} sample(s) per pixel: CT slices are "
                         "single-frame greyscale images; not decoded")


def read_hu(geometry: SeriesGeometry, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Decode slices ``start:stop`` of a series to float32 HU, shape [n, rows, columns].

    Raises:
        InputError: a truncated or undecodable instance (named by SOPInstanceUID).
    """
    stop = len(geometry.paths) if stop is None else stop
    rows, columns = geometry.shape[1:]
    volume = np.empty((stop - start, rows, columns), dtype=np.float32)
    for offset, index in enumerate(range(start, stop)):
        header = geometry.headers[index]
        try:
            ds = pydicom.dcmread(str(geometry.paths[index]))
            pixels = ds.pixel_array
        except Exception as error:  # pydicom raises many types for broken pixel data
            raise InputError(f"pixel data of instance {header.SOPInstanceUID} cannot be decoded "
                             f"({type(error).__name__}: {str(error)[:200]}); the file may be truncated "
                             "or use an unsupported transfer syntax — re-send it") from None
        if pixels.shape != (rows, columns):
            raise InputError(f"instance {header.SOPInstanceUID} has pixel data of shape {pixels.shape}, "
                             f"expected ({rows}, {columns}) (multi-frame or colour images are not CT slices)")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        volume[offset] = pixels.astype(np.float32) * slope + intercept
    return volume
