"""Writing a prepared dataset: Parquet shards per source file, then the manifest.

The whole dataset is built in a hidden folder beside OUT (``.OUT.preparing``) and renamed to
OUT only when complete, so a killed or failed prepare leaves OUT as it was: absent, or the
previous dataset intact (replaced only with ``--overwrite``). Within it, a file's tiles are
staged under temporary names and renamed into place only when the whole file has been read
(``ShardWriter.source``), so a file that fails half way (a truncated TIFF) leaves nothing behind
and is listed as bad. The manifest is written last. The row format and the layout are
``pipeline.data.format``'s.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import IGNORE_INDEX
from pipeline.data.format import MANIFEST, SCHEMA, SPLITS, PrepareError, Tile
from pipeline.storage import live_holder, owner_line, write_json_atomic

log = logging.getLogger(__name__)
COMPRESSIONS = ("lz4", "zstd", "snappy", "none")


class BadFilesError(PrepareError):
    """Some files were skipped; the rest of the dataset was written."""


@dataclass
class BandStats:
    """Per-band count, mean, sum of squared deviations (M2), min and max over valid pixels,
    merged tile by tile with Chan et al.'s pairwise update (exact in float64, unlike a running
    sum of squares of 16-bit values)."""

    count: float = 0.0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def add(self, tile: Tile) -> None:
        bands = tile.image.shape[0]
        pixels = tile.image.reshape(bands, -1)
        if tile.valid is not None and not tile.valid.all():
            pixels = pixels[:, tile.valid.ravel()]
        if pixels.shape[1] == 0:
            return
        values = pixels.astype(np.float64)
        mean = values.mean(axis=1)
        m2 = ((values - mean[:, None]) ** 2).sum(axis=1)
        self.merge(BandStats(pixels.shape[1], mean, m2, values.min(1), values.max(1)))

    def merge(self, other: BandStats) -> None:
        if not other.count:
            return
        if not self.count:
            self.count, self.mean, self.m2 = other.count, other.mean, other.m2
            self.low, self.high = other.low, other.high
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        self.low, self.high = np.minimum(self.low, other.low), np.maximum(self.high, other.high)
        self.count = n

    def summary(self) -> dict | None:
        """The manifest's ``band_stats`` (population std), or None without a valid pixel."""
        if not self.count:
            return None
        return {
            "pixels": int(self.count),
            "mean": self.mean.tolist(),
            "std": np.sqrt(self.m2 / self.count).tolist(),
            "min": self.low.tolist(),
            "max": self.high.tolist(),
        }


@dataclass
class SplitStats:
    tiles: int = 0
    pixels: int = 0
    class_pixels: list[int] = field(default_factory=list)
    ignored_pixels: int = 0
    bands: BandStats = field(default_factory=BandStats)

    def add(self, tile: Tile, n_classes: int) -> None:
        self.tiles += 1
        self.bands.add(tile)
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
        self.bands.merge(other.bands)
        self.tiles += other.tiles
        self.pixels += other.pixels
        self.ignored_pixels += other.ignored_pixels
        if other.class_pixels:
            mine = self.class_pixels or [0] * len(other.class_pixels)
            self.class_pixels = [a + b for a, b in zip(mine, other.class_pixels, strict=True)]


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.preparing"


def _replaced(out: Path) -> Path:
    return out.parent / f".{out.name}.replaced"


def check_output(out: Path, overwrite: bool = False) -> None:
    """OUT can take a new dataset: absent, empty, or (with ``overwrite``) a prepared dataset.

    Also finishes what a killed prepare left: a swap cut between its two renames is completed
    or undone, and a staging folder whose writer is gone is removed.

    Raises:
        PrepareError: OUT holds something else, a dataset without ``overwrite``, or another
            prepare is writing it.
    """
    out = Path(out)
    replaced, staging = _replaced(out), _staging(out)
    if replaced.is_dir():
        if out.exists():
            shutil.rmtree(replaced)  # the new dataset is in place; the old one was not removed
        else:
            replaced.rename(out)  # killed between the renames: the previous dataset returns
    if staging.is_dir():
        owner = _owner(staging)
        if owner:
            raise PrepareError(f"{out}: another `iid prepare` ({owner}) is writing it")
        log.info("removing %s, left by a prepare that did not finish", staging)
        shutil.rmtree(staging)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise PrepareError(
                f"{out}: not empty and holds no prepared dataset (no {MANIFEST}); "
                "give a new or empty folder"
            )
        if not overwrite:
            raise PrepareError(
                f"{out}: holds a prepared dataset; pass --overwrite to replace it (the old "
                "one stays until the new one is complete)"
            )


def _owner(staging: Path) -> str:
    """The live prepare writing ``staging`` (``storage.live_holder``), or "" when it is gone."""
    try:
        return live_holder((staging / ".owner").read_text())
    except OSError:
        return ""


