"""Training throughput: the Ray Train pipeline against a bare single-process PyTorch loop.

Both run the same per-step code (``pipeline.train.train_epoch_head``: pairs drawn with
``make_pairs``, head A pass then head B pass, Adam) on the same model and the same tiles; the
bare loop holds the tiles in memory and has no Ray, DDP or Ray Data. Ray's figure is the steady
state (epochs after the first, from the per-phase timings each epoch reports), and the
end-to-end wall time including cluster and worker start-up is printed beside it.

It measures each model size twice: with every core training, and with one core left free. With
every core in the training threads, Ray's own processes (GCS, raylet, the Train controller, Ray
Data's split coordinators and stats actor: 9-13% of a core together while a worker trains,
measured on 2 cores) can only run by taking a core from a training thread, and every operator's
thread barrier then waits for it. The second setting shows what the pipeline itself costs.

Ray's cost per step (fetching a batch, starting a data pass, those barrier waits) grows far more
slowly than the step's compute, so its share shrinks as the model grows. The default sizes are
the demo's model (width 0.25, 64 px crops: ~0.1 s a step on 2 cores) and one with ~7x its
compute per pair (width 0.5, 96 px crops), still far below the published configs (width 1,
200 px crops, batch 75).

    python bench/throughput.py                      # generated scene, both sizes
    python bench/throughput.py --epochs 4 --sizes 0.25x64
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.augment import random_crops
from pipeline.checkpoint import CHECKPOINT_FILE
from pipeline.config import Config
from pipeline.data.read import iter_tiles
from pipeline.loopback import start_local
from pipeline.models import build_model
from pipeline.prepare.run import TilingOptions
from pipeline.prepare.synthetic import SceneSpec, prepare_synthetic
from pipeline.train import fit, train_epoch_head


def config(
    shards: Path, work: Path, args, size: tuple[float, int], workers: int, cores: int, name: str
) -> Config:
    return Config.from_dict(
        {
            "data": {
                "shards": str(shards),
                "batch_size": args.batch,
                "merge": "potsdam3",
                "pairs_on": "worker",
            },
            "model": {"n_clusters_a": 9, "n_clusters_b": 3, "n_subheads": 2, "width": size[0]},
            "loss": {"lamb_a": 1.0, "lamb_b": 1.5, "half_window": 5},
            "optim": {"lr": 1e-3, "epochs": args.epochs},
            "pairs": {"crop": size[1]},
            "scaling": {"num_workers": workers, "cpus_per_worker": cores / workers},
            "run": {
                "name": name,
                "storage_path": str(work / "runs"),
                "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
                "experiment": "bench",
            },
        }
    )


class InMemoryTiles:
    """Tiles held in memory, shuffled and randomly cropped every pass."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, crop: int, batch: int):
        self.images, self.labels, self.crop, self.batch = images, labels, crop, batch
        self.rng = np.random.default_rng(0)

    def batches(self):
        order = self.rng.permutation(len(self.images))
        for i in range(0, len(order), self.batch):
            idx = order[i : i + self.batch]
            x, y, _ = random_crops(self.images[idx], self.labels[idx], self.crop, self.rng)
            yield {"x": torch.from_numpy(np.ascontiguousarray(x)), "label": torch.from_numpy(y)}


def bare(cfg: Config, shards: Path, threads: int) -> tuple[float, int]:
    """Pairs per second of the same loop without Ray, after one warm-up epoch."""
    torch.set_num_threads(threads)
    tiles = list(iter_tiles(shards, ["train"], 256))
    images = np.concatenate([t[0] for t in tiles])
    labels = np.concatenate([t[1] for t in tiles])
    tiles = InMemoryTiles(images, labels, cfg.pairs.crop, cfg.data.batch_size)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    gen = torch.Generator().manual_seed(0)
    dev = torch.device("cpu")
    seconds = 0.0
    for epoch in range(cfg.optim.epochs):
        start = time.perf_counter()
        for head, lamb in (("A", cfg.loss.lamb_a), ("B", cfg.loss.lamb_b)):
            train_epoch_head(model, opt, tiles.batches(), head, lamb, cfg, dev, epoch, gen)
        if epoch > 0:
            seconds += time.perf_counter() - start
    return 2 * len(images) * (cfg.optim.epochs - 1) / seconds, len(images)


