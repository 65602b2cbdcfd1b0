"""Pair generation speed for 200x200 RGBIR tiles with colour jitter, flip and affine.

Prints pairs per second per CPU core for the bare transform (one thread) and end to end through
the Ray Data actor pool (read Parquet shards -> PairMaker actors -> batches at the consumer).

    .venv/bin/python bench/pairs.py
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import augment
from pipeline.augment import make_pairs, make_pairs_u8, spatial_matrices, warp
from pipeline.config import PairConfig
from pipeline.data.format import dataset_files, read_manifest
from pipeline.data.pairs import keep_freed_memory, pair_dataset
from pipeline.loopback import start_local
from pipeline.prepare.folder import prepare_folder
from pipeline.prepare.run import TilingOptions

CFG = PairConfig(affine=True, flip=True, strength=1.0)


def _median_rate(step, n_batches: int, batch: int, rounds: int) -> float:
    """Pairs per second of ``step()`` (one batch), median over ``rounds`` timed rounds: this
    machine's neighbours make single rounds vary by up to 30%."""
    step()  # warm-up
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n_batches):
            step()
        rates.append(n_batches * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def bare(n_batches: int, batch: int, cfg: PairConfig = CFG, rounds: int = 5) -> float:
    """The actors' transform: 8-bit tiles through ``make_pairs_u8`` (OpenCV), 1 thread."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    raw = np.random.default_rng(0).integers(0, 256, (batch, 4, 200, 200), dtype=np.uint8)
    return _median_rate(lambda: make_pairs_u8(raw, cfg, gen), n_batches, batch, rounds)


def bare_float(n_batches: int, batch: int, cfg: PairConfig = CFG, rounds: int = 5) -> float:
    """``make_pairs`` on float32 CPU tensors (the GPU path's code, run on CPU), 1 thread."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 4, 200, 200)
    return _median_rate(lambda: make_pairs(x, cfg, gen), n_batches, batch, rounds)


def resample_only(n_batches: int, batch: int, kernel: str, rounds: int = 5) -> float:
    """The bilinear warp alone, with OpenCV (the CPU path) or grid_sample (the GPU path's)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 4, 200, 200)
    theta = spatial_matrices(batch, CFG, gen, "cpu")
    if kernel == "grid_sample":

        def step():
            u, v = augment._coords(theta, 200, 200)
            F.grid_sample(x, torch.stack([u, v], -1), align_corners=False)

    else:

        def step():
            warp(x, theta)

    return _median_rate(step, n_batches, batch, rounds)


def end_to_end(
    work: Path, tiles_side: int, actors: int, batch: int, passes: int
) -> tuple[float, int, list[float]]:
    import rasterio
    import ray

    src = work / "imagery"
    src.mkdir(parents=True)
    size = tiles_side * 200
    rng = np.random.default_rng(0)
    with rasterio.open(
        src / "scene.tif", "w", driver="GTiff", height=size, width=size, count=4, dtype="uint8"
    ) as dst:
        dst.write(rng.integers(0, 255, (4, size, size), dtype=np.uint8))
    shards = work / "shards"
    prepare_folder(
        src, shards, TilingOptions(tile=200, stride=200, progress=False, rows_per_shard=64)
    )
    start_local(dashboard=False, num_cpus=os.cpu_count() * 2, log_to_driver=False)
    try:
        ds = pair_dataset(
            dataset_files(shards, read_manifest(shards), ["unlabelled"]),
            CFG,
            actors=actors,
            batch_size=batch,
            num_cpus=0.5,
        )
        # Steady state: the clock starts once the first batch has arrived (actors started,
        # torch imported); rows after it are counted. Each pass runs the whole pipeline again
        # (as every training epoch does); single passes vary by up to 40% here: the median.
        rates, rows = [], 0
        for _ in range(passes):
            start, rows = None, 0
            for b in ds.iter_batches(batch_size=batch, batch_format="numpy"):
                if start is None:
                    start = time.perf_counter()
                    continue
                rows += len(b["x"])
            rates.append(rows / (time.perf_counter() - start))
        return statistics.median(rates), rows, rates
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8, help="batches for the bare transform")
    ap.add_argument("--tiles-side", type=int, default=60, help="end to end: side^2 tiles")
    ap.add_argument("--actors", type=int, default=os.cpu_count())
    ap.add_argument("--passes", type=int, default=3, help="end to end: passes over the tiles")
    args = ap.parse_args()
    cores = os.cpu_count()
    default_malloc = bare_float(args.batches, args.batch)
    # What every PairMaker actor does at start-up (see keep_freed_memory):
    kept = keep_freed_memory()
    bare_rate = bare(args.batches, args.batch)
    float_rate = bare_float(args.batches, args.batch)
    no_affine = bare_float(args.batches, args.batch, PairConfig(affine=False))
    warp_rate = resample_only(args.batches, args.batch, "opencv")
    grid_rate = resample_only(args.batches, args.batch, "grid_sample")
    with tempfile.TemporaryDirectory() as tmp:
        e2e_rate, rows, rates = end_to_end(
            Path(tmp), args.tiles_side, args.actors, args.batch, args.passes
        )
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"transform: colour jitter (YIQ/HSV) + affine + flip, 200x200 RGBIR, batch {args.batch}, "
        f"torch {torch.__version__}"
    )
    print(
        f"bare transform as in the actors (8-bit tiles, make_pairs_u8, OpenCV), 1 thread, "
        f"median of 5 rounds: {bare_rate:7.0f} pairs/s per core"
    )
    print(f"  make_pairs on float32 (the GPU path's code, on CPU): {float_rate:7.0f} pairs/s")
    print(
        f"  same, before keep_freed_memory (glibc returning freed blocks; took: {kept}): "
        f"{default_malloc:7.0f}"
    )
    print(f"  same without the affine (jitter + flip): {no_affine:7.0f} pairs/s per core")
    print(f"  bilinear warp alone, OpenCV (CPU path): {warp_rate:7.0f} pairs/s per core")
    print(f"  bilinear warp alone, grid_sample (GPU path's kernel): {grid_rate:7.0f}")
    print(
        f"Ray Data actor pool ({args.actors} actors, {rows} tiles from Parquet, median of "
        f"{len(rates)} passes): {e2e_rate:7.0f} pairs/s = {e2e_rate / cores:.0f} per core on "
        f"{cores} cores (passes: {', '.join(f'{r:.0f}' for r in rates)})"
    )


if __name__ == "__main__":
    main()
