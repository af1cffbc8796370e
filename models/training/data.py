"""Reader for datasets in the AbscessHeNe layout, and the training dataset with its augmentations.

Layout (as distributed by the AbscessHeNe authors, and as written by :mod:`tooling.phantoms`)::

    ROOT/train_images/*.png   ROOT/train_masks/*.png
    ROOT/test_images/*.png    ROOT/test_masks/*.png
    ROOT/abscesshene_train.csv  ROOT/abscesshene_test.csv   (optional per-slice metadata)
    ROOT/dataset.json                                        (optional dataset description)

Images and masks are paired by file name: the same stem, or the mask stem with a ``_mask``,
``_seg``, ``_label`` or ``_gt`` suffix. Two image encodings are read:

* **8-bit PNG** (grey, RGB or palette; what AbscessHeNe ships): already windowed by the
  provider; the grey level / 255 is fed to all three network channels (no HU available).
* **16-bit PNG** (what :mod:`tooling.phantoms` writes): ``HU = value - hu_offset`` with
  ``hu_offset`` from ``dataset.json`` (``image_encoding.hu_offset``, default 1024); the HU slice
  goes through :func:`models.preprocessing.window_hu` with the checkpoint's window mode, exactly
  as :class:`models.segmenter.Segmenter` does at inference.

Masks of any bit depth are binarised at half their maximum (0/1 and 0/255 both work).
Training samples are brought to the network's square input exactly as at inference
(:func:`models.preprocessing.to_model_grid`: resampled to ``input_spacing_mm`` with the slice's
pixel spacing from the CSV column ``pixel_spacing_mm`` or ``dataset.json``, then padded or
cropped; without a known spacing the longer side fills the input, never stretched) and augmented by random horizontal/vertical flips and rotations (the
paper's recipe, via MONAI transforms).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.transforms import Compose, RandFlipd, RandRotated
from monai.utils import convert_to_tensor
from PIL import Image

from models.preprocessing import to_model_grid, window_hu

__all__ = ["SPLITS", "SliceRecord", "DatasetLayoutError", "read_split", "read_description",
           "load_image", "load_mask", "image_to_channels", "pixel_spacing_mm", "slice_to_model_grid",
           "AbscessSliceDataset"]

SPLITS = ("train", "test")
_MASK_SUFFIXES = ("", "_mask", "_seg", "_label", "_gt")
_IMAGE_EXTENSIONS = (".png",)


class DatasetLayoutError(ValueError):
    """A directory is not in the AbscessHeNe layout (missing folders or unpaired files)."""


@dataclasses.dataclass(frozen=True)
class SliceRecord:
    """One image/mask pair of a split.

    Attributes:
        image_path: the image PNG.
        mask_path: the mask PNG.
        case_id: patient/case identifier (CSV ``case_id``/``patient_id`` column, else the file
            stem up to its last ``_``).
        metadata: the slice's CSV row (empty when there is no CSV or no row).
    """

    image_path: Path
    mask_path: Path
    case_id: str
    metadata: dict[str, str]


def read_description(root: Path | str) -> dict[str, Any]:
    """Return ``ROOT/dataset.json`` as a dict (empty when absent)."""
    path = Path(root) / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_csv(root: Path, split: str) -> dict[str, dict[str, str]]:
    path = root / f"abscesshene_{split}.csv"
    if not path.is_file():
        return {}
    rows = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            key = row.get("image") or row.get("image_name") or row.get("filename") or row.get("file_name")
            if key:
                rows[Path(key).name] = row
    return rows


def read_split(root: Path | str, split: str) -> list[SliceRecord]:
    """List the image/mask pairs of one split, sorted by image file name.

    Args:
        root: dataset root in the AbscessHeNe layout.
        split: ``"train"`` or ``"test"``.

    Returns:
        The records (images and masks paired by stem).

    Raises:
        DatasetLayoutError: missing folder, or an image without a mask.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    image_dir, mask_dir = root / f"{split}_images", root / f"{split}_masks"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DatasetLayoutError(
                f"{root} is not in the AbscessHeNe layout: {folder.name}/ is missing "
                f"(expected train_images/ train_masks/ test_images/ test_masks/)")
    masks_by_stem = {path.stem: path for path in mask_dir.iterdir() if path.suffix.lower() in _IMAGE_EXTENSIONS}
    rows = _read_csv(root, split)
    records = []
    for image_path in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_EXTENSIONS):
        mask_path = next((masks_by_stem[image_path.stem + suffix] for suffix in _MASK_SUFFIXES
                          if image_path.stem + suffix in masks_by_stem), None)
        if mask_path is None:
            raise DatasetLayoutError(f"{image_path} has no mask in {mask_dir} (same file name expected)")
        row = rows.get(image_path.name, {})
        case_id = row.get("case_id") or row.get("patient_id") or image_path.stem.rsplit("_", 1)[0]
        records.append(SliceRecord(image_path, mask_path, case_id, dict(row)))
    if not records:
        raise DatasetLayoutError(f"{image_dir} holds no PNG images")
    return records