def with_ray(cfg: Config, n_tiles: int) -> tuple[float, float]:
    """(steady-state pairs/s from the epochs' own timings, end-to-end pairs/s with start-up)."""
    start = time.perf_counter()
    result = fit(cfg)
    wall = time.perf_counter() - start
    state = torch.load(Path(result.checkpoint.path) / CHECKPOINT_FILE, weights_only=False)
    steady = [h["seconds_head_a"] + h["seconds_head_b"] for h in state["history"][1:]]
    pairs = 2 * n_tiles
    return pairs * len(steady) / sum(steady), pairs * cfg.optim.epochs / wall


def parse_sizes(text: str) -> list[tuple[float, int]]:
    """``"0.25x64,0.5x96"`` -> ``[(0.25, 64), (0.5, 96)]`` (model.width, pairs.crop)."""
    sizes = []
    for part in text.split(","):
        width, _, crop = part.strip().partition("x")
        try:
            sizes.append((float(width), int(crop)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not WIDTHxCROP, e.g. 0.25x64") from None
    return sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5, help="epochs per run (first one is warm-up)")
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes("0.25x64,0.5x96"),
        help="model sizes as WIDTHxCROP (model.width, pairs.crop), comma-separated",
    )
    p.add_argument("--batch", type=int, default=8, help="data.batch_size per worker")
    p.add_argument("--size", type=int, default=1024, help="generated scene side (pixels)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="cores for training")
    args = p.parse_args()
    import ray

    # (size, training threads, pipeline, pairs/s, pairs/s incl. start-up); bare first in a group
    rows: list[tuple[str, int, str, float, float | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        opts = TilingOptions(tile=128, stride=128, progress=False, test_fraction=0.1)
        prepare_synthetic(work / "data", opts, SceneSpec(size=args.size, seed=3), baselines=False)
        shards = work / "data" / "shards"
        start_local(num_cpus=max(4, args.cores), log_to_driver=False)  # as `iid train` does
        for size in args.sizes:
            tag = f"{size[0]:g}x{size[1]}"
            for cores in sorted({args.cores, max(1, args.cores - 1)}, reverse=True):
                cfg1 = config(shards, work, args, size, 1, cores, f"w1-c{cores}-{tag}")
                rate, n_tiles = bare(cfg1, shards, cores)
                rows.append((tag, cores, "bare PyTorch, 1 process", rate, None))
                rows.append((tag, cores, "Ray Train, 1 worker", *with_ray(cfg1, n_tiles)))
                if cores == args.cores:
                    cfg2 = config(shards, work, args, size, 2, cores, f"w2-c{cores}-{tag}")
                    ray2 = with_ray(cfg2, n_tiles)
                    rows.append((tag, cores, "Ray Train, 2 workers (DDP)", *ray2))
        ray.shutdown()
    print(
        f"\n{n_tiles} training tiles, batch {args.batch}/worker, {args.epochs} epochs, "
        f"{os.cpu_count()} cores on this machine"
    )
    head = f"{'width x crop':>12}{'threads':>9}  {'pipeline':<28}{'pairs/s':>10}{'vs bare':>9}"
    print(head + f"{'pairs/s incl. start-up':>25}")
    for tag, cores, name, rate, wall in rows:
        if wall is None:
            base = rate
        print(
            f"{tag:>12}{cores:>9}  {name:<28}{rate:>10.1f}{rate / base:>9.2f}"
            + (f"{wall:>25.1f}" if wall is not None else "")
        )
    print(
        "width x crop: model.width and pairs.crop; threads: torch threads of the bare loop, the "
        "CPUs (and threads) of the Ray run in all; a core left free runs Ray's own processes"
    )
    print("goal: Ray 1 worker >= 0.9 of bare")
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))


if __name__ == "__main__":
    main()
