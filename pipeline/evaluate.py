"""Scoring a model on held-out tiles, with the field's protocol: one loop for the training
workers (every epoch, on their share of the evaluation split) and for the driver (``iid
evaluate``, the final report).

Head B of every sub-head is scored by streamed confusion counts (never all predictions): ACC with
Hungarian one-to-one matching, NMI, ARI. The model's answer is the sub-head with the lowest
lambda = 1 IID loss, -I(z, z'), on pairs drawn from the evaluation tiles: a label-free choice, as
in the paper (see ``choose_subhead`` for why not the lambda_B loss). Everything the loop gathers
is a sum over batches (``Tally``), so the workers' shares add up with one ``all_reduce`` each.

``evaluate_model`` runs in one process without Ray: scoring one model fits a laptop, and ``iid
evaluate`` then works on a checkpoint copied off a cluster.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint
from pipeline.augment import make_pairs
from pipeline.config import Config, PairConfig
from pipeline.data.format import check_data, label_lut, read_manifest
from pipeline.data.read import iter_tiles
from pipeline.losses import mutual_information, symmetrise_normalise
from pipeline.metrics import (
    ClusterScores,
    cluster_scores,
    confusion_counts,
    matched_names,
    nmi_from_counts,
)
from pipeline.objective import View, aligned_views, view_loss

log = logging.getLogger(__name__)

# image, every sub-head's map, target, and the valid-pixel mask (None: every pixel has data)
Example = tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray | None]


@dataclass
class Tally:
    """Sums of one scoring pass over batches (device tensors until ``Evaluation.of``).

    Attributes:
        counts: (sub-heads, K, M) confusion counts of head B against the M classes.
        joints: (sub-heads, K, K) unnormalised P(z, z') at zero displacement on held-out pairs.
        loss_sum: (sub-heads,) lambda_B IID loss of head B on those pairs, summed over batches.
        batches: () the number of batches.
        predicted: (sub-heads, K) pixels (images, for clustering) per cluster of head B over
            every valid pixel, labelled or not: the cluster masses.
        between: (sub-heads, sub-heads, K, K) pixels (images) that sub-head i puts in cluster a
            and sub-head j in cluster b, over every valid pixel (i < j filled; the rest 0).
        examples: the first (image, per-sub-head prediction, target, valid) tuples, if asked.
    """

    counts: torch.Tensor
    joints: torch.Tensor
    loss_sum: torch.Tensor
    batches: torch.Tensor
    predicted: torch.Tensor
    between: torch.Tensor
    examples: list[Example] = field(default_factory=list)

    def summed(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Tally:
        """Every sum passed through ``reduce`` (``dist.all_reduce``: over the workers)."""
        sums = (self.counts, self.joints, self.loss_sum, self.batches, self.predicted)
        sums += (self.between,)
        return Tally(*(reduce(t) for t in sums), examples=self.examples)


@dataclass
class Evaluation:
    """What one evaluation pass found.

    Attributes:
        counts: (sub-heads, K, M) confusion counts of head B against the M classes.
        losses: (sub-heads,) mean lambda_B IID loss of head B on evaluation pairs.
        joints: (sub-heads, K, K) P(z, z') at zero displacement on those pairs, symmetrised and
            normalised.
        mi: (sub-heads,) I(z, z') of those joints in nats (lambda = 1: minus the loss that
            chooses).
        scores: ACC/NMI/ARI per sub-head (None for a sub-head that saw no labelled pixel).
        best: the chosen sub-head (``choose_subhead``: highest ``mi``).
        masses: (sub-heads, K) share of the valid held-out pixels in each cluster of head B.
        agreement: (sub-heads,) mean NMI of each sub-head's clustering with every other
            sub-head's on the held-out pixels (1: they partition alike; NaN with one sub-head):
            a label-free sign that a clustering is found from any initialisation.
        examples: up to ``n_examples`` (image (B, H, W), prediction (H, W), label (H, W),
            valid (H, W) or None).
    """

    counts: np.ndarray
    losses: np.ndarray
    joints: np.ndarray
    mi: np.ndarray
    scores: list[ClusterScores | None]
    best: int
    masses: np.ndarray
    agreement: np.ndarray
    examples: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = field(
        default_factory=list
    )

    @classmethod
    def of(cls, tally: Tally) -> Evaluation:
        """The scores, MI and label-free choice of a (summed) tally."""
        joints = tally.joints.cpu()
        mi = mutual_information(joints).numpy()
        best = choose_subhead(mi)
        counts = tally.counts.cpu().numpy()
        predicted = tally.predicted.cpu().numpy().astype(np.float64)
        return cls(
            counts=counts,
            losses=(tally.loss_sum / tally.batches.clamp(min=1)).cpu().numpy(),
            joints=symmetrise_normalise(joints)[0].numpy(),
            mi=mi,
            scores=[cluster_scores(c) if c.sum() else None for c in counts],
            best=best,
            masses=predicted / np.maximum(predicted.sum(axis=1, keepdims=True), 1),
            agreement=_agreement(tally.between.cpu().numpy()),
            examples=[(img, preds[best], lab, ok) for img, preds, lab, ok in tally.examples],
        )

    def summary(self) -> dict[str, float]:
        """Flat ``eval_*`` metrics of the chosen sub-head."""
        s = self.scores[self.best]
        out = {
            "eval_best_subhead": float(self.best),
            "eval_loss": float(self.losses[self.best]),
            "eval_mi": float(self.mi[self.best]),
        }
        if s is not None:
            out |= {"eval_acc": s.acc, "eval_nmi": s.nmi, "eval_ari": s.ari, "eval_miou": s.miou}
        return out


def _agreement(between: np.ndarray) -> np.ndarray:
    """(S,) mean NMI of each sub-head with the others, from ``Tally.between``."""
    s = len(between)
    nmi = np.full((s, s), np.nan)
    for i in range(s):
        for j in range(i + 1, s):
            if between[i, j].sum():
                nmi[i, j] = nmi[j, i] = nmi_from_counts(between[i, j])
    if s < 2:
        return nmi[:, 0]
    off = ~np.eye(s, dtype=bool)
    return np.array(
        [
            np.nanmean(row[mask]) if np.isfinite(row[mask]).any() else np.nan
            for row, mask in zip(nmi, off, strict=True)
        ]
    )


def choose_subhead(mi: torch.Tensor | np.ndarray) -> int:
    """The label-free answer: the sub-head with the lowest lambda = 1 loss, i.e. the highest
    I(z, z') of head B on held-out pairs.

    Not the lambda_B loss it was trained with: I_lambda = I_1 + (lambda - 1)(H(z) + H(z')), so
    with lambda_B > 1 a sub-head whose clusters are balanced but agree less across the views
    scores a lower loss (the README's Training section has a measured case).

    Args:
        mi: (sub-heads,) mutual information per sub-head.

    Returns:
        The index of the chosen sub-head.
    """
    return int(np.argmax(np.asarray(mi)))


def class_targets(lut: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Evaluated classes of stored labels (255: ignore); one per image for clustering."""
    target = lut[labels.long()]
    return target[:, 0, 0] if task == "clustering" else target  # whole images carry one class


def paired_views(
    model,
    x: torch.Tensor,
    probs: Sequence[torch.Tensor],
    pairs: PairConfig,
    task: str,
    gen,
    valid: torch.Tensor | None = None,
) -> list[View]:
    """Head B on a drawn pair of ``x``, per sub-head ``(p, q, mask)`` (``aligned_views``).

    ``probs`` is head B on ``x`` itself (the first view; with ``pairs.augment_first`` the first
    view is drawn too and head B runs on it instead); ``valid`` (n, H, W) marks the pixels
    with data (``make_pairs``).
    """
    drawn = make_pairs(x, pairs, gen, valid)
    if pairs.augment_first:  # both views drawn, as in training
        probs = model(drawn["x"], "B")
    return aligned_views(probs, model(drawn["gx"], "B"), drawn, task)


def zero_shift_joint(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None):
    """Unnormalised (K, K) P(z, z') of aligned predictions at zero displacement."""
    if mask is None:
        return p.T @ q
    return torch.einsum("nchw,ndhw->cd", p * mask.unsqueeze(1).to(p.dtype), q)


@torch.no_grad()
def score(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    cfg: Config,
    lut: torch.Tensor,
    n_classes: int,
    pairs: PairConfig,
    n_examples: int = 0,
) -> Tally:
    """Head B of every sub-head on batches of held-out tiles: the scoring loop of training and
    of ``iid evaluate``.

    Args:
        model: a SegmentationNet or ClusterNet (probabilities out), on ``lut``'s device.
        batches: ``{"x": (n, B, H, W) images in [0, 1], "label": stored label ids}`` and
            optionally ``"valid"`` (n, H, W) bool, on that device.
        cfg: the model's config (task, loss, seed).
        lut: 256-entry map from stored label ids to evaluated classes (255: ignore).
        n_classes: evaluated class count M.
        pairs: how the held-out pairs are drawn; from a generator seeded with ``run.seed``, so
            the same model always gets the same pairs (every epoch, every trial of a search).
        n_examples: how many (image, prediction, target) examples to keep.

    Returns:
        The sums over the batches.
    """
    device = lut.device
    s, k = cfg.model.n_subheads, cfg.model.n_clusters_b
    counts = torch.zeros(s, k, n_classes, dtype=torch.int64, device=device)
    joints = torch.zeros(s, k, k, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(s, device=device)
    n_batches = torch.zeros((), dtype=torch.int64, device=device)
    predicted = torch.zeros(s, k, dtype=torch.int64, device=device)
    between = torch.zeros(s, s, k, k, dtype=torch.int64, device=device)
    examples: list[Example] = []
    gen = torch.Generator(device=device).manual_seed(cfg.run.seed)
    was_training = model.training
    model.eval()
    for batch in batches:
        x, valid = batch["x"], batch.get("valid")
        target = class_targets(lut, batch["label"], cfg.model.task)
        probs = model(x, "B")
        counts += torch.stack([confusion_counts(p.argmax(1), target, k, n_classes) for p in probs])
        predicted += torch.stack([_cluster_sizes(p.argmax(1), valid, k) for p in probs])
        between += _co_clustered([p.argmax(1) for p in probs], valid, k)
        views = paired_views(model, x, probs, pairs, cfg.model.task, gen, valid)
        loss_sum += torch.stack([view_loss(v, cfg.loss.lamb_b, cfg.loss) for v in views])
        joints += torch.stack([zero_shift_joint(*v) for v in views]).double()
        n_batches += 1
        for i in range(min(n_examples - len(examples), len(x))):
            preds = [p[i].argmax(0).cpu().numpy() for p in probs]
            ok = None if valid is None or valid.ndim != 3 else valid[i].cpu().numpy()
            examples.append((x[i].cpu().numpy(), preds, target[i].cpu().numpy(), ok))
    model.train(was_training)
    return Tally(counts, joints, loss_sum, n_batches, predicted, between, examples)


def _co_clustered(preds: list[torch.Tensor], valid: torch.Tensor | None, k: int) -> torch.Tensor:
    """(S, S, K, K) ``Tally.between`` of one batch: for i < j, how often sub-head i says a and
    sub-head j says b, over the valid pixels (images): sub-head j's clusters counted as the
    classes of ``confusion_counts``."""
    s = len(preds)
    out = torch.zeros(s, s, k, k, dtype=torch.int64, device=preds[0].device)
    mask = valid if valid is not None and valid.shape == preds[0].shape else None
    for i in range(s):
        for j in range(i + 1, s):
            out[i, j] = confusion_counts(preds[i], preds[j], k, k, mask, ignore_index=-1)
    return out


def _cluster_sizes(pred: torch.Tensor, valid: torch.Tensor | None, k: int) -> torch.Tensor:
    """(K,) predictions per cluster, over the valid pixels (all when ``valid`` is None)."""
    if valid is not None and pred.ndim == valid.ndim:
        pred = pred[valid]
    return torch.bincount(pred.flatten(), minlength=k)[:k]


def evaluate_model(
    model: torch.nn.Module,
    cfg: Config,
    shards: str | Path,
    splits: Sequence[str],
    lut: np.ndarray,
    n_classes: int,
    n_examples: int = 4,
    device: str | torch.device = "cpu",
) -> Evaluation:
    """Score head B of ``model`` on the tiles of ``splits``, read on this process (no Ray).

    Args:
        model: a SegmentationNet or ClusterNet (probabilities out).
        cfg: its training config (task, pairs, loss).
        shards: prepared dataset folder.
        splits: the splits to score (labels needed; unlabelled pixels are skipped).
        lut: 256-entry map from stored label ids to evaluated classes (255: ignore).
        n_classes: evaluated class count M.
        n_examples: how many (image, prediction, label) examples to keep.
        device: where to run.

    Returns:
        The counts, losses, joints, MI, scores and the label-free choice of sub-head.
    """
    model = model.to(device).eval()
    lo, hi = cfg.data.band_lo, cfg.data.band_hi
    batches = (
        {"x": torch.from_numpy(images).to(device), "label": torch.from_numpy(labels).to(device)}
        | ({} if valid is None else {"valid": torch.from_numpy(valid).to(device)})
        for images, labels, valid in iter_tiles(shards, splits, cfg.data.batch_size, lo, hi)
    )
    lut_t = torch.as_tensor(lut, device=device)
    return Evaluation.of(score(model, batches, cfg, lut_t, n_classes, cfg.pairs, n_examples))


def evaluate_uri(
    uri: str,
    shards: str | Path,
    splits: Sequence[str] | None = None,
    merge: str | None = None,
    device: str = "cpu",
) -> tuple[Evaluation, list[str], Config]:
    """Load a model and evaluate it on prepared shards (``iid evaluate``).

    Args:
        uri: checkpoint path or MLflow model URI.
        shards: prepared dataset folder.
        splits: splits to score; default the config's evaluation split.
        merge: class merge; default the one the model was trained with.
        device: where to run.

    Returns:
        (evaluation, class names, the model's config).
    """
    model, cfg = checkpoint.load_model(uri)
    manifest = read_manifest(shards)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=str(shards)))
    check_data(cfg, manifest, training=False)
    lut, classes = label_lut(manifest, cfg.data.merge if merge is None else merge)
    splits = list(splits or [cfg.data.eval_split])
    ev = evaluate_model(model, cfg, shards, splits, lut, len(classes), device=device)
    return ev, classes, cfg


def format_evaluation(ev: Evaluation, classes: Sequence[str]) -> str:
    """A small table: one line per sub-head, the chosen one marked."""
    lines = [
        f"classes: {', '.join(classes)}",
        "sub-head  loss      MI      ACC    mIoU   NMI    ARI",
    ]
    for i, s in enumerate(ev.scores):
        mark = "  <- highest MI (lowest lambda=1 loss)" if i == ev.best else ""
        head = f"{i:>8}  {ev.losses[i]:8.4f}  {ev.mi[i]:.4f}"
        if s is None:
            lines.append(f"{head}  (no labelled pixels){mark}")
        else:
            lines.append(f"{head}  {s.acc:.3f}  {s.miou:.3f}  {s.nmi:.3f}  {s.ari:.3f}{mark}")
    if (s := ev.scores[ev.best]) is not None and len(s.iou) == len(classes):
        per_class = ", ".join(f"{c} {v:.3f}" for c, v in zip(classes, s.iou, strict=True))
        lines.append(f"IoU per class, sub-head {ev.best}: {per_class}")
    if ev.scores[ev.best] is not None:  # what `iid segment` names the clusters by default
        names = matched_names(ev.counts[ev.best], classes)
        pairs = ", ".join(f"{k} -> {n or '(none)'}" for k, n in enumerate(names))
        lines.append(f"clusters of sub-head {ev.best} matched to classes: {pairs}")
    return "\n".join(lines)
