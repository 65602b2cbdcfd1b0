"""Windowed tiling of rasters of any size (GeoTIFF, PNG, JPEG: anything GDAL reads).

A raster is read one band of tile rows at a time (full width, ``tile / scale`` source rows), with
rasterio resampling on read for the optional downscale, so peak memory is one such band whatever
the raster's height, and every source block is decoded once per tile row.

Every pixel of a raster lands in some tile: tiles at the right and bottom edges reach past the
raster and are padded. Each tile carries a valid mask: False for the padding, for the raster's
nodata (its nodata value, or its internal or sidecar mask; not an alpha band) and for
non-finite values of float imagery (stored as 0). Labels are IGNORE_INDEX wherever the
image is not valid, so no metric counts those pixels either.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from pipeline import IGNORE_INDEX
from pipeline.data.format import PrepareError, Tile

GDAL_CACHE_MB = 128
LabelFn = Callable[[np.ndarray], np.ndarray]  # (bands, h, w) label raster -> (h, w) uint8 ids


class LabelValueError(ValueError):
    """Raised by a ``LabelFn`` for a label window it cannot map (a value outside the classes,
    the wrong band count); ``iter_tiles`` turns it into one line naming the label and image
    files."""


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

    def starts(self, size: int) -> list[int]:
        """Tile starts along an axis of ``size`` output pixels: one every ``stride``, plus a
        last tile reaching past the edge (padded) where the steps leave pixels uncovered."""
        if size <= 0:
            return []
        out = list(range(0, max(size - self.tile, 0) + 1, self.stride))
        if out[-1] + self.tile < size and out[-1] + self.stride < size:
            out.append(out[-1] + self.stride)
        return out

    def __len__(self) -> int:
        return len(self.starts(self.out_height)) * len(self.starts(self.out_width))

    def source_rows(self, out_row: int, rows: int | None = None) -> tuple[int, int]:
        """(first source row, source row count) behind output rows [out_row, out_row + rows)
        (default: a whole tile)."""
        return round(out_row / self.scale), round((rows or self.tile) / self.scale)


def open_raster(path: Path | str):
    """An open rasterio dataset (no warning for a raster without georeferencing).

    Raises:
        PrepareError: one line naming the file when GDAL cannot open it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as err:
        raise PrepareError(f"{path}: not a readable raster ({first_line(err)})") from err


def first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def raster_info(path: Path) -> tuple[int, int, int]:
    """(bands, height, width) of a raster, with a one-line error if it cannot be opened."""
    with open_raster(path) as src:
        return src.count, src.height, src.width


def _read_band(
    src, grid: TileGrid, out_row: int, rows: int, resampling: Resampling, path: Path
) -> np.ndarray:
    """Output rows [out_row, out_row + rows) of every band, full width: (bands, rows, width)."""
    window = _source_window(src, grid, out_row, rows)
    try:
        return src.read(
            window=window, out_shape=(src.count, rows, grid.out_width), resampling=resampling
        )
    except RasterioError as err:
        raise PrepareError(
            f"{path}: read failed at rows {window.row_off}-{window.row_off + window.height} "
            f"(truncated or corrupt? {first_line(err)})"
        ) from err


def _source_window(src, grid: TileGrid, out_row: int, rows: int) -> Window:
    """The full-width source window behind output rows [out_row, out_row + rows)."""
    row_off, src_rows = grid.source_rows(out_row, rows)
    return Window(0, row_off, src.width, max(1, min(src_rows, src.height - row_off)))


def mask_kind(src) -> str:
    """How the raster marks pixels without data: "nodata" (a nodata value), "mask" (an internal
    or sidecar mask) or "" (none). An alpha band is not read as a mask: GDAL calls the 4th band
    of any 4-band 8-bit TIFF alpha, and there it is usually near infrared."""
    flags = src.mask_flag_enums
    if src.nodata is not None and any(MaskFlags.nodata in f for f in flags):
        return "nodata"
    if any(MaskFlags.per_dataset in f and MaskFlags.alpha not in f for f in flags):
        return "mask"
    return ""


def _valid_band(src, grid: TileGrid, out_row: int, rows: int, band: np.ndarray) -> np.ndarray:
    """(rows, width) bool: ``valid_pixels`` of output rows [out_row, out_row + rows)."""
    return valid_pixels(src, band, _source_window(src, grid, out_row, rows))


