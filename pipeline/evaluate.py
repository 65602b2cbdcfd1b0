"""Evaluation: a trained model against labelled shards, with the field's protocol.

Head B of every sub-head is scored by streamed confusion counts (never all predictions): ACC with
Hungarian one-to-one matching, NMI, ARI. The model's answer is the sub-head with the lowest
lambda = 1 IID loss, -I(z, z'), on pairs drawn from the evaluation tiles: a label-free choice, as
in the paper (see ``choose_subhead`` for why not the lambda_B loss). The joint P(z, z') of that
sub-head and a few examples are kept for the plots of ``pipeline.track``.

Runs in one process without Ray: scoring one model fits a laptop, and ``iid evaluate`` then works
on a checkpoint copied off a cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.config import Config, ConfigError
from pipeline.losses import (
    iid_clustering_loss,
    iid_segmentation_loss,
    mutual_information,
    symmetrise_normalise,
)
from pipeline.metrics import ClusterScores, cluster_scores
from pipeline.pairs import PairConfig, decode_batch, make_pairs, undo
from pipeline.prepare.shards import PrepareError, read_manifest

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Evaluation:
    """What one evaluation pass found.

    Attributes:
        counts: (sub-heads, K, M) confusion counts of head B against the M classes.
        losses: (sub-heads,) mean lambda_B IID loss of head B on evaluation pairs.
        joints: (sub-heads, K, K) P(z, z') at zero displacement on those pairs.
        mi: (sub-heads,) I(z, z') of those joints in nats (lambda = 1: minus the loss that
            chooses).
        scores: ACC/NMI/ARI per sub-head (None for a sub-head that saw no labelled pixel).
        best: the chosen sub-head (``choose_subhead``: highest ``mi``).
        examples: up to ``n_examples`` (image (B, H, W), prediction (H, W), label (H, W)).
    """

    counts: np.ndarray
    losses: np.ndarray
    joints: np.ndarray
    mi: np.ndarray
    scores: list[ClusterScores | None]
    best: int
    examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Flat ``eval_*`` metrics of the chosen sub-head."""
        s = self.scores[self.best]
        out = {
            "eval_best_subhead": float(self.best),
            "eval_loss": float(self.losses[self.best]),
            "eval_mi": float(self.mi[self.best]),
        }
        if s is not None:
            out |= {"eval_acc": s.acc, "eval_nmi": s.nmi, "eval_ari": s.ari}
        return out


# --------------------------------------------------------------------------------- loading
def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict of a checkpoint file, a checkpoint directory, or a run directory
    (its newest ``checkpoint_*``); local, or a storage URI (``s3://bucket/runs/NAME``).

    Raises:
        ConfigError: when no checkpoint is found there.
    """
    path = str(path)
    if storage.is_dir(path):
        if storage.is_file(storage.join(path, CHECKPOINT_FILE)):
            path = storage.join(path, CHECKPOINT_FILE)
        else:
            # Ray Train numbers checkpoints in order: checkpoint_000009 is the newest.
            found = [
                storage.join(d, CHECKPOINT_FILE)
                for d in storage.list_dirs(path, "checkpoint_")
                if storage.is_file(storage.join(d, CHECKPOINT_FILE))
            ]
            if not found:
                raise ConfigError(
                    f"--model: no {CHECKPOINT_FILE} in {path} or its checkpoint_* dirs"
                )
            path = found[-1]
    try:
        with storage.open_input(path) as f:
            return torch.load(f, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ConfigError(f"--model: {path} is not a readable checkpoint ({err})") from err


def load_model(uri: str) -> tuple[torch.nn.Module, Config]:
    """A model and its training config from a checkpoint path or an MLflow model URI
    (``models:/name/3``, ``runs:/<id>/model``; the tracking URI comes from the environment).

    Raises:
        ConfigError: when the URI names neither, or the model carries no config.
    """
    from pipeline.train import build_model

    if storage.is_uri(uri) or Path(uri).exists():
        state = load_checkpoint(uri)
        cfg = Config.from_dict(state["config"])
        model = build_model(cfg)
        model.load_state_dict(state["model"])
        return model.eval(), cfg
    if ":/" not in uri:
        raise ConfigError(f"--model: {uri!r} is neither a checkpoint path nor an MLflow model URI")
    import mlflow.pytorch

    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for a bad URI
        raise ConfigError(f"--model: cannot load {uri} ({str(err).splitlines()[0][:200]})") from err
    if not hasattr(model, "iid_config"):
        raise ConfigError(f"--model: {uri} was not logged by this pipeline (no iid_config)")
    return model.eval(), Config.from_dict(model.iid_config)


# ------------------------------------------------------------------------------ the data
def iter_tiles(
    shards: str | Path, splits: Sequence[str], batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) batches read straight from the Parquet shards of ``splits``.

    Raises:
        PrepareError: when none of the splits has a shard.
    """
    files = [f for s in splits for f in storage.list_files(storage.join(shards, s), ".parquet")]
    if not files:
        raise PrepareError(f"{shards}: no shards in split(s) {list(splits)}")
    for f in files:
        with storage.open_input(f) as src:
            for rb in pq.ParquetFile(src).iter_batches(batch_size=batch_size):
                yield decode_batch(rb.to_pydict())


# ---------------------------------------------------------------------------- evaluation
def choose_subhead(mi: torch.Tensor | np.ndarray) -> int:
    """The label-free answer: the sub-head with the lowest lambda = 1 loss, i.e. the highest
    I(z, z') of head B on held-out pairs.

    Not the lambda_B loss it was trained with: I_lambda = I_1 + (lambda - 1)(H(z) + H(z')), so
    with lambda_B > 1 a sub-head whose clusters are balanced but agree less across the views
    scores a lower loss. On potsdam-mini P3 that rule picked the worst of 4 sub-heads, while I_1
    ranked them as their accuracy did (README, "Quality").

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


def batch_counts(probs: Sequence[torch.Tensor], target: torch.Tensor, n_classes: int):
    """(sub-heads, K*M) confusion counts of one batch; ``target`` 255 where unknown."""
    keep = target != 255
    rows = []
    for p in probs:
        flat = p.argmax(1)[keep] * n_classes + target[keep]
        rows.append(torch.bincount(flat, minlength=p.shape[1] * n_classes))
    return torch.stack(rows)


def paired_views(
    model, x: torch.Tensor, probs: Sequence[torch.Tensor], pairs: PairConfig, task: str, gen
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Head B on a drawn pair of ``x``, per sub-head ``(p, q, mask)``.

    ``probs`` is head B on ``x`` itself (the first view; with ``pairs.augment_first`` the first
    view is drawn too and head B runs on it instead); ``q`` is head B on g(x), warped back
    onto x's pixel grid for dense predictions, where ``mask`` marks the pixels seen by both
    views (None for whole-image clustering).
    """
    drawn = make_pairs(x, pairs, gen)
    if pairs.augment_first:  # both views drawn, as in training
        probs = model(drawn["x"], "B")
    out = []
    for p, q in zip(probs, model(drawn["gx"], "B"), strict=True):
        if task == "segmentation":
            q, _ = undo(q, drawn["inverse"])
            out.append((p, q, drawn["mask"]))
        else:
            out.append((p, q, None))
    return out


def zero_shift_joint(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None):
    """Unnormalised (K, K) P(z, z') of aligned predictions at zero displacement."""
    if mask is None:
        return p.T @ q
    return torch.einsum("nchw,ndhw->cd", p * mask.unsqueeze(1).to(p.dtype), q)


def _view_loss(p, q, mask, cfg: Config) -> torch.Tensor:
    if mask is None:
        return iid_clustering_loss(p, q, cfg.loss.lamb_b).loss
    t = min(cfg.loss.half_window, min(p.shape[-2:]) - 1)
    return iid_segmentation_loss(p, q, mask, cfg.loss.lamb_b, t).loss


@torch.no_grad()
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
    """Score head B of ``model`` on the tiles of ``splits``.

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
    lut_t = torch.as_tensor(lut, device=device)
    s, k = cfg.model.n_subheads, cfg.model.n_clusters_b
    counts = torch.zeros(s, k * n_classes, dtype=torch.int64, device=device)
    joints = torch.zeros(s, k, k, dtype=torch.float64, device=device)
    loss_sum, batches, examples = torch.zeros(s, device=device), 0, []
    # A fixed generator: the same model always gets the same pairs, so the choice is stable.
    gen = torch.Generator(device=device).manual_seed(cfg.run.seed)
    for images, labels in iter_tiles(shards, splits, cfg.data.batch_size):
        x = torch.from_numpy(images).to(device)
        target = class_targets(lut_t, torch.from_numpy(labels).to(device), cfg.model.task)
        probs = model(x, "B")
        counts += batch_counts(probs, target, n_classes)
        views = paired_views(model, x, probs, cfg.pairs, cfg.model.task, gen)
        loss_sum += torch.stack([_view_loss(*v, cfg) for v in views])
        joints += torch.stack([zero_shift_joint(*v) for v in views]).double()
        batches += 1
        for i in range(min(n_examples - len(examples), len(x))):
            preds = [p[i].argmax(0).cpu().numpy() for p in probs]  # every sub-head's, for now
            examples.append((images[i], preds, target[i].cpu().numpy()))
    losses = (loss_sum / max(batches, 1)).cpu().numpy()
    joints = joints.cpu()
    mi = mutual_information(joints).numpy()
    best = choose_subhead(mi)
    examples = [(img, preds[best], lab) for img, preds, lab in examples]
    counts_np = counts.view(s, k, n_classes).cpu().numpy()
    scores = [cluster_scores(c) if c.sum() else None for c in counts_np]
    return Evaluation(
        counts=counts_np,
        losses=losses,
        joints=symmetrise_normalise(joints)[0].numpy(),
        mi=mi,
        scores=scores,
        best=best,
        examples=examples,
    )


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
    from pipeline.train import check_data, label_lut

    model, cfg = load_model(uri)
    manifest = read_manifest(shards)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=str(shards)))
    check_data(cfg, manifest, require_eval=False)
    lut, classes = label_lut(manifest, cfg.data.merge if merge is None else merge)
    splits = list(splits or [cfg.data.eval_split])
    ev = evaluate_model(model, cfg, shards, splits, lut, len(classes), device=device)
    return ev, classes, cfg


def format_evaluation(ev: Evaluation, classes: Sequence[str]) -> str:
    """A small table: one line per sub-head, the chosen one marked."""
    lines = [f"classes: {', '.join(classes)}", "sub-head  loss      MI      ACC    NMI    ARI"]
    for i, s in enumerate(ev.scores):
        mark = "  <- highest MI (lowest lambda=1 loss)" if i == ev.best else ""
        head = f"{i:>8}  {ev.losses[i]:8.4f}  {ev.mi[i]:.4f}"
        if s is None:
            lines.append(f"{head}  (no labelled pixels){mark}")
        else:
            lines.append(f"{head}  {s.acc:.3f}  {s.nmi:.3f}  {s.ari:.3f}{mark}")
    return "\n".join(lines)
