"""g's symmetries of the square (``pairs.dihedral``): all 8 of D4 drawn, moved exactly, undone
exactly, the same on the torch and the 8-bit paths, and composed with the affine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import augment
from pipeline.augment import make_pairs, make_pairs_u8, undo
from pipeline.config import PairConfig
from pipeline.data.format import from_wire
from tests.test_pairs import DEVICES, NO_COLOUR, pairs_on, smooth_images

PURE_D4 = PairConfig(dihedral=True, **NO_COLOUR)


def distinct_image(side: int = 16) -> np.ndarray:
    """(3, side, side) uint8 whose pixels (band 0 alone, for side <= 16) are all different, and
    with no symmetry of the square: every D4 element gives a different image."""
    idx = np.arange(side * side).reshape(side, side)
    return np.stack([idx % 256, idx.T % 256, 255 - idx % 256]).astype(np.uint8)


def candidates(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 images of x (..., H, W) under D4, in ``augment.D4``'s order: element e is e % 4
    counter-clockwise quarter turns (torch.rot90) of x, flipped left-right first when e >= 4."""
    return [torch.rot90(x.flip(-1) if f else x, k, (-2, -1)) for f in (0, 1) for k in range(4)]


def element_of(gx: torch.Tensor, x: torch.Tensor) -> int:
    """Which D4 element turned x (C, H, W) into gx: the only candidate that matches."""
    hits = [e for e, c in enumerate(candidates(x)) if torch.equal(gx, c)]
    assert len(hits) == 1, hits
    return hits[0]


def draw(path: str, raw: np.ndarray, cfg: PairConfig, seed: int) -> tuple[torch.Tensor, dict]:
    """(x, the pair) as floats with the image's integer values (0-255), no rescaling: equality
    checks stay exact. ``path``: a torch device or "cpu-uint8" (the pair actors' OpenCV path)."""
    if path == "cpu-uint8":
        out = make_pairs_u8(raw, cfg, torch.Generator().manual_seed(seed))
        return torch.from_numpy(raw).float(), out | {"gx": out["gx"].float()}
    x = torch.from_numpy(raw).float().to(path)
    return x, make_pairs(x, cfg, torch.Generator(device=path).manual_seed(seed))


