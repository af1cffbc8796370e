"""What `pip install .` ships: the four product packages and the runtime requirements only."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[3]
TRAINING_ONLY = {"matplotlib", "thop", "nibabel", "tqdm"}


def test_the_wheel_holds_the_product_and_no_tooling(tmp_path):
    source = tmp_path / "source"  # a copy: the build leaves build/ and *.egg-info where it runs
    shutil.copytree(CHECKOUT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "runtime", "viewer", "build", "*.egg-info", "__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert packages == {"orthanc_plugin", "dicom_node", "index", "models"}
    assert not [name for name in names if "tooling" in name or name.startswith("tests/")]
    assert "models/weights/vmunet-demo-v3.pt" in names  # the default WeightsPath
    assert {"dicom_node/ui/static/index.html", "dicom_node/ui/static/similar.html"} <= set(names)  # the pages
    requirements = re.findall(r"^Requires-Dist: (.+)$", metadata, re.MULTILINE)
    runtime = {re.split(r"[ ;=<>\[]", line)[0].lower() for line in requirements if "extra ==" not in line}
    assert runtime and not runtime & TRAINING_ONLY, runtime
    training = {re.split(r"[ ;=<>\[]", line)[0].lower() for line in requirements if 'extra == "train"' in line}
    assert TRAINING_ONLY - {"nibabel"} <= training
