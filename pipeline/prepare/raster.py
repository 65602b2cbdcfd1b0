"""Windowed tiling of rasters of any size (GeoTIFF, PNG, JPEG: anything GDAL reads).

A raster is read one band of tile rows at a time (full width, ``tile / scale`` source rows), with
rasterio resampling on read for the optional downscale, so peak memory is one such band whatever
the raster's height, and every source block is decoded once per tile row.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from pipeline.data.format import PrepareError, Tile

GDAL_CACHE_MB = 128
LabelFn = Callable[[np.ndarray], np.ndarray]  # (bands, h, w) label raster -> (h, w) uint8 ids


@dataclass(frozen=True)
class TileGrid:
    """Tile positions of a raster in the output (possibly downscaled) pixel grid.

    Args:
        height, width: source raster size in pixels.
        tile: tile side in output pixels.
        stride: step between tiles in output pixels (< tile overlaps).
        scale: output pixels per source pixel (0.5 halves the resolution).
    """

    height: int
    width: int
    tile: int
    stride: int
    scale: float = 1.0

    @property
    def out_height(self) -> int:
        return int(math.floor(self.height * self.scale))

    @property
    def out_width(self) -> int:
        return int(math.floor(self.width * self.scale))

    def starts(self, size: int) -> range:
        # Incomplete tiles at the right and bottom edges are dropped, as in the reference.
        return range(0, size - self.tile + 1, self.stride)

    def __len__(self) -> int:
        return len(self.starts(self.out_height)) * len(self.starts(self.out_width))

    def source_rows(self, out_row: int) -> tuple[int, int]:
        """(first source row, source row count) behind output rows [out_row, out_row + tile)."""
        return round(out_row / self.scale), round(self.tile / self.scale)


def _open(path: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as err:
        raise PrepareError(f"{path}: not a readable raster ({_first_line(err)})") from err


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def raster_info(path: Path) -> tuple[int, int, int]:
    """(bands, height, width) of a raster, with a one-line error if it cannot be opened."""
    with _open(path) as src:
        return src.count, src.height, src.width


def _read_band(src, grid: TileGrid, out_row: int, resampling: Resampling, path: Path) -> np.ndarray:
    row_off, rows = grid.source_rows(out_row)
    rows = min(rows, src.height - row_off)
    window = Window(0, row_off, src.width, rows)
    try:
        return src.read(
            window=window, out_shape=(src.count, grid.tile, grid.out_width), resampling=resampling
        )
    except RasterioError as err:
        raise PrepareError(
            f"{path}: read failed at rows {row_off}-{row_off + rows} (truncated or corrupt? "
            f"{_first_line(err)})"
        ) from err


def iter_tiles(
    image_path: Path,
    grid: TileGrid,
    *,
    label_path: Path | None = None,
    label_fn: LabelFn | None = None,
    expect_bands: int | None = None,
    source_name: str | None = None,
    label_name: str | None = None,
) -> Iterator[Tile]:
    """Yield the tiles of one raster (and its label raster), reading band by band.

    Args:
        image_path: the image raster.
        grid: tile geometry; its height/width must be the raster's.
        label_path: optional label raster of the same size.
        label_fn: maps a (bands, h, w) label window to (h, w) uint8 class ids.
        expect_bands: required band count of the image.
        source_name, label_name: names recorded in the shards (default: the paths).

    Raises:
        PrepareError: unreadable or truncated file, wrong band count, size mismatch.
    """
    # GDAL's block cache defaults to 5% of RAM and would grow with the raster; two rows of
    # blocks are all a band-by-band pass ever reuses.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20), _open(image_path) as src:
        if expect_bands is not None and src.count != expect_bands:
            raise PrepareError(
                f"{image_path}: has {src.count} bands, expected {expect_bands} for this variant"
            )
        if (src.height, src.width) != (grid.height, grid.width):
            raise PrepareError(f"{image_path}: size changed while reading")
        lab = _open(label_path) if label_path is not None else None
        try:
            if lab is not None and (lab.height, lab.width) != (src.height, src.width):
                raise PrepareError(
                    f"{label_path}: label is {lab.width}x{lab.height}, expected "
                    f"{src.width}x{src.height} like {image_path.name}"
                )
            crs = src.crs.to_wkt() if src.crs else None
            stem = image_path.stem
            for r in grid.starts(grid.out_height):
                band = _read_band(src, grid, r, Resampling.bilinear, image_path)
                labels = None
                if lab is not None and label_fn is not None:
                    labels = label_fn(_read_band(lab, grid, r, Resampling.nearest, label_path))
                row_off, rows = grid.source_rows(r)
                for c in grid.starts(grid.out_width):
                    col_off, cols = round(c / grid.scale), round(grid.tile / grid.scale)
                    transform = src.transform @ rasterio.Affine.translation(col_off, row_off)
                    transform = transform @ rasterio.Affine.scale(1 / grid.scale)
                    yield Tile(
                        tile_id=f"{stem}_r{r}_c{c}",
                        source=source_name or str(image_path),
                        row_off=row_off,
                        col_off=col_off,
                        src_height=rows,
                        src_width=cols,
                        image=band[:, :, c : c + grid.tile].copy(),
                        label=None if labels is None else labels[:, c : c + grid.tile].copy(),
                        label_source=label_name or (str(label_path) if label_path else None),
                        crs=crs,
                        transform=tuple(transform)[:6],
                    )
        finally:
            if lab is not None:
                lab.close()
