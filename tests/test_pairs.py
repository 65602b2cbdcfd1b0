"""Pairs: g and its recorded inverse, IR never jittered, the strength knob, the Ray Data stage."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from pipeline import augment
from pipeline.augment import make_pairs, make_pairs_u8, undo, warp
from pipeline.config import ConfigError, PairConfig, build
from pipeline.data.format import decode_batch, from_wire
from pipeline.data.pairs import PairMaker, keep_freed_memory, pair_dataset
from pipeline.prepare.potsdam import prepare_potsdam
from pipeline.prepare.run import TilingOptions
from tests.conftest import make_release, split_files

NO_COLOUR = {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def smooth_images(n: int, bands: int = 4, size: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, bands, size // 8, size // 8, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def as_u8(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).numpy()


def pairs_on(device: str, x: torch.Tensor, cfg: PairConfig, seed: int):
    """(x, g's output) on ``device``; "cpu-uint8" is the actors' 8-bit OpenCV path, whose x is
    the 8-bit image and whose views come back as float here."""
    if device == "cpu-uint8":
        out = make_pairs_u8(as_u8(x), cfg, torch.Generator().manual_seed(seed))
        x = from_wire(torch.from_numpy(out["x"]))
        return x, out | {"gx": from_wire(out["gx"])}
    x = x.to(device)
    return x, make_pairs(x, cfg, torch.Generator(device=device).manual_seed(seed))


@pytest.mark.parametrize("device", ["cpu-uint8"] + DEVICES)
def test_undo_flip_is_exact(device):
    x, out = pairs_on(device, torch.rand(16, 4, 40, 48), PairConfig(**NO_COLOUR), 0)
    flipped = out["theta"][:, 0, 0] < 0
    assert 0 < int(flipped.sum()) < 16  # both cases drawn
    assert torch.equal(out["gx"][flipped], x[flipped].flip(-1))
    back, mask = undo(out["gx"], out["inverse"])
    assert mask.all()
    assert torch.allclose(back, x, atol=1e-5)


@pytest.mark.parametrize("shift", [0.0, 0.15])
@pytest.mark.parametrize("device", ["cpu-grid_sample", "cpu-uint8"] + DEVICES)
def test_undo_affine_recovers_x_inside_the_mask(device, shift, monkeypatch):
    if device == "cpu-grid_sample":  # the GPU path's kernel, on CPU
        monkeypatch.setattr(augment, "_cv2", None)
        device = "cpu"
    cfg = PairConfig(affine=True, shift=shift, **NO_COLOUR)
    x, out = pairs_on(device, smooth_images(12), cfg, 1)
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
    assert torch.allclose(eye, torch.eye(2, device=x.device).expand_as(eye), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_valid_mask_is_where_both_frames_hold_the_pixel_with_a_margin(device):
    cfgs = [
        PairConfig(affine=True, shift=0.2),
        PairConfig(affine=True, rotation=0, shear=0, scale=0, shift=0.2),  # translations only
        PairConfig(affine=True, rotation=90, shear=0, scale=0),  # some rows parallel to an axis
        PairConfig(affine=False),  # flips: every pixel
    ]
    gen = torch.Generator(device=device).manual_seed(5)
    for cfg in cfgs:
        theta = augment.spatial_matrices(40, cfg, gen, device)
        theta[0] = torch.tensor([[0.0, 1.0, 0.3], [1.0, 0.0, 0.0]])  # a == 0 on both axes
        # Reference: every pixel's source coordinates, evaluated directly.
        h, w, m = 30, 44, 1.5
        u, v = augment._coords(augment.invert(theta), h, w)
        x0, y0 = augment._coords(torch.eye(2, 3, device=device)[None], h, w)
        lu, lv = 1 - 2 * m / w, 1 - 2 * m / h
        ref = (u.abs() <= lu) & (v.abs() <= lv) & (x0.abs() <= lu) & (y0.abs() <= lv)
        ref |= augment._pure_flips(theta).view(-1, 1, 1)
        got = augment.valid_mask(theta, h, w, m)
        assert got.shape == ref.shape and (got != ref).sum().item() == 0
        assert 0 < got[1:].float().mean().item() <= 1


@pytest.mark.parametrize("bands", [3, 4])
@pytest.mark.parametrize("spatial", ["affine", "flips"])
@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_actors_8bit_path_draws_and_applies_the_same_g_as_make_pairs(bands, spatial, noise):
    raw = as_u8(smooth_images(10, bands=bands, size=64, seed=4))
    cfg = PairConfig(affine=spatial == "affine", shift=0.1, noise=noise, rgb_bands=(0, 1, 2))
    fast = make_pairs_u8(raw, cfg, torch.Generator().manual_seed(7))
    ref = make_pairs(torch.from_numpy(raw).float() / 255, cfg, torch.Generator().manual_seed(7))
    for key in ("theta", "inverse", "mask"):  # the same draws, in the same order
        assert torch.equal(fast[key], ref[key]), key
    assert fast["gx"].dtype == (torch.float32 if noise else torch.uint8)
    diff = (from_wire(fast["gx"]) - ref["gx"]).abs()
    # jitter in OpenCV's 8-bit arithmetic (and, with the affine, the warp too): about 1/255
    bound = (1.5 if spatial == "affine" else 1.0) / 255 + 1e-6
    assert diff.amax(1)[ref["mask"]].max().item() <= bound
    assert diff.mean().item() < 0.4 / 255
    assert (ref["gx"] - ref["x"]).abs().mean().item() > 10 / 255  # g really changed colours


@pytest.mark.parametrize("path", ["float", "uint8"])
def test_augment_first_draws_the_first_view_too_and_leaves_g_as_it_was(path):
    raw = as_u8(smooth_images(10, bands=3, size=32, seed=8))
    x = torch.from_numpy(raw).float() / 255
    plain = PairConfig(affine=True, shift=0.1, noise=0.05)
    both = PairConfig(affine=True, shift=0.1, noise=0.05, augment_first=True)
    ref = make_pairs(x, plain, torch.Generator().manual_seed(3))
    if path == "uint8":
        out = make_pairs_u8(raw, both, torch.Generator().manual_seed(3))
        out = out | {"x": from_wire(out["x"]), "gx": from_wire(out["gx"])}
    else:
        out = make_pairs(x, both, torch.Generator().manual_seed(3))
    # g is drawn first, so the second view and what undoes it are the plain config's
    for key in ("theta", "inverse", "mask"):
        assert torch.equal(out[key], ref[key]), key
    assert (out["gx"] - ref["gx"]).abs().max().item() <= 1.5 / 255 + 1e-6
    # the first view is a fresh draw: neither the clean image nor the second view
    assert (out["x"] - x).abs().mean().item() > 10 / 255
    assert (out["x"] - out["gx"]).abs().mean().item() > 10 / 255
    assert out["x"].shape == x.shape


def test_actors_8bit_path_refuses_what_it_cannot_do():
    cfg = PairConfig()
    with pytest.raises(ValueError, match="uint8 images of <= 4 bands"):
        make_pairs_u8(np.zeros((1, 5, 8, 8), np.uint8), cfg, torch.Generator())
    with pytest.raises(ValueError, match="got uint16"):
        make_pairs_u8(np.zeros((1, 3, 8, 8), np.uint16), cfg, torch.Generator())


def test_stroke_jitter_thickens_or_thins_each_view_and_the_actors_draw_it_in_torch():
    # A one-pixel line of 12 px on a dark ground: its full 3x3 dilation holds 3 x 14 px of ink
    # (3.5x), its full erosion none.
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 8, 2:14] = 1.0
    off = {"rgb_bands": (), "flip": False, "strength": 1.0}
    cfg = PairConfig(stroke=1.0, **off)
    t = augment._uniform(64, -1.0, 1.0, torch.Generator().manual_seed(4), "cpu")
    gx = augment.stroke_jitter(x, cfg, torch.Generator().manual_seed(4))
    ink = gx.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    # Thicker by t where t > 0, thinner by |t| where t < 0.
    torch.testing.assert_close(ink, 1 + 2.5 * t.clamp(min=0) - (-t).clamp(min=0))
    assert (t > 0.5).any() and (t < -0.5).any()
    assert gx.min() >= 0 and gx.max() <= 1  # a blend of the image and its min/max filters
    # Both views of a pair draw their own width (augment_first); 0 draws nothing at all.
    pair = make_pairs(x, PairConfig(stroke=1.0, augment_first=True, **off), torch.Generator())
    assert not torch.equal(pair["x"].sum((1, 2, 3)), pair["gx"].sum((1, 2, 3)))
    plain = PairConfig(**off)
    assert augment.stroke_jitter(x, plain, torch.Generator()) is x
    # OpenCV's 8-bit path has no stroke jitter: it refuses, and the actors (which ask
    # fits_u8_path) take make_pairs.
    with pytest.raises(ValueError, match="pairs.stroke 0, got uint8 with 1 bands and stroke 1.0"):
        make_pairs_u8(as_u8(x), cfg, torch.Generator())
    assert not augment.fits_u8_path(as_u8(x), cfg) and augment.fits_u8_path(as_u8(x), plain)


@pytest.mark.parametrize("bands", [1, 3, 4, 5])
def test_opencv_warp_on_cpu_matches_grid_sample(bands):
    assert augment._cv2 is not None  # a dependency: the CPU pair stage must not silently slow down
    x = torch.rand(6, bands, 40, 48)
    gen = torch.Generator().manual_seed(2)
    theta = augment.spatial_matrices(6, PairConfig(affine=True, shift=0.2), gen, "cpu")
    fast = warp(x, theta)
    u, v = augment._coords(theta, 40, 48)
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
    assert keep_freed_memory()


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


def common_line_fit(x: torch.Tensor, gx: torch.Tensor) -> tuple[float, float]:
    """Fit gx = a x + b over the pixels of every band given (one image's, (k, H, W)) that no
    clamp touched; returns (a, the largest residual)."""
    keep = (gx > 0) & (gx < 1)
    xs, ys = x[keep].double(), gx[keep].double()
    design = torch.stack([xs, torch.ones_like(xs)], 1)
    coef = torch.linalg.lstsq(design, ys.unsqueeze(1)).solution[:, 0]
    return coef[0].item(), (design @ coef - ys).abs().max().item()


@pytest.mark.parametrize("path", ["float", "uint8"])
def test_a_band_subset_gets_a_common_brightness_and_contrast_and_no_hue(path):
    # R and G of IR-R-G imagery: hue and saturation ranges set, but no colour triple named
    cfg = PairConfig(flip=False, rgb_bands=(1, 2), hue=0.5, saturation=0.9)
    x = 0.3 + 0.3 * smooth_images(16, bands=3, size=32, seed=11)  # few pixels clamped
    if path == "uint8":
        x = from_wire(torch.from_numpy(as_u8(x)))
        out = make_pairs_u8(as_u8(x), cfg, torch.Generator().manual_seed(1))
        gx, tol = from_wire(out["gx"]), 1 / 255  # the fit of 8-bit rounded values
    else:
        gx, tol = make_pairs(x, cfg, torch.Generator().manual_seed(1))["gx"], 1e-5
    assert torch.equal(gx[:, 0], x[:, 0])  # not named: untouched, bit for bit
    slopes = []
    for i in range(len(x)):
        # both named bands on one line: one brightness-contrast map, no mixing between bands
        a, residual = common_line_fit(x[i, 1:], gx[i, 1:])
        assert residual <= tol, (i, residual)
        slopes.append(a)
    assert max(abs(a - 1) for a in slopes) > 0.2  # and the jitter did change them
    assert (gx[:, 1:] - x[:, 1:]).abs().mean().item() > 0.02


@pytest.mark.parametrize(
    "bands, rgb_bands", [(3, (1, 2)), (3, (0,)), (4, (3,)), (4, (2, 0, 3)), (4, (0, 1, 2, 3))]
)
def test_actors_8bit_path_jitters_any_band_subset_as_make_pairs(bands, rgb_bands):
    raw = as_u8(smooth_images(8, bands=bands, size=32, seed=12))
    cfg = PairConfig(rgb_bands=rgb_bands, affine=True)
    fast = make_pairs_u8(raw, cfg, torch.Generator().manual_seed(2))
    ref = make_pairs(from_wire(torch.from_numpy(raw)), cfg, torch.Generator().manual_seed(2))
    for key in ("theta", "inverse", "mask"):
        assert torch.equal(fast[key], ref[key]), key
    diff = (from_wire(fast["gx"]) - ref["gx"]).abs()
    assert diff.amax(1)[ref["mask"]].max().item() <= 1.5 / 255 + 1e-6
    # bands not named only moved: as the same warp of x without any jitter
    plain = make_pairs(
        from_wire(torch.from_numpy(raw)),
        PairConfig(affine=True, **NO_COLOUR),
        torch.Generator().manual_seed(2),
    )
    others = [b for b in range(bands) if b not in rgb_bands]
    assert torch.equal(plain["theta"], ref["theta"])
    assert torch.equal(ref["gx"][:, others], plain["gx"][:, others])
    named = list(rgb_bands)
    assert (ref["gx"][:, named] - plain["gx"][:, named]).abs().mean().item() > 0.01


@pytest.mark.parametrize(
    "rgb_bands, match",
    [
        ([1, 1], r"pairs.rgb_bands names band 1 twice, got \(1, 1\)"),
        ([0, 2, 0], r"pairs.rgb_bands names band 0 twice"),
        ([0, -1], r"pairs.rgb_bands must be band indices >= 0, got -1"),
    ],
)
def test_bad_rgb_bands_are_one_clear_line(rgb_bands, match):
    with pytest.raises(ConfigError, match=r"^pairs: " + match) as err:
        build(PairConfig, {"rgb_bands": rgb_bands}, "pairs.")
    assert "\n" not in str(err.value)
    # any non-empty subset, in any order, of up to any number of bands is a config
    for ok in ([1, 2], [3], [2, 0, 1], [0, 1, 2, 3], []):
        assert build(PairConfig, {"rgb_bands": ok}, "pairs.").rgb_bands == tuple(ok)
    assert build(PairConfig, {"dihedral": True}, "pairs.").dihedral


@pytest.mark.parametrize("path", ["float", "uint8"])
def test_rgb_bands_past_the_images_bands_fail_naming_the_key(path):
    cfg = PairConfig(rgb_bands=(1, 3))
    raw = np.zeros((2, 3, 8, 8), np.uint8)
    match = r"^pairs.rgb_bands names band 3, but the images have 3 bands \(0 to 2\)$"
    with pytest.raises(ValueError, match=match):
        if path == "uint8":
            make_pairs_u8(raw, cfg, torch.Generator())
        else:
            make_pairs(torch.zeros(2, 3, 8, 8), cfg, torch.Generator())


def test_unknown_pair_option_is_a_clear_error():
    # The pair actors rebuild their PairConfig from a plain dict this way.
    with pytest.raises(ConfigError, match=r"pairs\.jitter: unknown key \(known: .*affine"):
        build(PairConfig, {"jitter": 0.3}, "pairs.")


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
    assert pairs["x"].shape == (len(images), 4, 20, 20) and pairs["x"].dtype == np.uint8
    assert pairs["gx"].shape == pairs["x"].shape and pairs["inverse"].shape == (len(images), 2, 3)
    assert pairs["mask"].shape == (len(images), 20, 20) and pairs["label"].dtype == np.uint8
    assert np.array_equal(pairs["x"][:, 0], pairs["label"])


def test_pair_maker_sends_compact_views_that_decode_to_what_make_pairs_drew(shards):
    out, _ = shards
    table = pq.read_table(next((out / "train").glob("*.parquet")))
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    images = torch.from_numpy(decode_batch(batch)[0])
    for noise, gx_dtype in ((0.0, np.uint8), (0.1, np.float16)):
        cfg = {"affine": True, "noise": noise}
        sent = PairMaker(cfg, seed=3, deterministic=True)(batch)
        # The same draws in process, in float32: what the actor had before packing.
        drawn = make_pairs(images, PairConfig(**cfg), PairMaker(cfg, 3, True).gen)
        assert sent["gx"].dtype == gx_dtype
        assert torch.equal(from_wire(torch.from_numpy(sent["x"])), images)
        gx = from_wire(torch.from_numpy(sent["gx"]))
        tol = 1.5 / 255 if gx_dtype == np.uint8 else 1.5 / 255 + 1e-3  # 8-bit kernels
        assert (gx - drawn["gx"]).abs().max() <= tol
    assert from_wire(torch.tensor([0, 65535], dtype=torch.uint16)).tolist() == [0.0, 1.0]
    # With augment_first the first view is drawn too and travels as the second does.
    cfg = {"affine": True, "noise": 0.1, "augment_first": True}
    sent = PairMaker(cfg, seed=3, deterministic=True)(batch)
    drawn = make_pairs(images, PairConfig(**cfg), PairMaker(cfg, 3, True).gen)
    assert sent["x"].dtype == np.float16
    assert (from_wire(torch.from_numpy(sent["x"])) - drawn["x"]).abs().max() <= 1.5 / 255 + 1e-3
    assert (from_wire(torch.from_numpy(sent["x"])) - images).abs().mean() > 10 / 255


@pytest.mark.slow
def test_ray_data_actor_pool_streams_every_tile_as_a_pair(shards, ray_cluster):
    out, manifest = shards
    cfg = PairConfig(crop=24, affine=True)
    ds = pair_dataset(split_files(out, "train"), cfg, actors=2, batch_size=4)
    rows, ids = 0, set()
    for batch in ds.iter_batches(batch_size=5, batch_format="numpy"):
        assert batch["x"].shape[1:] == (4, 24, 24)
        assert batch["mask"].dtype == bool and batch["mask"].any()
        gx = from_wire(torch.from_numpy(batch["gx"]))
        back, mask = undo(gx, torch.from_numpy(batch["inverse"]))
        assert torch.equal(mask, torch.from_numpy(batch["mask"]))
        rows += len(batch["x"])
        ids.update(batch["tile_id"].tolist())
    assert rows == manifest["splits"]["train"]["tiles"] == len(ids)
