"""IID losses: the lambda-weighted mutual information of paired cluster predictions.

The objective (paper Eq. 3) over a joint distribution ``P`` of two cluster variables z, z'::

    I_lambda = sum_ij P_ij * (ln P_ij - lambda * ln P_i - lambda * ln P_j)

with ``P_i``/``P_j`` the row/column marginals. ``I_lambda = I_1 + (lambda - 1) * (H(z) + H(z'))``,
so lambda > 1 rewards balanced clusters. Every loss here returns ``-I_lambda`` together with the
lambda=1 mutual information (for logging), both as device tensors: nothing in this module syncs
with the host, so a training step never stalls on the loss.

Joints are symmetrised ``(P + P^T) / 2`` and normalised to sum 1; values below machine epsilon are
clamped before the log, as in the reference implementation, so empty clusters keep gradients finite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

EPS = torch.finfo(torch.float64).eps  # ~2.2e-16, the reference's clamp value

DenseMethod = Literal["fft", "conv"]

# Sums an unnormalised joint over data-parallel workers, differentiably (see ``global_sum`` in
# pipeline.train): the loss is then that of the global batch, whatever the number of workers.
JointSum = Callable[[torch.Tensor], torch.Tensor]


class IIDLoss(NamedTuple):
    """What every IID loss returns.

    Attributes:
        loss: scalar ``-I_lambda`` to minimise (differentiable).
        mi: scalar lambda=1 mutual information in nats (detached), for logging.
    """

    loss: torch.Tensor
    mi: torch.Tensor


def _mi_terms(joint: torch.Tensor, lamb: float) -> tuple[torch.Tensor, torch.Tensor]:
    """I_lambda and I_1 of a batch of joints.

    Args:
        joint: (..., C, C) non-negative joints, each already symmetrised and summing to 1.
        lamb: the lambda of Eq. 3.

    Returns:
        (I_lambda, I_1), each of shape (...).
    """
    p_i = joint.sum(dim=-1, keepdim=True).clamp(min=EPS)  # (..., C, 1)
    p_j = joint.sum(dim=-2, keepdim=True).clamp(min=EPS)  # (..., 1, C)
    p_ij = joint.clamp(min=EPS)
    log_p_ij, log_p_i, log_p_j = p_ij.log(), p_i.log(), p_j.log()
    i_lamb = (p_ij * (log_p_ij - lamb * log_p_i - lamb * log_p_j)).sum(dim=(-2, -1))
    i_one = (p_ij * (log_p_ij - log_p_i - log_p_j)).detach().sum(dim=(-2, -1))
    return i_lamb, i_one


def symmetrise_normalise(
    joint: torch.Tensor, min_mass: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetrise (..., C, C) joints and normalise each to sum 1.

    Args:
        joint: unnormalised joints.
        min_mass: a joint with total mass at or below this counts as empty.

    Returns:
        (normalised joints, mask of the joints with mass). An empty joint (no valid pixel pair)
        is left at zero instead of becoming NaN.
    """
    joint = (joint + joint.transpose(-2, -1)) / 2
    total = joint.sum(dim=(-2, -1), keepdim=True)
    has_mass = total > min_mass
    joint = joint / torch.where(has_mass, total, torch.ones_like(total))
    return joint, has_mass[..., 0, 0]


def mutual_information(joint: torch.Tensor) -> torch.Tensor:
    """Lambda=1 mutual information (nats) of unnormalised (..., C, C) joints.

    The joints are symmetrised and normalised first, as in the losses; an empty joint gives 0.
    Used for the label-free model selection of ``pipeline.tune``: unlike ``-I_lambda`` it does
    not change scale with lambda, so trials with different lambdas can be compared.

    Returns:
        (...) mutual information, float64.
    """
    joint, has_mass = symmetrise_normalise(joint.double())
    mi = _mi_terms(joint, 1.0)[1]
    return torch.where(has_mass, mi, torch.zeros_like(mi))


def _loss_dtype(p: torch.Tensor) -> torch.dtype:
    # Logs of tiny probabilities and FFTs need at least fp32, also under bf16 autocast.
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # The loss runs in fp32 even inside a bf16 autocast region of the training step.
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _check_lambda(lamb: float) -> None:
    if not lamb > 0:
        raise ValueError(f"lamb must be > 0, got {lamb!r}")


