"""The loop every tiled dataset shares: sources -> tiles -> split -> shards -> manifest."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline import IGNORE_INDEX
from pipeline.data.format import PrepareError, Tile
from pipeline.prepare.raster import LabelFn, TileGrid, iter_tiles, raster_info
from pipeline.prepare.shards import ShardWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One image raster and its optional label raster."""

    image: Path
    label: Path | None = None


@dataclass(frozen=True)
class TilingOptions:
    tile: int = 200
    stride: int = 200
    scale: float = 1.0
    test_fraction: float = 0.1
    seed: int = 0
    rows_per_shard: int = 256
    compression: str = "lz4"
    skip_bad: bool = False
    progress: bool = True
    overwrite: bool = False  # replace a dataset already in OUT
    # Tiles whose pixels inside the raster are more than this share nodata are skipped (a
    # tile with no valid pixel always is); 1 keeps every tile with data.
    max_nodata: float = 0.5

    def __post_init__(self) -> None:
        if self.tile < 1 or self.stride < 1:
            raise PrepareError(
                f"--tile and --stride must be positive, got {self.tile}, {self.stride}"
            )
        if not 0 < self.scale <= 1:
            raise PrepareError(f"--downscale must be in (0, 1], got {self.scale}")
        if not 0 <= self.test_fraction < 1:
            raise PrepareError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if not 0 <= self.max_nodata <= 1:
            raise PrepareError(f"--max-nodata must be in [0, 1], got {self.max_nodata}")
        if self.rows_per_shard < 1:
            raise PrepareError(f"--rows-per-shard must be >= 1, got {self.rows_per_shard}")


def assign_split(tile: Tile, seed: int, test_fraction: float, hold_out_unlabelled: bool) -> str:
    """Deterministic split from (seed, source, window): a tile lands in exactly one split.

    Tiles with no label, or whose label is all ignore, are ``unlabelled``; when the dataset has
    no labels at all (``hold_out_unlabelled``) the same draw holds ``test_fraction`` of them
    out as ``test``, so that a label-free run still scores its sub-heads on tiles it never
    trained on.
    """
    key = f"{seed}:{tile.source}:{tile.row_off}:{tile.col_off}".encode()
    draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
    if tile.label is None or bool((tile.label == IGNORE_INDEX).all()):
        tile.label = None
        return "test" if hold_out_unlabelled and draw < test_fraction else "unlabelled"
    return "test" if draw < test_fraction else "train"


def prepare_tiles(
    sources: Sequence[Source],
    out: Path,
    opts: TilingOptions,
    *,
    meta: dict,
    n_classes: int,
    label_fn: LabelFn | None = None,
    expect_bands: int | None = None,
    root: Path | None = None,
    bad_files: Iterable[dict] = (),
    late_meta: Callable[[], dict] | None = None,
) -> dict:
    """Tile every source into shards under ``out`` and write the manifest.

    Args:
        sources: image (and label) rasters.
        out: output folder.
        opts: tiling options.
        meta: dataset description merged into the manifest.
        n_classes: classes for the histograms.
        label_fn: label raster -> class ids.
        expect_bands: required image band count.
        root: paths in the shards are recorded relative to it.
        bad_files: problems already found while listing the sources.
        late_meta: called after tiling; its dict joins the manifest (counts gathered on the way).

    Returns:
        The manifest dict.

    Raises:
        PrepareError: on an unusable output folder.
        BadFilesError: if any file was skipped and ``opts.skip_bad`` is false (the manifest,
            listing them, is written first).
    """
    with ShardWriter(
        out, n_classes, opts.rows_per_shard, opts.compression, opts.overwrite
    ) as writer:
        for bad in bad_files:
            writer.skip(bad["file"], bad["error"])
        plans: list[tuple[Source, TileGrid]] = []
        for src in sources:
            try:
                _, height, width = raster_info(src.image)
            except PrepareError as err:
                writer.skip(str(src.image), str(err))
                continue
            grid = TileGrid(height, width, opts.tile, opts.stride, opts.scale)
            if len(grid) == 0:
                writer.skip(
                    str(src.image),
                    f"{src.image}: {grid.out_width}x{grid.out_height} pixels after --downscale "
                    f"{opts.scale}",
                )
                continue
            plans.append((src, grid))
        hold_out = not any(src.label for src, _ in plans)
        nodata = _NodataCount()
        bar = tqdm(
            total=sum(len(g) for _, g in plans),
            unit="tile",
            desc="tiling",
            disable=None if opts.progress else True,
        )
        for src, grid in plans:
            name = str(src.image.relative_to(root)) if root else str(src.image)
            label_name = _name(src.label, root) if src.label else None
            with writer.source(_shard_stem(src.image, root), str(src.image)):
                for tile in iter_tiles(
                    src.image,
                    grid,
                    label_path=src.label,
                    label_fn=label_fn,
                    expect_bands=expect_bands,
                    source_name=name,
                    label_name=label_name,
                ):
                    bar.update()
                    if nodata.keep(tile, opts.max_nodata, name):
                        split = assign_split(tile, opts.seed, opts.test_fraction, hold_out)
                        writer.add(tile, split)
        bar.close()
        params = {
            "tile": opts.tile,
            "stride": opts.stride,
            "scale": opts.scale,
            "test_fraction": opts.test_fraction,
            "seed": opts.seed,
            "max_nodata": opts.max_nodata,
            "edges": "padded",
        }
        extra = late_meta() if late_meta else {}
        if nodata.skipped:
            log.info(
                "%d tile(s) more than %.0f%% nodata skipped (counted in the manifest's nodata)",
                sum(nodata.skipped.values()),
                100 * opts.max_nodata,
            )
        return writer.finish(
            {**meta, **extra, "nodata": nodata.summary(), "tiling": params}, opts.skip_bad
        )


class _NodataCount:
    """Which tiles are kept for their valid pixels, and what was skipped, per file."""

    def __init__(self) -> None:
        self.skipped: dict[str, int] = {}  # file -> tiles skipped
        self.invalid_pixels = 0  # in the kept tiles, inside their rasters

    def keep(self, tile: Tile, max_nodata: float, name: str) -> bool:
        inside = tile.inside if tile.inside is not None else tile.image[0].size
        valid = inside if tile.valid is None else int(tile.valid.sum())
        if valid == 0 or (inside - valid) > max_nodata * inside:
            self.skipped[name] = self.skipped.get(name, 0) + 1
            return False
        self.invalid_pixels += inside - valid
        return True

    def summary(self) -> dict:
        return {
            "skipped_tiles": sum(self.skipped.values()),
            "invalid_pixels_kept": self.invalid_pixels,
            "files": self.skipped,
        }


def _name(path: Path, root: Path | None) -> str:
    """``path`` as the shards record it: relative to ``root`` when inside it (masks may live
    elsewhere)."""
    if root is not None and path.is_relative_to(root):
        return str(path.relative_to(root))
    return str(path)


def _shard_stem(path: Path, root: Path | None) -> str:
    """A readable name for a source's shards, unique per source: ``x.tif`` and ``x.tiff``, or
    ``a/b.tif`` and ``a__b.tif``, read alike but get different hashes of their paths."""
    rel = path.relative_to(root) if root else Path(path.name)
    digest = hashlib.blake2b(str(path if root is None else rel).encode(), digest_size=4)
    return "__".join(rel.with_suffix("").parts) + f"-{digest.hexdigest()}"