def valid_pixels(src, band: np.ndarray, window: Window) -> np.ndarray:
    """(h, w) bool: the pixels of ``band`` (every band of ``window``, read at (h, w)) that
    hold data: not nodata (a pixel is nodata when all its bands hold the nodata value, as in
    GDAL's dataset mask), inside the raster's mask, and, for float imagery, finite in every
    band; non-finite values are set to 0 in ``band``."""
    valid = np.ones(band.shape[1:], dtype=bool)
    kind = mask_kind(src)
    if kind == "nodata":
        nodata = src.nodata
        same = np.isnan(band) if np.isnan(nodata) else band == nodata
        valid &= ~same.all(axis=0)
    elif kind == "mask":
        valid &= src.dataset_mask(window=window, out_shape=band.shape[1:]) != 0
    if band.dtype.kind == "f":
        finite = np.isfinite(band)
        if not finite.all():
            band[~finite] = 0  # NaN would poison every sum it enters, even when masked
            valid &= finite.all(axis=0)
    return valid


def _padded(a: np.ndarray, height: int, width: int, fill) -> np.ndarray:
    """``a`` (..., h, w) padded at the bottom and right to (..., height, width) with ``fill``."""
    h, w = a.shape[-2:]
    if (h, w) == (height, width):
        return a
    out = np.full((*a.shape[:-2], height, width), fill, dtype=a.dtype)
    out[..., :h, :w] = a
    return out


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
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20), open_raster(image_path) as src:
        if expect_bands is not None and src.count != expect_bands:
            raise PrepareError(
                f"{image_path}: has {src.count} bands, expected {expect_bands} for this variant"
            )
        if (src.height, src.width) != (grid.height, grid.width):
            raise PrepareError(f"{image_path}: size changed while reading")
        lab = open_raster(label_path) if label_path is not None else None
        try:
            if lab is not None and (lab.height, lab.width) != (src.height, src.width):
                raise PrepareError(
                    f"{label_path}: label is {lab.width}x{lab.height}, expected "
                    f"{src.width}x{src.height} like its image {image_path}"
                )
            crs = src.crs.to_wkt() if src.crs else None
            stem = image_path.stem
            cols = grid.starts(grid.out_width)
            # the padded width: the last tile may reach past the raster
            width = max(grid.out_width, cols[-1] + grid.tile)
            for r in grid.starts(grid.out_height):
                rows = min(grid.tile, grid.out_height - r)  # in the raster; the rest is padding
                band = _read_band(src, grid, r, rows, Resampling.bilinear, image_path)
                valid = _padded(_valid_band(src, grid, r, rows, band), grid.tile, width, False)
                band = _padded(band, grid.tile, width, 0)
                labels = None
                if lab is not None and label_fn is not None:
                    window = _read_band(lab, grid, r, rows, Resampling.nearest, label_path)
                    try:
                        labels = label_fn(window)
                    except LabelValueError as err:
                        raise PrepareError(f"{label_path} (label of {image_path}): {err}") from err
                    labels = _padded(labels, grid.tile, width, IGNORE_INDEX)
                    labels[~valid] = IGNORE_INDEX  # no metric counts a pixel without data
                row_off, src_rows = grid.source_rows(r, rows)
                for c in cols:
                    inside = min(grid.tile, grid.out_width - c)
                    col_off, src_cols = round(c / grid.scale), round(inside / grid.scale)
                    transform = src.transform @ rasterio.Affine.translation(col_off, row_off)
                    transform = transform @ rasterio.Affine.scale(1 / grid.scale)
                    yield Tile(
                        tile_id=f"{stem}_r{r}_c{c}",
                        source=source_name or str(image_path),
                        row_off=row_off,
                        col_off=col_off,
                        src_height=src_rows,
                        src_width=src_cols,
                        image=band[:, :, c : c + grid.tile].copy(),
                        label=None if labels is None else labels[:, c : c + grid.tile].copy(),
                        label_source=label_name or (str(label_path) if label_path else None),
                        crs=crs,
                        transform=tuple(transform)[:6],
                        valid=valid[:, c : c + grid.tile].copy(),
                        inside=rows * inside,
                    )
        finally:
            if lab is not None:
                lab.close()
