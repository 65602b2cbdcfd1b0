"""Pairs: g and its recorded inverse, IR never jittered, the strength knob, the Ray Data stage."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from pipeline import pairs
from pipeline.pairs import PairConfig, PairMaker, make_pairs, pair_dataset, undo, warp
from pipeline.prepare.potsdam import prepare_potsdam
from pipeline.prepare.run import TilingOptions
from tests.conftest import make_release

NO_COLOUR = {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def smooth_images(n: int, bands: int = 4, size: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, bands, size // 8, size // 8, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("device", DEVICES)
def test_undo_flip_is_exact(device):
    x = torch.rand(16, 4, 40, 48, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    out = make_pairs(x, PairConfig(**NO_COLOUR), gen)
    flipped = out["theta"][:, 0, 0] < 0
    assert 0 < int(flipped.sum()) < 16  # both cases drawn
    assert torch.equal(out["gx"][flipped], x[flipped].flip(-1))
    back, mask = undo(out["gx"], out["inverse"])
    assert mask.all()
    assert torch.allclose(back, x, atol=1e-5)


@pytest.mark.parametrize("shift", [0.0, 0.15])
@pytest.mark.parametrize("device", ["cpu-grid_sample"] + DEVICES)
def test_undo_affine_recovers_x_inside_the_mask(device, shift, monkeypatch):
    if device == "cpu-grid_sample":  # the GPU path's kernel, on CPU
        monkeypatch.setattr(pairs, "_cv2", None)
        device = "cpu"
    x = smooth_images(12).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    out = make_pairs(x, PairConfig(affine=True, shift=shift, **NO_COLOUR), gen)
    offsets = out["theta"][:, :, 2].abs()
    assert (offsets.max() > 0.05) if shift else (offsets.max() == 0)
    assert offsets.max() <= shift
    assert not torch.allclose(out["gx"], x, atol=0.05)  # g moved things
    back, mask = undo(out["gx"], out["inverse"])
    assert torch.equal(mask, out["mask"])
    err = (back - x).abs().amax(1)[mask]
    assert 0.5 < mask.float().mean().item() < 1.0
    assert err.max().item() < 0.08  # two bilinear passes on a smooth image
    assert err.mean().item() < 0.01
    # Outside the mask there is no promise; inside, g* really is g's inverse:
    eye = out["theta"][:, :, :2] @ out["inverse"][:, :, :2]
    assert torch.allclose(eye, torch.eye(2, device=device).expand_as(eye), atol=1e-5)


@pytest.mark.parametrize("bands", [1, 3, 4, 5])
def test_opencv_warp_on_cpu_matches_grid_sample(bands):
    assert pairs._cv2 is not None  # a dependency: the CPU pair stage must not silently slow down
    x = torch.rand(6, bands, 40, 48)
    gen = torch.Generator().manual_seed(2)
    theta = pairs.spatial_matrices(6, PairConfig(affine=True, shift=0.2), gen, "cpu")
    fast = warp(x, theta)
    u, v = pairs._coords(theta, 40, 48)
    grid = torch.stack([u, v], dim=-1)
    reference = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    assert fast.shape == reference.shape and fast.is_contiguous()
    assert (fast - reference).abs().max().item() < 1e-4  # borders (zero padding) included
    # Anything that needs a gradient (g* on predictions) stays on grid_sample:
    x.requires_grad_(True)
    warp(x, theta).sum().backward()
    assert x.grad is not None


@pytest.mark.skipif(sys.platform != "linux", reason="a glibc setting")
def test_pair_actors_keep_freed_memory_for_reuse():
    import ctypes

    if not hasattr(ctypes.CDLL("libc.so.6"), "mallopt"):
        pytest.skip("not glibc")
    assert pairs.keep_freed_memory()


def test_infrared_is_never_jittered_but_rgb_is():
    x = torch.rand(8, 4, 32, 32)
    out = make_pairs(x, PairConfig(flip=False), torch.Generator().manual_seed(2))
    assert torch.equal(out["gx"][:, 3], x[:, 3])
    assert (out["gx"][:, :3] - x[:, :3]).abs().mean() > 0.02
    assert out["gx"].min() >= 0 and out["gx"].max() <= 1
    irrg = make_pairs(
        x[:, :3], PairConfig(flip=False, rgb_bands=()), torch.Generator().manual_seed(2)
    )
    assert torch.equal(irrg["gx"], x[:, :3])  # no RGB triplet: no colour jitter


def test_strength_scales_the_jitter_and_zero_leaves_only_flips():
    x = smooth_images(32, bands=3, seed=3)
    changes = []
    for strength in (0.0, 0.5, 1.0, 2.0):
        cfg = PairConfig(flip=False, strength=strength, scale=0.2)
        out = make_pairs(x, cfg, torch.Generator().manual_seed(4))
        changes.append((out["gx"] - x).abs().mean().item())
    assert changes[0] == 0.0
    assert changes[1] < changes[2] < changes[3]
    with pytest.raises(ValueError, match="strength must be >= 0"):
        PairConfig(strength=-1)


def test_noise_is_gaussian_on_the_second_view_only_and_scales_with_strength():
    x = smooth_images(8, bands=4, seed=6)
    spreads = []
    for strength in (0.0, 1.0, 2.0):
        cfg = PairConfig(flip=False, strength=strength, noise=0.1, **NO_COLOUR)
        out = make_pairs(x, cfg, torch.Generator().manual_seed(7))
        assert out["x"] is x
        diff = out["gx"] - x
        assert abs(diff.mean().item()) < 0.01
        spreads.append(diff.std().item())
    assert spreads[0] == 0.0
    assert spreads[1] == pytest.approx(0.1, rel=0.05)
    assert spreads[2] == pytest.approx(0.2, rel=0.05)
    with pytest.raises(ValueError, match="pairs.shift and pairs.noise must be >= 0"):
        PairConfig(noise=-0.1)


def test_hue_rotation_keeps_greys_grey_and_pure_brightness_scales():
    grey = torch.full((4, 3, 8, 8), 0.5)
    hue_only = PairConfig(flip=False, brightness=0, contrast=0, saturation=0, hue=0.5)
    out = make_pairs(grey, hue_only, torch.Generator().manual_seed(5))
    assert torch.allclose(out["gx"], grey, atol=1e-5)


def test_unknown_pair_option_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown pairs option\(s\) \['jitter'\]"):
        PairConfig.from_dict({"jitter": 0.3})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    make_release(
        root / "src",
        {"1_1": (96, 96), "1_2": (96, 64)},
        bands=4,
        variant="RGBIR",
        folder="4_Ortho_RGBIR",
    )
    opts = TilingOptions(tile=32, stride=32, progress=False, test_fraction=0.0)
    manifest = prepare_potsdam(root / "src", root / "out", opts, variant="rgbir")
    return root / "out", manifest


def test_pair_maker_keeps_image_and_label_crops_aligned(shards):
    out, _ = shards
    table = pq.read_table(next((out / "train").glob("*.parquet")))
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    # Make band 0 equal to the label so that alignment is visible after the crop.
    images = [np.frombuffer(b, np.uint8).reshape(4, 32, 32).copy() for b in batch["image"]]
    for img, lab in zip(images, batch["label"], strict=True):
        img[0] = np.frombuffer(lab, np.uint8).reshape(32, 32)
    batch["image"] = np.array([i.tobytes() for i in images], dtype=object)
    maker = PairMaker({"crop": 20, "flip": False}, seed=0, deterministic=True)
    pairs = maker(batch)
    assert pairs["x"].shape == (len(images), 4, 20, 20) and pairs["x"].dtype == np.float16
    assert pairs["gx"].shape == pairs["x"].shape and pairs["inverse"].shape == (len(images), 2, 3)
    assert pairs["mask"].shape == (len(images), 20, 20) and pairs["label"].dtype == np.uint8
    assert np.array_equal(np.rint(pairs["x"][:, 0] * 255).astype(np.uint8), pairs["label"])


@pytest.mark.slow
def test_ray_data_actor_pool_streams_every_tile_as_a_pair(shards, ray_cluster):
    out, manifest = shards
    cfg = PairConfig(crop=24, affine=True)
    ds = pair_dataset(str(out / "train"), cfg, actors=2, batch_size=4)
    rows, ids = 0, set()
    for batch in ds.iter_batches(batch_size=5, batch_format="numpy"):
        assert batch["x"].shape[1:] == (4, 24, 24)
        assert batch["mask"].dtype == bool and batch["mask"].any()
        gx = torch.from_numpy(batch["gx"]).float()
        back, mask = undo(gx, torch.from_numpy(batch["inverse"]))
        assert torch.equal(mask, torch.from_numpy(batch["mask"]))
        rows += len(batch["x"])
        ids.update(batch["tile_id"].tolist())
    assert rows == manifest["splits"]["train"]["tiles"] == len(ids)