def iid_clustering_loss(
    p: torch.Tensor, p_pair: torch.Tensor, lamb: float = 1.0, joint_sum: JointSum | None = None
) -> IIDLoss:
    """IID loss for whole-image clustering (paper Eq. 4-6).

    ``P = mean_n p[n] p_pair[n]^T`` (C, C), symmetrised and normalised, then ``-I_lambda(P)``.

    Args:
        p: (n, C) softmax rows of the first views.
        p_pair: (n, C) softmax rows of the paired (transformed) views.
        lamb: lambda of Eq. 3; > 1 favours balanced clusters.
        joint_sum: applied to the unnormalised (C, C) joint before normalising, to sum it over
            workers; every worker must then call the loss equally often.

    Returns:
        IIDLoss(loss=-I_lambda, mi=I_1).

    Raises:
        ValueError: on mismatched shapes, a non-2D input, an empty batch or lamb <= 0.
    """
    _check_lambda(lamb)
    if p.ndim != 2 or p.shape != p_pair.shape:
        raise ValueError(
            f"expected p and p_pair of the same shape (n, C), got {tuple(p.shape)} "
            f"and {tuple(p_pair.shape)}"
        )
    if p.shape[0] == 0:
        raise ValueError("empty batch: p has 0 rows")
    with _no_autocast(p.device):
        dtype = _loss_dtype(p)
        p, p_pair = p.to(dtype), p_pair.to(dtype)
        joint = p.T @ p_pair
        if joint_sum is not None:
            joint = joint_sum(joint)
        joint, _ = symmetrise_normalise(joint)
        i_lamb, i_one = _mi_terms(joint, lamb)
    return IIDLoss(loss=-i_lamb, mi=i_one)


def _fast_len(n: int) -> int:
    """Smallest 5-smooth integer >= n (FFT sizes that cuFFT and pocketfft handle fastest)."""
    while True:
        m = n
        for f in (2, 3, 5):
            while m % f == 0:
                m //= f
        if m == 1:
            return n
        n += 1


def displacement_joints(
    p: torch.Tensor, p_pair: torch.Tensor, half_window: int, method: DenseMethod = "fft"
) -> torch.Tensor:
    """Unnormalised joints for every displacement t in the (2T+1)^2 window.

    ``J[a, b, i, j] = sum_n sum_u p[n, i, u + t] * p_pair[n, j, u]`` with ``t = (a - T, b - T)``
    and zero padding beyond the border: a cross-correlation of the two maps.

    Args:
        p: (n, C, H, W) first maps, masked pixels already zeroed.
        p_pair: (n, C, H, W) second maps in the same frame, masked pixels zeroed.
        half_window: T.
        method: ``"fft"`` correlates in the frequency domain: cost O(n C H W log(HW) + n C^2 H W)
            whatever T is. ``"conv"`` is the direct formulation of the reference (``conv2d`` with
            the second map as the filter, padding T): O(n C^2 H W (2T+1)^2).

    Returns:
        (2T+1, 2T+1, C, C) joints.
    """
    t = half_window
    if method == "conv":
        # (C, n, H, W) conv (C, n, H, W) -> (C, C, 2T+1, 2T+1)
        out = F.conv2d(p.transpose(0, 1), p_pair.transpose(0, 1), padding=t)
        return out.permute(2, 3, 0, 1)
    if method != "fft":
        raise ValueError(f"method must be 'fft' or 'conv', got {method!r}")
    n, c, h, w = p.shape
    # Padding to >= H+T (not 2H) is enough: lags beyond T may alias, lags within T never do.
    fh, fw = _fast_len(h + t), _fast_len(w + t)
    fx = fw // 2 + 1
    fp = torch.fft.rfft2(p, s=(fh, fw)).flatten(2)  # (n, C, F), F = fh * fx
    fq = torch.fft.rfft2(p_pair, s=(fh, fw)).flatten(2)
    # Batch sum inside one matmul per frequency: (F, C, n) @ (F, n, C) -> (F, C, C).
    cross = torch.bmm(
        fp.permute(2, 1, 0).contiguous(), fq.conj().resolve_conj().permute(2, 0, 1).contiguous()
    )
    # Only (2T+1)^2 of the fh * fw lags are needed: an inverse DFT restricted to them, as two
    # small matmuls, costs a fraction of a full irfft2 of C^2 maps.
    inv_y, inv_x = _inverse_dft_rows(fh, fw, t, cross.dtype, cross.device)
    cross = cross.view(fh, fx, c * c)
    per_x = torch.matmul(inv_x, cross)  # (fh, 2T+1, C^2)
    lags = torch.matmul(inv_y, per_x.view(fh, -1))  # (2T+1, (2T+1) C^2)
    return lags.real.view(2 * t + 1, 2 * t + 1, c, c)


