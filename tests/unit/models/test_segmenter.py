"""Segmenter: checkpoints, probabilities on the input grid, slice and ROI embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import VMUNet
from models.preprocessing import resize_to_model, resize_to_source, window_hu
from models.segmenter import Segmenter, roi_pool
from models.weights import DEMO_DESCRIPTION, CheckpointError, load_checkpoint, make_meta, save_checkpoint

torch.set_num_threads(1)
INPUT_SIZE = 64


@pytest.fixture
def tiny_model(tiny_vmunet_config):
    """``tiny_model(seed=0, final_bias=0.0)``: the tiny VM-UNet, seeded, with a chosen output bias."""

    def build(seed: int = 0, final_bias: float = 0.0) -> VMUNet:
        torch.manual_seed(seed)
        model = VMUNet(**tiny_vmunet_config)
        with torch.no_grad():
            model.final_conv.bias.fill_(final_bias)
        return model

    return build


def demo_meta(window: str = "soft_tissue") -> dict:
    return make_meta(
        "vmunet-tiny-test",
        "0.0.1",
        demo=True,
        window=window,
        input_size=INPUT_SIZE,
        training={"data": "random init"},
        metrics={"dice": None},
    )


def ct_like_slices(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    slices = rng.normal(40.0, 30.0, size=(count, height, width)).astype(np.float32)
    slices[:, : height // 6] = -1000.0  # air above the neck
    slices[:, height // 2 :, width // 3 : width // 2] = 700.0  # bone
    return slices


def test_checkpoint_round_trip_gives_the_same_outputs(tmp_path: Path, tiny_model) -> None:
    model, meta = tiny_model(), demo_meta("multi_window")
    path = tmp_path / "weights.pt"
    save_checkpoint(path, model, meta)
    loaded = load_checkpoint(path)
    assert loaded.meta == meta
    assert loaded.model.config == model.config
    slices = ct_like_slices(3, 70, 50)
    direct = Segmenter.from_model(model, meta).run(slices)
    reloaded = Segmenter.load(path, device="cpu").run(slices)
    np.testing.assert_array_equal(direct.probabilities, reloaded.probabilities)
    np.testing.assert_array_equal(direct.slice_embeddings, reloaded.slice_embeddings)
    np.testing.assert_array_equal(direct.roi_embeddings, reloaded.roi_embeddings)


def test_meta_and_info_carry_the_demo_description(tmp_path: Path, tiny_model) -> None:
    path = tmp_path / "weights.pt"
    save_checkpoint(path, tiny_model(), demo_meta())
    segmenter = Segmenter.load(path, device="auto")
    info = segmenter.info
    assert info.demo is True
    assert info.description == DEMO_DESCRIPTION
    assert info.name == "vmunet-tiny-test" and info.version == "0.0.1"
    assert info.input_size == INPUT_SIZE and info.window == "soft_tissue"
    assert info.scan_backend in {"numba", "cuda", "torch"}
    assert info.embedding_dim == 32


@pytest.mark.parametrize("height,width", [(48, 80), (97, 61)])
def test_run_shapes_and_ranges_on_non_square_slices(height: int, width: int, tiny_model) -> None:
    segmenter = Segmenter.from_model(tiny_model(), demo_meta())
    out = segmenter.run(ct_like_slices(5, height, width), batch_size=2)
    assert out.probabilities.shape == (5, height, width) and out.probabilities.dtype == np.float32
    assert out.probabilities.min() >= 0.0 and out.probabilities.max() <= 1.0
    assert out.slice_embeddings.shape == (5, 32) and out.slice_embeddings.dtype == np.float32
    assert out.roi_embeddings.shape == (5, 32) and out.roi_embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.slice_embeddings, axis=1), 1.0, atol=1e-5)
    # batching does not change results
    single = segmenter.run(ct_like_slices(5, height, width), batch_size=5)
    np.testing.assert_allclose(single.probabilities, out.probabilities, atol=1e-5)


def test_roi_embeddings_are_zero_exactly_where_no_mask_is_predicted(tiny_model) -> None:
    slices = ct_like_slices(4, 64, 64)
    everywhere = Segmenter.from_model(tiny_model(final_bias=20.0), demo_meta()).run(slices)
    assert (everywhere.probabilities > 0.5).all()
    np.testing.assert_allclose(np.linalg.norm(everywhere.roi_embeddings, axis=1), 1.0, atol=1e-5)
    # the whole slice is the ROI: ROI and slice embeddings coincide
    np.testing.assert_allclose(everywhere.roi_embeddings, everywhere.slice_embeddings, atol=1e-5)

    nowhere = Segmenter.from_model(tiny_model(final_bias=-20.0), demo_meta()).run(slices)
    assert (nowhere.probabilities <= 0.5).all()
    assert not nowhere.roi_embeddings.any()
    np.testing.assert_allclose(np.linalg.norm(nowhere.slice_embeddings, axis=1), 1.0, atol=1e-5)


def test_roi_pool_uses_covered_cells_or_the_most_probable_one() -> None:
    features = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) + 1.0
    probabilities = torch.zeros(2, 32, 32)
    probabilities[0, 8:16, 0:8] = 0.9  # exactly feature cell (1, 0)
    probabilities[1, 30:32, 31] = 0.7  # a few pixels of cell (3, 3): vanishes at feature resolution
    pooled = roi_pool(features, probabilities)
    expected = torch.nn.functional.normalize(torch.stack([features[0, :, 1, 0], features[1, :, 3, 3]]), dim=1)
    torch.testing.assert_close(pooled, expected)
    assert not roi_pool(features, torch.zeros(2, 32, 32)).any()


def test_empty_input_and_bad_input(tiny_model) -> None:
    segmenter = Segmenter.from_model(tiny_model(), demo_meta())
    empty = segmenter.run(np.zeros((0, 40, 30), dtype=np.float32))
    assert empty.probabilities.shape == (0, 40, 30) and empty.roi_embeddings.shape == (0, 32)
    with pytest.raises(ValueError, match=r"\[n, H, W\]"):
        segmenter.run(np.zeros((40, 30), dtype=np.float32))
    bad = np.zeros((1, 40, 30), dtype=np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        segmenter.run(bad)


def test_checkpoint_errors_are_explicit(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Segmenter.load(tmp_path / "missing.pt", device="cpu")
    not_a_checkpoint = tmp_path / "other.pt"
    torch.save({"weights": 1}, not_a_checkpoint)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(not_a_checkpoint)
    with pytest.raises(ValueError, match="window mode"):
        make_meta("x", "1", demo=True, window="lung")
    with pytest.raises(ValueError, match="description"):
        make_meta("x", "1", demo=False)


def test_windowing_and_resizing() -> None:
    slices = np.array([[[-1000.0, -125.0], [50.0, 225.0]]], dtype=np.float32)
    soft = window_hu(slices, "soft_tissue")
    assert soft.shape == (1, 3, 2, 2)
    torch.testing.assert_close(soft[0, 0], torch.tensor([[0.0, 0.0], [0.5, 1.0]]))
    torch.testing.assert_close(soft[0, 0], soft[0, 2])
    multi = window_hu(slices, "multi_window")
    assert multi.min() >= 0.0 and multi.max() <= 1.0
    assert not torch.equal(multi[0, 0], multi[0, 1])  # a different window per channel
    images = torch.rand(2, 3, 37, 53)
    resized = resize_to_model(images, 64)
    assert resized.shape == (2, 3, 64, 64)
    assert resize_to_source(resized, (37, 53)).shape == (2, 3, 37, 53)
