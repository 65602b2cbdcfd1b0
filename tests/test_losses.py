"""IID losses against a naive per-pixel, per-displacement reference written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.losses import (
    displacement_joints,
    iid_clustering_loss,
    iid_segmentation_loss,
)

EPS = 2.220446049250313e-16


# ---------------------------------------------------------------- minimal reference, float64 numpy
def ref_mi(joint: np.ndarray, lamb: float) -> tuple[float, float]:
    """(I_lambda, I_1) of one unnormalised joint, following Eq. 3 literally."""
    joint = (joint + joint.T) / 2
    joint = joint / joint.sum()
    pi = np.maximum(joint.sum(axis=1), EPS)
    pj = np.maximum(joint.sum(axis=0), EPS)
    pij = np.maximum(joint, EPS)
    i_lamb = i_one = 0.0
    c = joint.shape[0]
    for i in range(c):
        for j in range(c):
            i_lamb += pij[i, j] * (
                math.log(pij[i, j]) - lamb * math.log(pi[i]) - lamb * math.log(pj[j])
            )
            i_one += pij[i, j] * (math.log(pij[i, j]) - math.log(pi[i]) - math.log(pj[j]))
    return i_lamb, i_one


def ref_joints(p: np.ndarray, q: np.ndarray, mask: np.ndarray, t_half: int) -> dict:
    """P_t(i, j) = sum_n sum_u p[n, i, u + t] q[n, j, u], pixel by pixel, for every t."""
    n, c, h, w = p.shape
    joints = {}
    for dy in range(-t_half, t_half + 1):
        for dx in range(-t_half, t_half + 1):
            joint = np.zeros((c, c))
            for b in range(n):
                for y in range(h):
                    for x in range(w):
                        ys, xs = y + dy, x + dx
                        if not (0 <= ys < h and 0 <= xs < w):
                            continue
                        if not (mask[b, ys, xs] and mask[b, y, x]):
                            continue
                        joint += np.outer(p[b, :, ys, xs], q[b, :, y, x])
            joints[(dy, dx)] = joint
    return joints


def ref_segmentation(p, q, mask, lamb, t_half, collapsed):
    joints = ref_joints(p, q, mask, t_half)
    if collapsed:
        return ref_mi(sum(joints.values()), lamb)
    values = [ref_mi(j, lamb) for j in joints.values() if j.sum() > 0]
    return tuple(float(np.mean([v[k] for v in values])) for k in (0, 1))


def close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


def random_maps(seed: int, n=2, c=4, h=9, w=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, c, h, w, generator=g, dtype=dtype).mul(2).softmax(1)
    q = torch.randn(n, c, h, w, generator=g, dtype=dtype).mul(2).softmax(1)
    mask = torch.rand(n, h, w, generator=g) > 0.3
    return p, q, mask


# ------------------------------------------------------------------------ dense loss vs reference
@pytest.mark.parametrize("method", ["fft", "conv"])
@pytest.mark.parametrize("collapsed", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("lamb", [1.0, 1.7])
def test_segmentation_matches_naive_loop(method, collapsed, use_mask, lamb):
    p, q, mask = random_maps(seed=hash((method, collapsed, use_mask, lamb)) % 1000)
    t_half = 3
    out = iid_segmentation_loss(
        p,
        q,
        mask if use_mask else None,
        lamb=lamb,
        half_window=t_half,
        collapsed=collapsed,
        method=method,
    )
    np_mask = mask.numpy() if use_mask else np.ones(mask.shape, bool)
    want_lamb, want_one = ref_segmentation(
        p.double().numpy(), q.double().numpy(), np_mask, lamb, t_half, collapsed
    )
    assert out.loss.dtype == torch.float32
    assert close(out.loss.item(), -want_lamb), (out.loss.item(), -want_lamb)
    assert close(out.mi.item(), want_one), (out.mi.item(), want_one)


def test_displacement_convention_first_map_shifted():
    # A single bright pixel in p at (4, 5) and in q at (2, 2): only t = (2, 3) pairs them.
    p = torch.zeros(1, 2, 8, 8)
    q = torch.zeros(1, 2, 8, 8)
    p[0, 0, 4, 5] = 1
    q[0, 1, 2, 2] = 1
    for method in ("fft", "conv"):
        joints = displacement_joints(p, q, half_window=3, method=method)
        nz = torch.nonzero(joints.abs() > 1e-6).tolist()
        assert nz == [[3 + 2, 3 + 3, 0, 1]], (method, nz)


def test_fft_and_conv_agree_at_potsdam_like_size():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(2, 6, 40, 48, generator=g).softmax(1)
    q = torch.randn(2, 6, 40, 48, generator=g).softmax(1)
    a = displacement_joints(p, q, 10, "fft")
    b = displacement_joints(p, q, 10, "conv")
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)
    la = iid_segmentation_loss(p, q, half_window=10, method="fft")
    lb = iid_segmentation_loss(p, q, half_window=10, method="conv")
    assert abs(la.loss.item() - lb.loss.item()) < 1e-5


def test_fft_gradient_matches_conv_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 16, 16, generator=g)
    q = torch.randn(2, 5, 16, 16, generator=g).softmax(1)
    grads = []
    for method in ("fft", "conv"):
        x = logits.clone().requires_grad_(True)
        iid_segmentation_loss(
            x.softmax(1), q, lamb=1.5, half_window=4, method=method
        ).loss.backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ------------------------------------------------------------------------------- clustering loss
def test_clustering_matches_reference():
    g = torch.Generator().manual_seed(2)
    p = torch.randn(50, 7, generator=g).softmax(1)
    q = torch.randn(50, 7, generator=g).softmax(1)
    for lamb in (1.0, 2.0, 0.5):
        out = iid_clustering_loss(p, q, lamb)
        want_lamb, want_one = ref_mi(p.double().numpy().T @ q.double().numpy(), lamb)
        assert close(out.loss.item(), -want_lamb)
        assert close(out.mi.item(), want_one)


# ----------------------------------------------------------------------------------- known cases
def test_independent_views_give_zero_mi():
    c = 5
    a, b = np.meshgrid(np.arange(c), np.arange(c))  # every (a, b) combination once
    p = torch.eye(c)[torch.from_numpy(a.ravel())]
    q = torch.eye(c)[torch.from_numpy(b.ravel())]
    assert abs(iid_clustering_loss(p, q).mi.item()) < 1e-6
    # Dense: constant maps carry no information at any displacement.
    maps = torch.full((2, 3, 12, 12), 1 / 3)
    out = iid_segmentation_loss(maps, maps.clone(), half_window=4)
    assert abs(out.mi.item()) < 1e-6


@pytest.mark.parametrize("c", [2, 3, 6])
def test_balanced_perfect_pairing_gives_log_c(c):
    labels = torch.arange(c).repeat(4)
    p = torch.eye(c)[labels]
    assert abs(iid_clustering_loss(p, p.clone()).mi.item() - math.log(c)) < 1e-6
    # Dense: image k is constant class k, so every displacement pairs only equal classes.
    maps = torch.eye(c)[torch.arange(c)][:, :, None, None].expand(c, c, 10, 10).contiguous()
    for collapsed in (False, True):
        out = iid_segmentation_loss(maps, maps.clone(), half_window=3, collapsed=collapsed)
        assert abs(out.mi.item() - math.log(c)) < 1e-5
        assert abs(out.loss.item() + math.log(c)) < 1e-5


def entropy_of_marginal(p: torch.Tensor, q: torch.Tensor) -> float:
    joint = p.double().T @ q.double()
    joint = (joint + joint.T) / 2
    joint /= joint.sum()
    m = joint.sum(1)
    return float(-(m * m.log()).sum())


def test_lambda_identity():
    g = torch.Generator().manual_seed(3)
    p = torch.randn(64, 6, generator=g).softmax(1)
    q = torch.randn(64, 6, generator=g).softmax(1)
    h = entropy_of_marginal(p, q)  # symmetrised: H(z) = H(z')
    i_one = iid_clustering_loss(p, q, 1.0).mi.item()
    for lamb in (0.5, 1.5, 3.0):
        i_lamb = -iid_clustering_loss(p, q, lamb).loss.item()
        assert abs(i_lamb - (i_one + (lamb - 1) * 2 * h)) < 1e-5


def test_lambda_identity_dense_collapsed():
    p, q, _ = random_maps(4, n=2, c=3, h=10, w=10)
    one = iid_segmentation_loss(p, q, half_window=2, collapsed=True)
    joint = displacement_joints(p.double(), q.double(), 2).sum((0, 1))
    joint = (joint + joint.T) / 2
    joint /= joint.sum()
    m = joint.sum(1)
    h = float(-(m * m.log()).sum())
    for lamb in (1.5, 2.5):
        two = iid_segmentation_loss(p, q, lamb=lamb, half_window=2, collapsed=True)
        assert abs(-two.loss.item() - (one.mi.item() + (lamb - 1) * 2 * h)) < 1e-5


def test_gradients_finite_with_empty_clusters():
    logits = torch.randn(3, 5, 12, 12)
    logits[:, 2] = -1e4  # cluster 2 never used: exact zeros after softmax
    logits.requires_grad_(True)
    probs = logits.softmax(1)
    assert probs[:, 2].max().item() == 0.0
    out = iid_segmentation_loss(probs, probs.detach().flip(-1), lamb=2.0, half_window=3)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logits.grad).all()
    x = torch.randn(20, 4)
    x[:, 0] = -1e4
    x.requires_grad_(True)
    loss = iid_clustering_loss(x.softmax(1), x.softmax(1).detach(), lamb=1.5).loss
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_no_valid_pixel_is_a_clear_error():
    p, q, mask = random_maps(5)
    with pytest.raises(ValueError, match="no valid pixel"):
        iid_segmentation_loss(p, q, torch.zeros_like(mask), half_window=2)


def test_single_valid_pixel_uses_only_displacements_with_pairs():
    p, q, _ = random_maps(6, n=1, c=3, h=8, w=8)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 3, 3] = True
    out = iid_segmentation_loss(p, q, mask, half_window=2)
    assert torch.isfinite(out.loss)
    want = ref_mi(np.outer(p[0, :, 3, 3].double().numpy(), q[0, :, 3, 3].double().numpy()), 1.0)
    assert close(out.mi.item(), want[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lamb": 0.0}, "lamb must be > 0"),
        ({"lamb": -1.0}, "lamb must be > 0"),
        ({"half_window": 9}, "half_window must be in"),
        ({"half_window": -1}, "half_window must be in"),
        ({"method": "loop"}, "method must be"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    p, q, _ = random_maps(7)
    with pytest.raises(ValueError, match=match):
        iid_segmentation_loss(p, q, **{"half_window": 2, **kwargs})


def test_shape_mismatch_raises():
    p, q, mask = random_maps(8)
    with pytest.raises(ValueError, match="same shape"):
        iid_segmentation_loss(p, q[:, :3])
    with pytest.raises(ValueError, match="mask of shape"):
        iid_segmentation_loss(p, q, mask[:, :4], half_window=2)
    with pytest.raises(ValueError, match="same shape"):
        iid_clustering_loss(p[:, :, 0, 0], q[:1, :, 0, 0])


# --------------------------------------------------------------------------- optimisation & props
@pytest.mark.parametrize("collapsed", [False, True])
def test_a_few_gradient_steps_lower_the_loss(collapsed):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.3)
    losses = []
    for _ in range(20):
        probs = logits.softmax(1)
        # Both views in one frame: the loss rewards spatially consistent, confident maps.
        loss = iid_segmentation_loss(
            probs, probs, lamb=1.2, half_window=2, collapsed=collapsed
        ).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    c=st.integers(2, 6),
    t_half=st.integers(0, 3),
    collapsed=st.booleans(),
)
def test_mi_bounded_and_symmetric_in_views(seed, c, t_half, collapsed):
    p, q, mask = random_maps(seed, n=2, c=c, h=7, w=9)
    a = iid_segmentation_loss(p, q, mask, half_window=t_half, collapsed=collapsed)
    b = iid_segmentation_loss(q, p, mask, half_window=t_half, collapsed=collapsed)
    assert -1e-6 <= a.mi.item() <= math.log(c) + 1e-6
    # Swapping the views maps P_t to P_{-t}^T; after symmetrising the set of joints is the same.
    assert abs(a.loss.item() - b.loss.item()) < 1e-5


def test_float64_inputs_stay_float64():
    p, q, mask = random_maps(9, dtype=torch.float64)
    out = iid_segmentation_loss(p, q, mask, half_window=2)
    assert out.loss.dtype == torch.float64


def test_loss_does_not_sync_or_raise_on_nan_for_empty_mask_off_cpu():
    # On CPU the empty-mask check is free; the meta device stands in for an accelerator, where
    # the same check would sync: there the loss must build its graph without any host read.
    p = torch.empty(2, 3, 8, 8, device="meta")
    mask = torch.empty(2, 8, 8, device="meta")
    out = iid_segmentation_loss(p, p, mask, half_window=2)
    assert out.loss.device.type == "meta"


def test_mutual_information_of_known_joints():
    from pipeline.losses import mutual_information

    k = 4
    diagonal = torch.eye(k) * 7.0  # z' = z, uniform: I = ln K whatever the scale
    marginal = torch.tensor([0.1, 0.2, 0.3, 0.4])
    independent = torch.outer(marginal, marginal)  # symmetric, so symmetrising keeps it so
    empty = torch.zeros(k, k)
    mi = mutual_information(torch.stack([diagonal, independent, empty]))
    assert torch.allclose(mi, torch.tensor([math.log(k), 0.0, 0.0], dtype=torch.float64), atol=1e-6)
