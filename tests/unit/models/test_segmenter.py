"""Segmenter: checkpoints, probabilities on the input grid, slice and ROI embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import VMUNet
from models.preprocessing import normalise_input, to_model_grid, to_source_grid, window_hu
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


def _disk(shape: tuple[int, int], spacing: tuple[float, float], centre_mm: tuple[float, float], radius_mm: float) -> np.ndarray:
    """A disk drawn in millimetres on a grid of ``spacing`` (origin at the grid's centre)."""
    rows = (np.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0]
    columns = (np.arange(shape[1]) - (shape[1] - 1) / 2) * spacing[1]
    yy, xx = np.meshgrid(rows, columns, indexing="ij")
    return (yy - centre_mm[0]) ** 2 + (xx - centre_mm[1]) ** 2 <= radius_mm**2


@pytest.mark.parametrize("shape, spacing", [
    ((300, 180), (0.6, 1.1)),   # non-square matrix, unequal row/column spacing
    ((96, 160), (1.8, 1.2)),    # coarser than the network: upsampled
    ((512, 512), (0.45, 0.45)), # fine square grid: shrunk with anti-aliasing
])
def test_geometry_keeps_millimetres_and_maps_back_pixel_exact(shape, spacing) -> None:
    centre, radius, input_size, input_spacing = (12.0, -20.0), 15.0, 128, 1.5
    source = _disk(shape, spacing, centre, radius)
    on_model = to_model_grid(torch.from_numpy(source.astype(np.float32))[None, None], spacing, input_size, input_spacing)
    expected = _disk((input_size, input_size), (input_spacing, input_spacing), centre, radius)
    # on the network grid the disk is a disk of the same size in mm: not stretched into an ellipse
    assert ((on_model[0, 0] > 0.5).numpy() == expected).mean() > 0.995
    drawn = np.argwhere(on_model[0, 0].numpy() > 0.5)
    extent_mm = (drawn.max(0) - drawn.min(0) + 1) * input_spacing
    assert abs(extent_mm[0] - extent_mm[1]) <= 2 * input_spacing
    # a mask made on the network grid comes back onto the source pixels where the anatomy is
    back = to_source_grid(torch.from_numpy(expected.astype(np.float32))[None, None], shape, spacing, input_spacing)
    back_mask = back[0, 0].numpy() > 0.5
    assert back_mask.shape == shape
    disagree = back_mask != source
    boundary = source ^ np.asarray(torch.nn.functional.max_pool2d(
        torch.from_numpy(source.astype(np.float32))[None, None], 3, 1, 1)[0, 0] > 0)
    assert disagree.sum() <= 0.02 * source.sum() + boundary.sum()
    assert np.abs(np.argwhere(back_mask).mean(0) - np.argwhere(source).mean(0)).max() < 0.5


def test_pixels_outside_the_field_of_view_pad_with_air_and_come_back_empty() -> None:
    slices = np.full((1, 400, 100), -1000.0, np.float32)
    slices[0, 150:250, 30:70] = 40.0
    images = window_hu(slices, "multi_window")
    on_model = to_model_grid(images, (1.0, 1.0), 64, 2.0)  # 128 mm field of view, 400 mm long slice
    assert on_model.shape == (1, 3, 64, 64)
    assert float(on_model[0, :, :, :5].max()) == 0.0  # padded left and right: air in every window
    back = to_source_grid(torch.ones(1, 1, 64, 64), (400, 100), (1.0, 1.0), 2.0)[0, 0]
    assert float(back[:100].max()) == 0.0 and float(back[200, 50]) == 1.0  # cropped rows get no mask
    normalised = normalise_input(on_model, "reference")
    assert float(normalised.min()) == 0.0 and float(normalised.max()) == pytest.approx(255.0)


def test_segmenter_maps_probabilities_back_with_the_series_spacing(tiny_model) -> None:
    segmenter = Segmenter.from_model(tiny_model(final_bias=20.0), make_meta(
        "t", "0", demo=True, input_size=INPUT_SIZE, input_spacing_mm=4.0))
    slices = np.full((2, 120, 300), -1000.0, np.float32)
    out = segmenter.run(slices, pixel_spacing_mm=(0.5, 1.0))  # 60 x 300 mm; the network sees 256 mm
    assert out.probabilities.shape == (2, 120, 300)
    columns_seen = out.probabilities[0, 60] > 0.5
    assert columns_seen[150] and not columns_seen[0] and not columns_seen[-1]
    assert abs(int(columns_seen.sum()) - 256) <= 2  # exactly the field of view, in source columns
