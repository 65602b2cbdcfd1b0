"""The demo job: IID end to end on data that needs no download.

A Ray-free smoke check: it clusters scikit-learn's digits (shipped inside the package, 1797 8x8
images) with the IID clustering loss, the pair stage's ``make_pairs``, the two-head schedule and
sub-heads in one process, and evaluates with the field's protocol against k-means on raw pixels.
``make demo`` runs the full job (Ray Train, MLflow) on the generated scene instead.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from pipeline.augment import make_pairs
from pipeline.config import Config, PairConfig
from pipeline.evaluate import Evaluation, choose_subhead, score
from pipeline.losses import iid_clustering_loss
from pipeline.metrics import ConfusionAccumulator, cluster_scores
from pipeline.models import ClusterNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DigitsDemoConfig:
    epochs: int = 40
    batch: int = 100
    repeats: int = 1  # augmented pairs per image per step, as the reference's "num_dataloaders"
    lr: float = 3e-3
    lamb_a: float = 2.0
    lamb_b: float = 2.0
    n_clusters_a: int = 50
    n_subheads: int = 5
    seed: int = 0


# g for 8x8 digits, shared with bench/quality.py's digits run. Digits are not mirror-symmetric:
# no flip, no colour. Small rotations, zooms and shifts plus pixel noise, so that the two views
# never match pixel for pixel; both views drawn, as the reference's clustering pairs are.
DIGITS_PAIRS = PairConfig(
    flip=False,
    affine=True,
    rgb_bands=(),
    rotation=15.0,
    shear=0.0,
    scale=0.1,
    shift=0.12,
    noise=0.1,
    augment_first=True,
)


def _evaluate(net: ClusterNet, cfg: DigitsDemoConfig, x: torch.Tensor, y: torch.Tensor):
    """Every sub-head's scores on the whole set, by the scoring loop of training and ``iid
    evaluate`` (its held-out MI goes unused: the demo chooses by the last training pass)."""
    run = Config.from_dict(
        {
            "data": {"shards": "", "batch_size": cfg.batch},
            "model": {"task": "clustering", "in_channels": 1, "n_clusters_b": 10}
            | {"n_clusters_a": cfg.n_clusters_a, "n_subheads": cfg.n_subheads},
            "loss": {"lamb_b": cfg.lamb_b},
            "run": {"seed": cfg.seed},
        }
    )
    labels = y.view(-1, 1, 1).expand(-1, *x.shape[-2:])  # a whole image carries its class
    batches = [
        {"x": x[i : i + cfg.batch], "label": labels[i : i + cfg.batch]}
        for i in range(0, len(x), cfg.batch)
    ]
    identity = torch.arange(256)  # stored label id = class
    return Evaluation.of(score(net, batches, run, identity, 10, DIGITS_PAIRS)).scores


def run_digits_demo(out: Path, cfg: DigitsDemoConfig = DigitsDemoConfig()) -> dict:
    """Train IID on digits, evaluate, write ``out/demo_metrics.json``, return the summary.

    Args:
        out: output folder (created).
        cfg: demo hyperparameters.

    Returns:
        dict with the chosen sub-head's scores, the k-means baseline and timings.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    net = ClusterNet(1, n_clusters_a=cfg.n_clusters_a, n_clusters_b=10, n_subheads=cfg.n_subheads)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    start = time.perf_counter()
    head_mi = torch.zeros(cfg.n_subheads)  # summed lambda=1 MI of the last pass, per sub-head
    for epoch in range(cfg.epochs):
        # Two-head schedule: a pass of head A (overclustering), then a pass of head B.
        for head, lamb in (("A", cfg.lamb_a), ("B", cfg.lamb_b)):
            order = torch.randperm(len(x), generator=gen)
            head_mi.zero_()
            for i in range(0, len(x), cfg.batch):
                batch = x[order[i : i + cfg.batch]].repeat(cfg.repeats, 1, 1, 1)
                pair = make_pairs(batch, DIGITS_PAIRS, gen)
                outs = zip(net(pair["x"], head), net(pair["gx"], head), strict=True)
                results = [iid_clustering_loss(p, q, lamb) for p, q in outs]
                opt.zero_grad()
                torch.stack([r.loss for r in results]).mean().backward()  # sub-heads averaged
                opt.step()
                head_mi += torch.stack([r.mi for r in results])
        log.info("epoch %d: head B MI %s", epoch, [round(v, 3) for v in head_mi.tolist()])
    train_s = time.perf_counter() - start

    # Label-free choice: the highest MI (lowest lambda=1 loss) in the last head-B pass.
    best = choose_subhead(head_mi)
    scores = _evaluate(net, cfg, x, y)
    kmeans = KMeans(10, n_init=10, random_state=cfg.seed).fit_predict(x.flatten(1).numpy())
    km_acc = ConfusionAccumulator(10, 10)
    km_acc.update(torch.from_numpy(kmeans), y)
    km = cluster_scores(km_acc.counts)
    summary = {
        "dataset": "sklearn digits (1797 images, 10 classes)",
        "config": asdict(cfg),
        "iid_chosen_subhead": best,
        "iid": {"acc": scores[best].acc, "nmi": scores[best].nmi, "ari": scores[best].ari},
        "iid_all_subheads_acc": [s.acc for s in scores],
        "kmeans_on_pixels": {"acc": km.acc, "nmi": km.nmi, "ari": km.ari},
        "train_seconds": round(train_s, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "demo_metrics.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "demo_metrics.json")
    return summary


def format_summary(summary: dict) -> str:
    iid, km = summary["iid"], summary["kmeans_on_pixels"]
    rows = [
        f"dataset: {summary['dataset']}",
        f"{'method':<34}{'ACC':>7}{'NMI':>7}{'ARI':>7}",
        f"{'IID (highest-MI sub-head ' + str(summary['iid_chosen_subhead']) + ')':<34}"
        f"{iid['acc']:>7.3f}{iid['nmi']:>7.3f}{iid['ari']:>7.3f}",
        f"{'k-means on raw pixels':<34}{km['acc']:>7.3f}{km['nmi']:>7.3f}{km['ari']:>7.3f}",
        "all sub-heads ACC: " + ", ".join(f"{a:.3f}" for a in summary["iid_all_subheads_acc"]),
        f"training took {summary['train_seconds']} s",
    ]
    return "\n".join(rows)
