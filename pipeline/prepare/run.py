"""The loop every tiled dataset shares: sources -> tiles -> split -> shards -> manifest."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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

    def __post_init__(self) -> None:
        if self.tile < 1 or self.stride < 1:
            raise PrepareError(
                f"--tile and --stride must be positive, got {self.tile}, {self.stride}"
            )
        if not 0 < self.scale <= 1:
            raise PrepareError(f"--downscale must be in (0, 1], got {self.scale}")
        if not 0 <= self.test_fraction < 1:
            raise PrepareError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if self.rows_per_shard < 1:
            raise PrepareError(f"--rows-per-shard must be >= 1, got {self.rows_per_shard}")


def assign_split(tile: Tile, seed: int, test_fraction: float) -> str:
    """Deterministic split from (seed, source, window): a tile lands in exactly one split.

    Tiles with no label, or whose label is all ignore, are ``unlabelled``.
    """
    if tile.label is None or bool((tile.label == IGNORE_INDEX).all()):
        tile.label = None
        return "unlabelled"
    key = f"{seed}:{tile.source}:{tile.row_off}:{tile.col_off}".encode()
    draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
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
                    f"{src.image}: {grid.out_width}x{grid.out_height} pixels (after --downscale), "
                    f"smaller than one {opts.tile}-pixel tile",
                )
                continue
            plans.append((src, grid))
        non_finite: dict[str, int] = {}  # source -> tiles dropped for NaN/inf pixels
        bar = tqdm(
            total=sum(len(g) for _, g in plans),
            unit="tile",
            desc="tiling",
            disable=None if opts.progress else True,
        )
        for src, grid in plans:
            name = str(src.image.relative_to(root)) if root else str(src.image)
            label_name = str(src.label.relative_to(root)) if (root and src.label) else None
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
                    if tile.image.dtype.kind == "f" and not np.isfinite(tile.image).all():
                        # NaN or inf pixels (float imagery's nodata) would make every loss
                        # NaN: such tiles are dropped, and counted per file in the manifest.
                        non_finite[name] = non_finite.get(name, 0) + 1
                        continue
                    writer.add(tile, assign_split(tile, opts.seed, opts.test_fraction))
        bar.close()
        params = {
            "tile": opts.tile,
            "stride": opts.stride,
            "scale": opts.scale,
            "test_fraction": opts.test_fraction,
            "seed": opts.seed,
        }
        extra = late_meta() if late_meta else {}
        if non_finite:
            extra["non_finite_tiles"] = {"dropped": sum(non_finite.values()), "files": non_finite}
            log.warning(
                "%d tile(s) with NaN or inf pixels dropped, from %d file(s) (listed in the "
                "manifest's non_finite_tiles)",
                sum(non_finite.values()),
                len(non_finite),
            )
        return writer.finish({**meta, **extra, "tiling": params}, opts.skip_bad)


def _shard_stem(path: Path, root: Path | None) -> str:
    """A readable name for a source's shards, unique per source: ``x.tif`` and ``x.tiff``, or
    ``a/b.tif`` and ``a__b.tif``, read alike but get different hashes of their paths."""
    rel = path.relative_to(root) if root else Path(path.name)
    digest = hashlib.blake2b(str(path if root is None else rel).encode(), digest_size=4)
    return "__".join(rel.with_suffix("").parts) + f"-{digest.hexdigest()}"