def load_image(path: Path | str, hu_offset: float = 1024.0) -> tuple[np.ndarray, str]:
    """Read an image PNG.

    Args:
        path: the PNG file.
        hu_offset: offset of 16-bit HU encodings (``HU = value - hu_offset``).

    Returns:
        ``(values, kind)``: float32 HU and ``"hu"`` for 16-bit PNGs; float32 in [0, 1] and
        ``"windowed"`` for 8-bit PNGs.
    """
    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(image, dtype=np.float32) - float(hu_offset), "hu"
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0, "windowed"


def load_mask(path: Path | str) -> np.ndarray:
    """Read a mask PNG as bool, binarised at half its maximum value."""
    with Image.open(path) as image:
        values = np.asarray(image if image.mode in ("I;16", "I;16B", "I", "L", "1") else image.convert("L"))
    values = values.astype(np.float32)
    peak = float(values.max())
    return values > peak / 2.0 if peak > 0 else np.zeros(values.shape, bool)


def image_to_channels(values: np.ndarray, kind: str, window: str) -> torch.Tensor:
    """Turn a loaded image into the network's three channels ``[3, H, W]`` in [0, 1].

    Args:
        values: output of :func:`load_image`.
        kind: ``"hu"`` or ``"windowed"``.
        window: window mode of :mod:`models.preprocessing` (used for HU images).
    """
    if kind == "hu":
        return window_hu(values[None], window)[0]
    return torch.from_numpy(np.ascontiguousarray(values)).clamp(0.0, 1.0)[None].repeat(3, 1, 1)


def pixel_spacing_mm(root: Path | str, records: Sequence[SliceRecord]) -> float | list[float] | None:
    """In-plane spacing (mm) of the PNG pixels, or None when unknown.

    Read per slice from the CSV column ``pixel_spacing_mm``, falling back to ``dataset.json``'s
    ``pixel_spacing_mm``. Returns one float when all slices share it, a list (one per record)
    when they differ (e.g. phantoms from two host CTs), None when any slice lacks it.
    """
    default = read_description(root).get("pixel_spacing_mm")
    values = []
    for record in records:
        value = record.metadata.get("pixel_spacing_mm") or default
        if not value:
            return None
        values.append(float(value))
    if not values:
        return None
    return values[0] if len(set(values)) == 1 else values


