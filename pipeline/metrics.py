"""Unsupervised evaluation from streamed confusion counts.

The protocol of the field: argmax per pixel (or image), a confusion matrix over all valid pixels,
then cluster-to-class matching (Hungarian one-to-one, or many-to-one majority for overclustering
heads) for ACC, and NMI / ARI from the same contingency table. Only the (K, M) counts are ever
held, so a whole test set costs K*M integers however many pixels it has, and counts from several
workers merge by addition (or one ``all_reduce``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pipeline import IGNORE_INDEX


def confusion_counts(
    pred: torch.Tensor,
    target: torch.Tensor,
    n_clusters: int,
    n_classes: int,
    valid: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Count (cluster, class) co-occurrences of one batch, on the batch's own device.

    Args:
        pred: integer cluster ids in [0, n_clusters), any shape.
        target: integer class ids in [0, n_classes) or ``ignore_index``, same shape as pred.
        n_clusters: K, the number of output clusters.
        n_classes: M, the number of ground-truth classes.
        valid: optional boolean tensor of pred's shape; False excludes a pixel.
        ignore_index: target value that marks unlabelled pixels.

    Returns:
        (K, M) int64 counts; rows are clusters, columns classes.

    Raises:
        ValueError: if shapes differ.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    keep = target != ignore_index
    if valid is not None:
        keep &= valid.to(torch.bool)
    pred, target = pred[keep].long(), target[keep].long()
    flat = pred * n_classes + target
    return torch.bincount(flat, minlength=n_clusters * n_classes).reshape(n_clusters, n_classes)


class ConfusionAccumulator:
    """Running (K, M) counts; ``update`` per batch (workers' counts add up).

    Args:
        n_clusters: K.
        n_classes: M.
        device: where the counts live (keep it on the predictions' device: no host sync).
    """

    def __init__(self, n_clusters: int, n_classes: int, device: str | torch.device = "cpu"):
        self.n_clusters, self.n_classes = n_clusters, n_classes
        self.counts = torch.zeros(n_clusters, n_classes, dtype=torch.int64, device=device)

    def update(
        self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """Add one batch of argmax predictions and targets."""
        self.counts += confusion_counts(
            pred.to(self.counts.device),
            target.to(self.counts.device),
            self.n_clusters,
            self.n_classes,
            None if valid is None else valid.to(self.counts.device),
        )

    def numpy(self) -> np.ndarray:
        return self.counts.cpu().numpy()


@dataclass(frozen=True)
class ClusterScores:
    """Scores of one clustering against ground truth.

    Attributes:
        acc: matched accuracy (Hungarian one-to-one, or majority many-to-one).
        nmi: normalised mutual information (arithmetic mean normalisation, as scikit-learn).
        ari: adjusted Rand index.
        mapping: cluster -> class assignment used for ``acc`` (-1 for unmatched clusters).
        n: number of counted pixels or images.
        iou: per class, the intersection over union of the pixels mapped to it and its true
            pixels (NaN for a class neither predicted nor present).
        miou: the mean of ``iou`` over the classes where it is defined.
    """

    acc: float
    nmi: float
    ari: float
    mapping: tuple[int, ...]
    n: int
    iou: tuple[float, ...] = ()
    miou: float = float("nan")


def hungarian_mapping(counts: np.ndarray) -> np.ndarray:
    """One-to-one cluster -> class mapping maximising matched counts (-1 where unmatched)."""
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.full(counts.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def matched_names(counts: np.ndarray | torch.Tensor, classes: Sequence[str]) -> list[str]:
    """The class each cluster stands for, by Hungarian one-to-one matching of the counts.

    Args:
        counts: (K clusters, M classes) confusion counts of one sub-head.
        classes: the M class names, in the order of the counts' columns.

    Returns:
        K names: a cluster's matched class, or "" for a cluster left unmatched (more clusters
        than classes) and for every cluster when nothing was counted (data without labels).

    Raises:
        ValueError: if the counts are not (K, M) with M the number of class names.
    """
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu().numpy()
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != len(classes):
        raise ValueError(
            f"counts of shape {counts.shape} for {len(classes)} class names; expected (K, "
            f"{len(classes)})"
        )
    if counts.sum() == 0:
        # A matching of zeros is arbitrary: it would name clusters after classes never seen.
        return [""] * counts.shape[0]
    return [classes[c] if c >= 0 else "" for c in hungarian_mapping(counts)]


def majority_mapping(counts: np.ndarray) -> np.ndarray:
    """Many-to-one mapping: every cluster goes to its most frequent class."""
    return counts.argmax(axis=1).astype(np.int64)


def matched_accuracy(counts: np.ndarray, mapping: np.ndarray) -> float:
    """Fraction of counted items whose cluster maps to their class."""
    total = counts.sum()
    if total == 0:
        raise ValueError("no counted pixels: every target was ignored or masked")
    matched = sum(counts[k, c] for k, c in enumerate(mapping) if c >= 0)
    return float(matched / total)


def _entropy(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi_from_counts(counts: np.ndarray) -> float:
    """NMI (arithmetic normalisation, as sklearn's default) from a contingency table."""
    counts = np.asarray(counts, dtype=np.float64)
    a, b = counts.sum(axis=1), counts.sum(axis=0)
    n_a, n_b = int((a > 0).sum()), int((b > 0).sum())
    # sklearn: two identical single-cluster (or empty) labelings are a perfect match.
    if n_a == n_b == 1 or n_a == n_b == 0:
        return 1.0
    total = counts.sum()
    nz = counts > 0
    outer = np.outer(a, b)[nz]
    mi = float((counts[nz] / total * (np.log(counts[nz]) + np.log(total) - np.log(outer))).sum())
    mi = max(mi, 0.0)
    h_a, h_b = _entropy(a), _entropy(b)
    if mi == 0.0:
        return 0.0
    normaliser = max((h_a + h_b) / 2, np.finfo(np.float64).eps)
    return float(mi / normaliser)


def ari_from_counts(counts: np.ndarray) -> float:
    """Adjusted Rand index from a contingency table, via the pair confusion matrix as sklearn.

    Python integers keep the pair counts exact: pixel totals squared overflow int64 at ~3e9 pixels.
    """
    table = [[int(v) for v in row] for row in np.asarray(counts)]
    n = sum(map(sum, table))
    rows = [sum(r) for r in table]
    cols = [sum(c) for c in zip(*table, strict=True)] if table else []
    squares = sum(v * v for r in table for v in r)
    tp = squares - n
    fp = sum(v * cols[j] for r in table for j, v in enumerate(r)) - squares
    fn = sum(v * rows[i] for i, r in enumerate(table) for v in r) - squares
    tn = n * n - fp - fn - squares
    if fn == 0 and fp == 0:  # identical partitions, or no data
        return 1.0
    return 2 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def cluster_scores(counts: np.ndarray | torch.Tensor, many_to_one: bool = False) -> ClusterScores:
    """ACC, NMI and ARI of a (K, M) confusion matrix.

    Args:
        counts: (K clusters, M classes) counts.
        many_to_one: majority mapping (overclustering heads) instead of Hungarian one-to-one.

    Returns:
        ClusterScores.

    Raises:
        ValueError: if nothing was counted.
    """
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu().numpy()
    counts = np.asarray(counts, dtype=np.int64)
    mapping = majority_mapping(counts) if many_to_one else hungarian_mapping(counts)
    iou = class_iou(counts, mapping)
    defined = iou[~np.isnan(iou)]
    return ClusterScores(
        acc=matched_accuracy(counts, mapping),
        nmi=nmi_from_counts(counts),
        ari=ari_from_counts(counts),
        mapping=tuple(int(m) for m in mapping),
        n=int(counts.sum()),
        iou=tuple(float(v) for v in iou),
        miou=float(defined.mean()) if defined.size else float("nan"),
    )


def class_iou(counts: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(M,) intersection over union per class of the clustering ``mapping`` turns into classes
    (the protocol of PiCIE and STEGO beside pixel accuracy).

    Pixels of a cluster mapped to -1 (more clusters than classes) are predicted as no class:
    they count against their true class only.

    Args:
        counts: (K clusters, M classes) counts.
        mapping: (K,) class of each cluster, -1 for none.

    Returns:
        IoU per class; NaN where the class is neither predicted nor present.
    """
    counts = np.asarray(counts, dtype=np.float64)
    k, m = counts.shape
    predicted = np.zeros((m, m))  # predicted class x true class
    for cluster, c in enumerate(np.asarray(mapping)[:k]):
        if c >= 0:
            predicted[c] += counts[cluster]
    hits = np.diag(predicted)
    union = predicted.sum(axis=1) + counts.sum(axis=0) - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, hits / union, np.nan)