def test_all_eight_elements_are_drawn_equally_often():
    n = 8000
    theta = augment.spatial_matrices(n, PURE_D4, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(theta[:, :, 2], torch.zeros(n, 2))  # no shift: around the centre
    a = theta[:, :, :2]
    # signed permutation matrices, integers exactly
    assert torch.equal(a.abs().sum(1), torch.ones(n, 2))
    assert torch.equal(a.abs().sum(2), torch.ones(n, 2))
    assert torch.equal(a.abs().round(), a.abs())
    elements, counts = a.reshape(n, 4).unique(dim=0, return_counts=True)
    assert len(elements) == 8
    sd = math.sqrt(n * (1 / 8) * (7 / 8))
    assert (counts - n / 8).abs().max().item() < 4 * sd, counts.tolist()
    # the flip is drawn with probability 1/2 (determinant -1), each quarter turn 1/4
    flips = torch.linalg.det(a) < 0
    assert abs(flips.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)


@pytest.mark.parametrize("path", ["cpu", "cpu-uint8"] + DEVICES[1:])
def test_every_element_moves_pixels_exactly_and_undo_restores_them(path):
    one = distinct_image()
    raw = np.repeat(one[None], 48, axis=0)
    x, out = draw(path, raw, PURE_D4, 1)
    x0 = x[0]
    seen = set()
    for i in range(len(raw)):
        e = element_of(out["gx"][i], x0)
        seen.add(e)
        # theta says what was done: affine_grid's nearest sample at theta reads the same pixels
        th = out["theta"][i : i + 1].to(x.device)
        assert torch.equal(augment._grid_warp(x[i : i + 1], th, "nearest")[0], out["gx"][i])
        assert torch.equal(out["theta"][i, :, :2].cpu(), augment.D4[e])
    assert seen == set(range(8))
    assert out["mask"].all()  # whole pixels: every one restorable
    back, mask = undo(out["gx"], out["inverse"].to(x.device))
    assert mask.all()
    if x.device.type == "cpu":  # OpenCV's warp: sample positions rounded to 1/32 pixel
        assert torch.equal(back, x)
    else:  # grid_sample: exact up to float rounding of its sample positions
        assert torch.allclose(back, x, atol=1e-3)


def test_a_quarter_turn_is_a_90_degree_rotation():
    known = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    counter_clockwise = torch.tensor([[3.0, 6.0, 9.0], [2.0, 5.0, 8.0], [1.0, 4.0, 7.0]])
    assert torch.equal(torch.rot90(known, 1, (-2, -1)), counter_clockwise)
    x = known.expand(32, 1, 3, 3)
    out = make_pairs(x, PURE_D4, torch.Generator().manual_seed(2))
    turned = (out["theta"][:, :, :2] == torch.tensor([[0.0, -1.0], [1.0, 0.0]])).all(-1).all(-1)
    assert 0 < turned.sum().item() < 32
    assert (out["gx"][turned] == counter_clockwise).all()
    # every output is one of the rotations by 0, 90, 180 or 270 degrees of x, or of its mirror
    images = {tuple(g.flatten().tolist()) for g in out["gx"]}
    assert images == {tuple(c.flatten().tolist()) for c in candidates(known)}


@pytest.mark.parametrize("bands", [3, 4])
@pytest.mark.parametrize("colour", [False, True])
def test_torch_and_8bit_paths_draw_and_apply_the_same_element(bands, colour):
    raw = np.concatenate([distinct_image(16)] * 2)[:bands]
    raw = np.ascontiguousarray(np.repeat(raw[None], 24, axis=0))
    cfg = PairConfig(dihedral=True, **({} if colour else NO_COLOUR))
    fast = make_pairs_u8(raw, cfg, torch.Generator().manual_seed(5))
    ref = make_pairs(from_wire(torch.from_numpy(raw)), cfg, torch.Generator().manual_seed(5))
    for key in ("theta", "inverse", "mask"):
        assert torch.equal(fast[key], ref[key]), key
    gx = from_wire(fast["gx"])
    if colour:  # OpenCV's 8-bit jitter: within 1/255 (so the same pixels moved); IR exact
        assert (gx - ref["gx"]).abs().max().item() <= 1 / 255 + 1e-6
        assert (gx - ref["x"]).abs().mean().item() > 10 / 255
        assert torch.equal(gx[:, 3:], ref["gx"][:, 3:])
        return
    assert torch.equal(gx, ref["gx"])
    x0 = torch.from_numpy(raw[0]).float()
    elements = {element_of(g, x0) for g in fast["gx"].float()}
    assert len(elements) > 4


@pytest.mark.parametrize("path", ["cpu", "cpu-uint8"] + DEVICES[1:])
def test_d4_composes_with_the_affine_in_one_matrix(path):
    cfg = PairConfig(dihedral=True, affine=True, shift=0.1, **NO_COLOUR)
    x, out = pairs_on(path, smooth_images(64, bands=3, size=64, seed=9), cfg, 3)
    a = out["theta"][:, :, :2].cpu()
    plain = PairConfig(affine=True, shift=0.1, flip=False, **NO_COLOUR)
    m = augment.spatial_matrices(64, plain, torch.Generator().manual_seed(3), "cpu")
    if path == "cpu":  # the same affine draws, then D4 on the right: M @ D
        d = torch.linalg.solve(m[:, :, :2], a)
        assert torch.allclose(d, d.round(), atol=1e-5)
        assert torch.allclose(out["theta"][:, :, 2], m[:, :, 2])
    # rotations by more than 90 degrees (+-30 from the affine alone) and mirrors both occur
    angle = torch.atan2(a[:, 1, 0] - a[:, 0, 1], a[:, 0, 0] + a[:, 1, 1]).abs() * 180 / math.pi
    assert (angle > 100).any() and (torch.linalg.det(a) < 0).any()
    back, mask = undo(out["gx"], out["inverse"])
    assert torch.equal(mask, out["mask"])
    err = (back - x).abs().amax(1)[mask]
    assert 0.5 < mask.float().mean().item() < 1.0
    assert err.max().item() < 0.08 and err.mean().item() < 0.01


@pytest.mark.parametrize("path", ["float", "uint8"])
def test_dihedral_refuses_non_square_images(path):
    raw = np.zeros((2, 3, 16, 24), np.uint8)
    with pytest.raises(ValueError, match=r"^pairs.dihedral needs square images .* got 16x24"):
        if path == "uint8":
            make_pairs_u8(raw, PURE_D4, torch.Generator())
        else:
            make_pairs(torch.zeros(2, 3, 16, 24), PURE_D4, torch.Generator())
    # without dihedral, non-square images still pass (flips only)
    assert make_pairs_u8(raw, PairConfig(**NO_COLOUR), torch.Generator())["gx"].shape == raw.shape


def test_both_exact_movers_agree_with_rot90():
    """``_move`` takes numpy views on CPU and one gather elsewhere (GPU, gradients): both copy
    each pixel from where the 8 elements say."""
    x = torch.from_numpy(distinct_image(12)).float().expand(16, 3, 12, 12)
    e = torch.arange(16) % 8
    theta = torch.cat([augment.D4[e], torch.zeros(16, 2, 1)], 2)
    views = augment._move(x, theta)
    gathered = augment._move(x.clone().requires_grad_(), theta)
    assert gathered.requires_grad  # g* on predictions keeps its gradient
    assert torch.equal(views, gathered.detach())
    for i in range(16):
        assert torch.equal(views[i], candidates(x[0])[int(e[i])])