def _inverse_dft_rows(
    fh: int, fw: int, t: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse DFT matrices from an (fh, fw//2+1) half spectrum to lags -T..T on each axis.

    The real signal at lag (y, x) is ``Re(sum_ky sum_kx w_kx S[ky, kx] e^{2 pi i (ky y/fh +
    kx x/fw)}) / (fh fw)``, where w doubles the bins whose conjugate twins rfft dropped.
    """
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    lags = torch.arange(-t, t + 1, device=device, dtype=real)
    ky = torch.arange(fh, device=device, dtype=real)
    kx = torch.arange(fw // 2 + 1, device=device, dtype=real)
    weight = torch.full_like(kx, 2.0)
    weight[0] = 1.0
    if fw % 2 == 0:
        weight[-1] = 1.0
    inv_y = torch.polar(
        torch.ones(2 * t + 1, fh, device=device, dtype=real),
        2 * torch.pi * lags[:, None] * ky[None, :] / fh,
    )
    inv_x = torch.polar(
        weight[None, :].expand(2 * t + 1, -1) / (fh * fw),
        2 * torch.pi * lags[:, None] * kx[None, :] / fw,
    )
    return inv_y, inv_x


def iid_segmentation_loss(
    p: torch.Tensor,
    p_pair: torch.Tensor,
    mask: torch.Tensor | None = None,
    lamb: float = 1.0,
    half_window: int = 10,
    collapsed: bool = False,
    method: DenseMethod = "fft",
    joint_sum: JointSum | None = None,
) -> IIDLoss:
    """Dense IID loss for segmentation (paper Eq. 8-10).

    For every displacement t with |t_y|, |t_x| <= T, the joint over all valid pixel pairs is
    ``P_t(i, j) = sum_n sum_u p[n, i, u + t] * p_pair[n, j, u]`` (pixels beyond the border and
    masked pixels contribute zero). Uncollapsed (default, every published run): each P_t is
    symmetrised and normalised on its own and the loss is the mean of ``-I_lambda(P_t)`` over
    displacements that have any valid pair. Collapsed: ``-I_lambda`` of ``sum_t P_t``.

    Args:
        p: (n, C, H, W) per-pixel probabilities of the first views.
        p_pair: (n, C, H, W) probabilities of the second views, already warped back into the
            first view's frame (g* applied).
        mask: optional (n, H, W), 1 where a pixel counts (inside the warped view, labelled
            target class...), 0 elsewhere.
        lamb: lambda of Eq. 3.
        half_window: T; the window is (2T+1) x (2T+1).
        collapsed: one MI of the summed joint instead of the mean of per-displacement MIs.
        method: ``"fft"`` (fast, default) or ``"conv"`` (direct correlation); same values.
        joint_sum: applied to the unnormalised (K, C, C) joints before normalising, to sum them
            over workers; every worker must then call the loss equally often.

    Returns:
        IIDLoss(loss=-I_lambda, mi=I_1), averaged over displacements when uncollapsed.

    Raises:
        ValueError: on bad shapes, T < 0 or T >= the map size, lamb <= 0, or a CPU mask with no
            valid pixel (without ``joint_sum``). On an accelerator the empty-mask check would
            force a host sync, and with ``joint_sum`` the other workers' pixels may count, so
            there a batch with no valid pixel anywhere yields a NaN loss (on every worker
            alike), which training rejects.
    """
    _check_lambda(lamb)
    if p.ndim != 4 or p.shape != p_pair.shape:
        raise ValueError(
            f"expected p and p_pair of the same shape (n, C, H, W), got {tuple(p.shape)} "
            f"and {tuple(p_pair.shape)}"
        )
    n, _, h, w = p.shape
    if not 0 <= half_window < min(h, w):
        raise ValueError(
            f"half_window must be in [0, {min(h, w) - 1}] for {h}x{w} maps, got {half_window!r}"
        )
    if mask is not None and tuple(mask.shape) != (n, h, w):
        raise ValueError(f"expected mask of shape {(n, h, w)}, got {tuple(mask.shape)}")
    # Summed over workers, one worker's empty mask is no error (its peers' pixels count), and a
    # raise here would leave the peers waiting in their all_reduce: the global sum decides.
    empty_is_local = joint_sum is None and mask is not None and mask.device.type == "cpu"
    if empty_is_local and not bool(mask.any()):
        raise ValueError("batch has no valid pixel: the mask is all zero")

    with _no_autocast(p.device):
        dtype = _loss_dtype(p)
        p, p_pair = p.to(dtype), p_pair.to(dtype)
        if mask is not None:
            m = mask.to(dtype).unsqueeze(1)
            p, p_pair = p * m, p_pair * m
        joints = displacement_joints(p, p_pair, half_window, method).flatten(0, 1)  # (K, C, C)
        if joint_sum is not None:
            joints = joint_sum(joints)
        if collapsed:
            joints = joints.sum(dim=0, keepdim=True)
        # Each valid pixel pair adds exactly 1 to a joint's mass (probabilities sum to 1), so
        # half a pair separates real pairs from FFT round-off at displacements with none.
        joints, has_mass = symmetrise_normalise(joints, min_mass=0.5)
        i_lamb, i_one = _mi_terms(joints, lamb)
        # Displacements with no valid pair (tiny masks) drop out of the mean instead of
        # counting as zero information; an all-empty batch divides 0 by 0 -> NaN by design.
        weight = has_mass.to(dtype)
        count = weight.sum()
        loss = -(i_lamb * weight).sum() / count
        mi = (i_one * weight).sum() / count
    return IIDLoss(loss=loss, mi=mi)