def slice_to_model_grid(values: np.ndarray, kind: str, mask: np.ndarray, spacing_mm: float | None, window: str,
                        input_size: int, input_spacing_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One loaded slice and its mask on the network's input grid: ``[3, S, S]`` and ``[1, S, S]`` (0/1)."""
    pixel_spacing = None if spacing_mm is None else (float(spacing_mm), float(spacing_mm))
    image = to_model_grid(image_to_channels(values, kind, window)[None], pixel_spacing, input_size, input_spacing_mm)[0]
    mask_tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    mask_on_grid = to_model_grid(mask_tensor, pixel_spacing, input_size, input_spacing_mm)[0] > 0.5
    return image, mask_on_grid.float()


class AbscessSliceDataset(torch.utils.data.Dataset):
    """Slices of one split as network-ready tensors.

    Each item is a dict: ``image`` float32 ``[3, S, S]`` in [0, 1], ``mask`` float32
    ``[1, S, S]`` (0/1), ``case_id`` and ``name`` (image file name).

    Args:
        root: dataset root in the AbscessHeNe layout.
        split: ``"train"`` or ``"test"``.
        input_size: side ``S`` of the square network input.
        input_spacing_mm: pixel spacing of the network input.
        window: window mode for HU (16-bit) images.
        augment: apply random flips (horizontal, vertical) and rotations.
        rotation_degrees: rotations are drawn from +-this many degrees.
        case_ids: keep only these cases (e.g. to hold out validation cases); None keeps all.
        cache: keep the resized samples in memory (uint8), decoding each PNG once.
        seed: seed of the augmentation random state (see :meth:`set_epoch`).
    """

    def __init__(self, root: Path | str, split: str, input_size: int = 256, input_spacing_mm: float = 1.0,
                 window: str = "soft_tissue",
                 augment: bool = False, rotation_degrees: float = 180.0,
                 case_ids: Sequence[str] | None = None, cache: bool = True, seed: int = 0) -> None:
        self.root = Path(root)
        self.records = read_split(self.root, split)
        if case_ids is not None:
            wanted = set(case_ids)
            self.records = [record for record in self.records if record.case_id in wanted]
        self.input_size = int(input_size)
        self.input_spacing_mm = float(input_spacing_mm)
        self.window = window
        spacings = pixel_spacing_mm(self.root, self.records)
        self.spacings = spacings if isinstance(spacings, list) else [spacings] * len(self.records)
        self.hu_offset = float(read_description(self.root).get("image_encoding", {}).get("hu_offset", 1024))
        self.cache = cache
        self._cached: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seed = seed
        self.transform = None
        if augment:
            keys = ("image", "mask")
            self.transform = Compose([
                RandFlipd(keys, prob=0.5, spatial_axis=0),
                RandFlipd(keys, prob=0.5, spatial_axis=1),
                RandRotated(keys, range_x=math.radians(rotation_degrees), prob=0.5,
                            mode=("bilinear", "nearest"), padding_mode="zeros"),
            ])
            self.transform.set_random_state(seed=seed)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def case_ids(self) -> list[str]:
        """Distinct case ids, in order of appearance."""
        return list(dict.fromkeys(record.case_id for record in self.records))

    @property
    def image_kind(self) -> str:
        """``"hu"`` (16-bit HU PNGs) or ``"windowed"`` (8-bit PNGs), read from the first image."""
        return load_image(self.records[0].image_path, self.hu_offset)[1]

    def set_epoch(self, epoch: int) -> None:
        """Reseed the augmentations so that epoch ``epoch`` draws the same transforms every run."""
        if self.transform is not None:
            self.transform.set_random_state(seed=(self.seed * 100003 + epoch) % (2**32))

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index in self._cached:
            image_u8, mask_u8 = self._cached[index]
            return image_u8.float() / 255.0, mask_u8.float()
        record = self.records[index]
        values, kind = load_image(record.image_path, self.hu_offset)
        image, mask = slice_to_model_grid(values, kind, load_mask(record.mask_path), self.spacings[index],
                                          self.window, self.input_size, self.input_spacing_mm)
        if self.cache:
            image_u8 = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
            self._cached[index] = (image_u8, mask.to(torch.uint8))
            return image_u8.float() / 255.0, mask
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self._load(index)
        if self.transform is not None:
            sample = self.transform({"image": image, "mask": mask})
            image = convert_to_tensor(sample["image"], track_meta=False).float()
            mask = (convert_to_tensor(sample["mask"], track_meta=False) > 0.5).float()
        record = self.records[index]
        return {"image": image, "mask": mask, "case_id": record.case_id, "name": record.image_path.name}