class ShardWriter:
    """Writes tiles to per-file Parquet shards, committing a source file's shards atomically,
    and the manifest, listing every file that was skipped; the dataset appears at ``out`` only
    when ``finish`` succeeds. Use as a context manager: a block that raises leaves ``out`` as
    it was and removes the staging folder.

    Args:
        out: dataset folder.
        n_classes: classes for the histograms (0 for unlabelled data).
        rows_per_shard: tiles per Parquet file.
        compression: Parquet codec; lz4 is the fastest to write and to read back in training,
            zstd the smallest.
        overwrite: replace a dataset already at ``out``.

    Raises:
        PrepareError: if ``out`` cannot take the dataset (``check_output``) or cannot be
            written.
    """

    def __init__(
        self,
        out: Path,
        n_classes: int,
        rows_per_shard: int = 256,
        compression: str = "lz4",
        overwrite: bool = False,
    ):
        self.final, self.n_classes, self.rows_per_shard = Path(out), n_classes, rows_per_shard
        if compression not in COMPRESSIONS:
            raise PrepareError(f"--compression must be one of {COMPRESSIONS}, got {compression!r}")
        self.compression = compression
        check_output(self.final, overwrite)
        self.out = _staging(self.final)
        try:
            self.out.mkdir(parents=True)
            (self.out / ".owner").write_text(owner_line() + "\n")
        except OSError as err:
            raise PrepareError(
                f"{self.final}: output folder is not writable ({err.strerror})"
            ) from err
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._writes: list[Future] = []
        self._published = False
        self.stats = {split: SplitStats() for split in SPLITS}
        self.shards: list[dict] = []
        self._staged: list[tuple[Path, Path, dict]] = []
        self._pending: dict[str, list[dict]] = {}
        self._stem = ""
        self._file_stats: dict[str, SplitStats] = {}
        self.bad: list[dict] = []  # {"file", "error"} of every skipped input
        self.dtype = ""  # of the first tile's image (all of a dataset's share it in practice)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is not None:
            self.discard()

    def discard(self) -> None:
        """Drop everything written (a failed or interrupted prepare); ``out`` is untouched."""
        if self._published:
            return  # in place already (BadFilesError comes after the swap)
        with contextlib.suppress(Exception):
            self._wait()
        self._pool.shutdown(wait=True)
        shutil.rmtree(self.out, ignore_errors=True)

    @contextlib.contextmanager
    def source(self, stem: str, name: str) -> Iterator[None]:
        """Write the tiles ``add``-ed inside the block as the shards ``{stem}-*`` of one source.

        They are published when the block ends; when it raises ``PrepareError`` they are dropped,
        the source ``name`` is listed as bad, and the error goes no further.
        """
        self._stem, self._staged, self._pending = stem, [], {}
        self._file_stats = {split: SplitStats() for split in SPLITS}
        try:
            yield
        except PrepareError as err:
            self._abort()
            self.skip(name, str(err))
            return
        self._commit()

    def skip(self, name: str, error: str) -> None:
        """List an input that could not be used (the manifest's ``bad_files``)."""
        self.bad.append({"file": name, "error": error})
        log.info("skipped: %s", error)

    def add(self, tile: Tile, split: str) -> None:
        self.dtype = self.dtype or str(tile.image.dtype)
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

    def _commit(self) -> None:
        """The source was read completely: publish its shards and count its tiles."""
        for split in list(self._pending):
            self._flush(split)
        self._wait()
        for tmp, final, info in self._staged:
            tmp.replace(final)
            self.shards.append(info)
        for split, stats in self._file_stats.items():
            self.stats[split].merge(stats)
        self._staged, self._pending = [], {}

    def _abort(self) -> None:
        """The source failed: drop everything staged for it."""
        try:
            self._wait()
        except OSError:
            pass  # a failed write of a file being dropped anyway
        for tmp, _, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged, self._pending = [], {}

    def finish(self, meta: dict, skip_bad: bool) -> dict:
        """Write ``manifest.json`` (temp name, then rename) and return it.

        Raises:
            BadFilesError: some inputs were skipped and ``skip_bad`` is false (the manifest,
                listing them, is written first).
        """
        every = BandStats()
        for stats in self.stats.values():
            every.merge(stats.bands)
        manifest = {
            **meta,
            "dtype": self.dtype,
            "band_stats": every.summary(),
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
            "bad_files": list(self.bad),
            "schema": [f.name for f in SCHEMA],
        }
        if not any(s.tiles for s in self.stats.values()):  # --skip-bad cannot accept nothing
            first = f", first: {self.bad[0]['error']}" if self.bad else ""
            raise (BadFilesError if self.bad else PrepareError)(
                f"{self.final}: no tile written ({len(self.bad)} file(s) skipped{first})"
            )
        write_json_atomic(self.out / MANIFEST, manifest)
        self._swap()
        if self.bad and not skip_bad:
            # The dataset is complete and its manifest says what it lacks: it is in place, and
            # the exit status says that files were lost.
            raise BadFilesError(
                f"{len(self.bad)} file(s) skipped, first: {self.bad[0]['error']} (all listed "
                f"in {self.final / MANIFEST}; pass --skip-bad to accept)"
            )
        return manifest

    def _swap(self) -> None:
        """The staged dataset becomes ``out``; a previous one is removed only after."""
        self._pool.shutdown(wait=True)
        (self.out / ".owner").unlink()
        replaced = _replaced(self.final)
        if self.final.exists():
            self.final.rename(replaced)
        self.out.rename(self.final)
        shutil.rmtree(replaced, ignore_errors=True)
        self.out, self._published = self.final, True
