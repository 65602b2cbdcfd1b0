"""The IID objective of a network on a batch of pairs: every sub-head's predictions of the two
views, aligned (g* for dense maps), and its loss. One definition for the training step and for
scoring held-out pairs, so that both report the same loss for the same config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.augment import undo
from pipeline.config import Config, LossConfig
from pipeline.losses import JointSum, iid_clustering_loss, iid_segmentation_loss

View = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def aligned_views(
    first: Sequence[torch.Tensor], second: Sequence[torch.Tensor], pair: dict, task: str
) -> list[View]:
    """Per sub-head ``(p, q, mask)``: the predictions of the first and the second view, ``q``
    warped back onto the first view's pixel grid for dense predictions (``mask``: the pixels
    both views saw); ``mask`` is None for whole-image clustering.

    Args:
        first, second: one (n, C[, H, W]) probability tensor per sub-head, for each view.
        pair: the batch of pairs (``inverse`` and ``mask`` are read for segmentation).
        task: ``"segmentation"`` or ``"clustering"``.
    """
    out: list[View] = []
    for p, q in zip(first, second, strict=True):
        if task == "segmentation":
            q, _ = undo(q, pair["inverse"])
            out.append((p, q, pair["mask"]))
        else:
            out.append((p, q, None))
    return out


def view_loss(
    view: View, lamb: float, cfg: LossConfig, joint_sum: JointSum | None = None
) -> torch.Tensor:
    """The IID loss ``-I_lambda`` of one sub-head's aligned views: the dense loss (window T,
    collapsed or not, as configured) when there is a mask, the clustering loss otherwise."""
    p, q, mask = view
    if mask is None:
        return iid_clustering_loss(p, q, lamb, joint_sum).loss
    return iid_segmentation_loss(
        p,
        q,
        mask,
        lamb=lamb,
        half_window=cfg.half_window,
        collapsed=cfg.collapsed,
        joint_sum=joint_sum,
    ).loss


def pair_losses(
    model: torch.nn.Module,
    pair: dict,
    head: str,
    lamb: float,
    cfg: Config,
    joint_sum: JointSum | None = None,
) -> torch.Tensor:
    """(sub-heads,) IID losses of ``head`` on one batch of pairs (``x``, ``gx``, ...)."""
    views = aligned_views(model(pair["x"], head), model(pair["gx"], head), pair, cfg.model.task)
    return torch.stack([view_loss(v, lamb, cfg.loss, joint_sum) for v in views])
