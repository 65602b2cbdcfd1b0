"""Parquet shards of tiles and the manifest that describes them.

Layout of a prepared dataset::

    OUT/manifest.json
    OUT/{train,test,unlabelled}/{source-stem}-{k:05d}.parquet

Shards are per source file: a file's tiles are staged under temporary names and renamed into place
only when the whole file has been read, so a file that fails half way (a truncated TIFF) leaves
nothing behind, and no reader ever sees a partial shard. The manifest is written last, also via
a temporary name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import IGNORE_INDEX
from pipeline.storage import StorageError, join, read_text, write_text_atomic  # noqa: F401

SPLITS = ("train", "test", "unlabelled")
COMPRESSIONS = ("lz4", "zstd", "snappy", "none")

SCHEMA = pa.schema(
    [
        pa.field("tile_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("label_source", pa.string()),
        pa.field("row_off", pa.int32(), nullable=False),  # window in source pixels
        pa.field("col_off", pa.int32(), nullable=False),
        pa.field("src_height", pa.int32(), nullable=False),
        pa.field("src_width", pa.int32(), nullable=False),
        pa.field("bands", pa.int16(), nullable=False),  # tile array, C x H x W
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.binary()),  # uint8 H x W, IGNORE_INDEX where unknown; null if none
        pa.field("class_id", pa.int32()),  # whole-image class for clustering data; else null
        pa.field("crs", pa.string()),
        pa.field("transform", pa.list_(pa.float64())),  # 6 affine coefficients of the tile grid
    ]
)


class PrepareError(Exception):
    """A problem with one input file or with the output, phrased for the user (one line)."""


class BadFilesError(PrepareError):
    """Some files were skipped; the rest of the dataset was written."""


@dataclass
class Tile:
    """One tile ready to be written (arrays in C x H x W / H x W layout)."""

    tile_id: str
    source: str
    row_off: int
    col_off: int
    src_height: int
    src_width: int
    image: np.ndarray
    label: np.ndarray | None = None
    label_source: str | None = None
    class_id: int | None = None
    crs: str | None = None
    transform: tuple[float, ...] | None = None

    def row(self, split: str) -> dict:
        bands, height, width = self.image.shape
        return {
            "tile_id": self.tile_id,
            "split": split,
            "source": self.source,
            "label_source": self.label_source,
            "row_off": self.row_off,
            "col_off": self.col_off,
            "src_height": self.src_height,
            "src_width": self.src_width,
            "bands": bands,
            "height": height,
            "width": width,
            "dtype": str(self.image.dtype),
            "image": np.ascontiguousarray(self.image).tobytes(),
            "label": None if self.label is None else np.ascontiguousarray(self.label).tobytes(),
            "class_id": self.class_id,
            "crs": self.crs,
            "transform": None if self.transform is None else list(self.transform),
        }


def decode_image(row: dict) -> np.ndarray:
    """The C x H x W array of a shard row (as read back by pyarrow or Ray Data)."""
    shape = (int(row["bands"]), int(row["height"]), int(row["width"]))
    return np.frombuffer(row["image"], dtype=np.dtype(row["dtype"])).reshape(shape)


def decode_label(row: dict) -> np.ndarray | None:
    """The H x W uint8 label of a shard row, or None."""
    if row["label"] is None:
        return None
    return np.frombuffer(row["label"], dtype=np.uint8).reshape(
        int(row["height"]), int(row["width"])
    )


@dataclass
class SplitStats:
    tiles: int = 0
    pixels: int = 0
    class_pixels: list[int] = field(default_factory=list)
    ignored_pixels: int = 0

    def add(self, tile: Tile, n_classes: int) -> None:
        self.tiles += 1
        self.pixels += tile.image.shape[1] * tile.image.shape[2]
        if not self.class_pixels:
            self.class_pixels = [0] * n_classes
        if tile.label is not None:
            hist = np.bincount(tile.label.ravel(), minlength=256)
            for c in range(n_classes):
                self.class_pixels[c] += int(hist[c])
            self.ignored_pixels += int(hist[IGNORE_INDEX])
        elif tile.class_id is not None:
            self.class_pixels[tile.class_id] += 1

    def merge(self, other: SplitStats) -> None:
        self.tiles += other.tiles
        self.pixels += other.pixels
        self.ignored_pixels += other.ignored_pixels
        if other.class_pixels:
            mine = self.class_pixels or [0] * len(other.class_pixels)
            self.class_pixels = [a + b for a, b in zip(mine, other.class_pixels, strict=True)]


class ShardWriter:
    """Writes tiles to per-file Parquet shards, committing a source file's shards atomically.

    Args:
        out: dataset folder.
        n_classes: classes for the histograms (0 for unlabelled data).
        rows_per_shard: tiles per Parquet file.
        compression: Parquet codec; lz4 is the fastest to write and to read back in training,
            zstd the smallest.

    Raises:
        PrepareError: if ``out`` cannot be created or written.
    """

    def __init__(
        self, out: Path, n_classes: int, rows_per_shard: int = 256, compression: str = "lz4"
    ):
        self.out, self.n_classes, self.rows_per_shard = Path(out), n_classes, rows_per_shard
        if compression not in COMPRESSIONS:
            raise PrepareError(f"--compression must be one of {COMPRESSIONS}, got {compression!r}")
        self.compression = compression
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._writes: list[Future] = []
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise PrepareError(
                f"{self.out}: output folder is not writable ({err.strerror})"
            ) from err
        self.stats = {split: SplitStats() for split in SPLITS}
        self.shards: list[dict] = []
        self._staged: list[tuple[Path, Path, dict]] = []
        self._pending: dict[str, list[dict]] = {}
        self._stem = ""
        self._file_stats: dict[str, SplitStats] = {}

    def begin_file(self, stem: str) -> None:
        """Start the shards of one source file."""
        self._stem, self._staged, self._pending = stem, [], {}
        self._file_stats = {split: SplitStats() for split in SPLITS}

    def add(self, tile: Tile, split: str) -> None:
        self._pending.setdefault(split, []).append(tile.row(split))
        self._file_stats[split].add(tile, self.n_classes)
        if len(self._pending[split]) >= self.rows_per_shard:
            self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self._pending.pop(split, [])
        if not rows:
            return
        k = sum(1 for _, final, _ in self._staged if final.parent.name == split)
        final = self.out / split / f"{self._stem}-{k:05d}.parquet"
        final.parent.mkdir(exist_ok=True)
        tmp = final.with_name(final.name + ".tmp")
        # Written on a background thread (pyarrow releases the GIL): encoding and disk writes
        # overlap with reading the next band of the raster.
        # At most two shards in flight, so memory stays bounded when the disk is the bottleneck.
        while len(self._writes) >= 2:
            self._writes.pop(0).result()
        self._writes.append(self._pool.submit(self._write, rows, tmp))
        self._staged.append(
            (tmp, final, {"path": str(final.relative_to(self.out)), "rows": len(rows)})
        )

    def _write(self, rows: list[dict], tmp: Path) -> None:
        # No dictionary or statistics for the array columns: hashing 100 kB values buys nothing.
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        small = [f.name for f in SCHEMA if f.name not in ("image", "label")]
        pq.write_table(
            table, tmp, compression=self.compression, use_dictionary=small, write_statistics=small
        )

    def _wait(self) -> None:
        writes, self._writes = self._writes, []
        for w in writes:
            w.result()

    def commit_file(self) -> None:
        """The source file was read completely: publish its shards and count its tiles."""
        for split in list(self._pending):
            self._flush(split)
        self._wait()
        for tmp, final, info in self._staged:
            tmp.replace(final)
            self.shards.append(info)
        for split, stats in self._file_stats.items():
            self.stats[split].merge(stats)
        self._staged, self._pending = [], {}

    def abort_file(self) -> None:
        """The source file failed: drop everything staged for it."""
        try:
            self._wait()
        except OSError:
            pass  # a failed write of a file being dropped anyway
        for tmp, _, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged, self._pending = [], {}

    def write_manifest(self, meta: dict, bad_files: Iterable[dict]) -> dict:
        """Write ``manifest.json`` (temp name, then rename) and return it."""
        manifest = {
            **meta,
            "splits": {
                split: {
                    "tiles": s.tiles,
                    "pixels": s.pixels,
                    "class_pixels": s.class_pixels or [0] * self.n_classes,
                    "ignored_pixels": s.ignored_pixels,
                }
                for split, s in self.stats.items()
            },
            "shards": self.shards,
            "bad_files": list(bad_files),
            "schema": [f.name for f in SCHEMA],
        }
        write_json_atomic(self.out / "manifest.json", manifest)
        return manifest


def write_json_atomic(path: str | Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def read_manifest(out: str | Path) -> dict:
    """Load ``OUT/manifest.json`` (a local folder or a storage URI) with a clear error when it
    is missing or broken."""
    path = join(out, "manifest.json")
    try:
        return json.loads(read_text(path))
    except FileNotFoundError as err:
        raise PrepareError(f"{path}: no manifest; run `iid prepare` first") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrepareError(
            f"{path}: manifest is not valid JSON ({getattr(err, 'msg', err)})"
        ) from err
    except StorageError as err:
        raise PrepareError(str(err)) from err
