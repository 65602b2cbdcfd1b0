"""The pair stage on Ray Data: CPU actors that turn shard rows into training pairs.

``PairMaker`` decodes a batch of rows, crops, draws g (``pipeline.augment``: OpenCV's 8-bit path
for 8-bit tiles of up to 4 bands, torch otherwise) and sends the views in the fewest bytes that
hold them; the trainer casts them on its device (``data.format.from_wire``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch

from pipeline.augment import fits_u8_path, make_pairs, make_pairs_u8, random_crops
from pipeline.config import PairConfig, build
from pipeline.data.format import decode_raw, to_unit
from pipeline.data.read import parquet_rows


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS.

    A batch of pairs allocates ~100 MB of fresh tensors. By default glibc serves blocks that big
    with mmap and unmaps them on free, so every batch page-faults them in again, a large share
    of ``make_pairs``' time on CPU. Called once per pair-stage actor; the process then keeps its
    peak heap.

    Returns:
        True where the setting took (glibc), False elsewhere (nothing changes).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**30))
    except (OSError, AttributeError):
        return False


class PairMaker:
    """Ray Data ``map_batches`` callable: shard rows in, training pairs out.

    Args:
        cfg: PairConfig as a plain dict (what crosses to Ray actors).
        seed: base seed; each actor adds its own entropy unless ``deterministic``.
        deterministic: same seed in every actor (for tests).
        lo, hi: the input stretch (``data.band_lo``/``band_hi``; empty: none).
    """

    def __init__(
        self,
        cfg: dict,
        seed: int = 0,
        deterministic: bool = False,
        lo: Sequence[float] = (),
        hi: Sequence[float] = (),
    ):
        self.cfg = build(PairConfig, cfg, "pairs.")
        self.lo, self.hi = tuple(lo), tuple(hi)
        entropy = [seed] if deterministic else [seed, int.from_bytes(np.random.bytes(4), "big")]
        self.rng = np.random.default_rng(entropy)
        self.gen = torch.Generator().manual_seed(int(self.rng.integers(2**62)))
        torch.set_num_threads(1)  # one core per actor; the pool provides the parallelism
        keep_freed_memory()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raw, labels, valid = decode_raw(batch)
        raw, labels, valid = random_crops(raw, labels, self.cfg.crop, self.rng, valid)
        raw = np.ascontiguousarray(raw)
        with torch.no_grad():
            if fits_u8_path(raw, self.cfg) and not self.lo:
                out = make_pairs_u8(raw, self.cfg, self.gen, valid)
            else:
                unit = torch.from_numpy(to_unit(raw, self.lo, self.hi))
                out = make_pairs(unit, self.cfg, self.gen, valid)
        # The views travel in the fewest bytes that hold them (see ``from_wire``): moving them
        # through the object store limited the pool as much as drawing them (identity
        # transform: float16 views at about half the pairs per second of uint8 ones, measured).
        # The shard's own values (exact) stand for the first view unless it is drawn too or
        # stretched (``to_unit`` with a stretch is not what ``from_wire`` undoes).
        exact = not (self.cfg.augment_first or self.lo)
        return {
            "x": raw if exact else _wire(out["x"]),
            "gx": _wire(out["gx"]),
            "inverse": out["inverse"].numpy(),
            "mask": out["mask"].numpy(),
            "label": labels,
            "tile_id": np.asarray(batch["tile_id"]),
        }


def _wire(gx: torch.Tensor) -> np.ndarray:
    # 8-bit stays 8-bit; floats (noise, 16-bit imagery) go as float16 (error < 5e-4).
    return gx.numpy() if gx.dtype == torch.uint8 else gx.half().numpy()


def pair_dataset(
    files: list[str],
    cfg: PairConfig,
    *,
    actors: int = 2,
    batch_size: int = 32,
    num_cpus: float = 0.5,
    seed: int = 0,
    lo: Sequence[float] = (),
    hi: Sequence[float] = (),
):
    """A Ray Dataset of pairs from the shard ``files`` (``dataset_files``; any pyarrow
    filesystem URI).

    ``lo``/``hi``: the input stretch (``data.band_lo``/``band_hi``). The pool's actors take
    fractional CPUs so that read tasks and Train workers are not starved
    on small machines.
    """
    import ray.data

    return parquet_rows(files, concurrency=max(1, actors)).map_batches(
        PairMaker,
        fn_constructor_kwargs={"cfg": asdict(cfg), "seed": seed, "lo": list(lo), "hi": list(hi)},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
    )
