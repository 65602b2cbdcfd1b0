"""Reading prepared shards: the files of a split, batches of tiles on the driver (no Ray), the
training and evaluation datasets of a Ray Train run, and a worker's batches of its share.

Training rows are dealt out to the workers afresh every pass (``rows`` with a seed) and shuffled
within each worker's share (``shard_batches``); evaluation rows keep their stored order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.augment import random_crops
from pipeline.config import Config
from pipeline.data.format import (
    PrepareError,
    dataset_files,
    decode_batch,
    from_wire,
    read_manifest,
)

# Ray is imported inside the functions that use it, so importing this module does not load it.
if TYPE_CHECKING:
    from ray.data import Dataset, RandomSeedConfig

# Shards up to this size are read by the driver itself when they are to be materialised anyway.
SMALL_SHARDS_BYTES = 256 * 2**20

# Rows per block of a training table held in the object store: the unit that is dealt out to
# the workers anew each pass.
DEAL_ROWS = 16


def iter_tiles(
    shards: str | Path,
    splits: Sequence[str],
    batch_size: int,
    lo: Sequence[float] = (),
    hi: Sequence[float] = (),
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(images, labels, valid) batches read straight from the Parquet shards that the manifest
    lists for ``splits`` (one file at a time, in stored order; ``decode_batch``'s arrays, with
    the stretch ``lo``, ``hi``).

    Raises:
        PrepareError: no readable manifest, a listed shard missing or unreadable, or no shard
            in any of the splits.
    """
    files = dataset_files(shards, read_manifest(shards), splits)
    if not files:
        raise PrepareError(f"{shards}: no shards in split(s) {list(splits)}")
    for f in files:
        with storage.open_input(f) as src:
            for rb in pq.ParquetFile(src).iter_batches(batch_size=batch_size):
                yield decode_batch(rb.to_pydict(), lo, hi)


def parquet_rows(files: list[str], concurrency: int | None = None) -> Dataset:
    """The rows of the shard ``files`` (``dataset_files``) as a streaming Ray Dataset.

    A quarter CPU per read task: with the workers' reservations (and a stopped Tune trial's not
    yet released) a whole CPU may never come free on a small machine, and the read would wait.
    ``concurrency`` caps the read tasks (the pair stage: one per actor, as each task's worker
    process costs ~1 CPU-second to start).
    """
    import ray.data

    return ray.data.read_parquet(files, num_cpus=0.25, concurrency=concurrency)


def rows(files: list[str], materialize: bool, deal_seed: int | None = None) -> Dataset:
    """Raw rows of the shard ``files`` (``dataset_files``) as a Ray Dataset; materialised,
    every pass after the first costs a fraction of a second instead of a new read-and-decode
    pipeline (~5 s on 2 cores).

    With ``deal_seed`` (training), every pass deals the rows out to the workers afresh: the
    rows are put in a random order once (seeded), cut into blocks of ``DEAL_ROWS``, and the
    block order is drawn anew per pass from ``deal_seed``. Otherwise a split hands each worker
    the same contiguous part of the shards every pass: a fixed spatial part of the scene per
    worker, whose batch norm statistics then differ by region (the README's figures).
    A stream too large to materialise keeps the shards' order.
    """
    import ray.data

    if materialize:
        table = _small_table(files)
        if table is not None:
            # Straight into the object store: no list/footer/read tasks, whose processes cost
            # ~10 s of start-up per run on a small machine for a few MB of tiles.
            if deal_seed is None:
                return ray.data.from_arrow(table)
            table = table.take(np.random.default_rng(deal_seed).permutation(len(table)))
            blocks = [table.slice(i, DEAL_ROWS) for i in range(0, len(table), DEAL_ROWS)]
            return ray.data.from_arrow(blocks).randomize_block_order(seed=_pass_seed(deal_seed))
    ds = parquet_rows(files)
    if not materialize:
        return ds
    ds = ds.materialize()
    return ds if deal_seed is None else ds.randomize_block_order(seed=_pass_seed(deal_seed))


def _pass_seed(seed: int) -> RandomSeedConfig:
    """A block order seeded from ``seed`` and new on every pass (Ray Data counts the passes,
    its ``execution_idx``), so a run repeats exactly with the same ``run.seed``. A bare
    int would give every pass the same order; no seed, a new order every run."""
    from ray.data import RandomSeedConfig

    return RandomSeedConfig(seed=seed, reseed_after_execution=True)


def _small_table(files: list[str]):
    """The rows of ``files`` as one Arrow table, or None above the size limit."""
    import pyarrow as pa

    if not files or sum(storage.size(f) for f in files) > SMALL_SHARDS_BYTES:
        return None
    tables = []
    for f in files:
        with storage.open_input(f) as src:
            tables.append(pq.read_table(src))
    return pa.concat_tables(tables)


def shard_batches(
    shard,
    cfg: Config,
    device: torch.device,
    rng: np.random.Generator,
    crop: int,
    pairs_ready: bool = False,
    shuffle: bool = False,
    part: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of this worker's shard on ``device``.

    With ``pairs_ready`` (``data.pairs_on: actors``) they are finished pairs from the actor pool.
    Otherwise the shard holds raw shard rows (usually materialised in the object store: read
    once, not re-read and re-decoded every pass), decoded and randomly cropped here (with
    ``valid`` where some pixel has no data); the pairs are then drawn on the device by the
    caller. ``shuffle`` mixes rows in a buffer of
    ``data.shuffle_buffer`` rows, seeded from ``rng``. ``part`` ``(i, n)`` keeps every n-th
    batch from the i-th (a worker's share of a dataset that every worker reads whole).
    """
    i, n = part
    order = {}
    if shuffle and cfg.data.shuffle_buffer > 0:
        order = {
            "local_shuffle_buffer_size": cfg.data.shuffle_buffer,
            "local_shuffle_seed": int(rng.integers(2**31)),
        }
    if pairs_ready:
        pairs = shard.iter_torch_batches(batch_size=cfg.data.batch_size, device=device, **order)
        for batch in itertools.islice(pairs, i, None, n):
            # compact views from the actors (see from_wire): cast on the device
            yield batch | {"x": from_wire(batch["x"]), "gx": from_wire(batch["gx"])}
        return
    raws = shard.iter_batches(batch_size=cfg.data.batch_size, batch_format="numpy", **order)
    for raw in itertools.islice(raws, i, None, n):
        images, labels, valid = decode_batch(raw, cfg.data.band_lo, cfg.data.band_hi)
        images, labels, valid = random_crops(images, labels, crop, rng, valid)
        yield {
            "x": torch.from_numpy(np.ascontiguousarray(images)).to(device),
            "label": torch.from_numpy(labels).to(device),
            "tile_id": [str(t) for t in raw["tile_id"]],  # for messages about the batch
        } | ({} if valid is None else {"valid": torch.from_numpy(valid).to(device)})
