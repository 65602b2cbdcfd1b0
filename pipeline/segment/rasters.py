"""The rasters of ``iid segment``: finding and checking the inputs, reading the model's windows,
and writing each map as a Cloud-Optimised GeoTIFF under a temporary name.

A map is first written block by block into a tiled GeoTIFF (every window fills whole blocks of
it, so nothing is ever rewritten), then copied by GDAL's COG driver, which adds the overviews;
the copy gets its final name last, so a map under its final name is always complete. Memory is
one window per batch and GDAL's block cache, whatever the raster's size.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from pipeline import IGNORE_INDEX, storage
from pipeline.config import Config, ConfigError
from pipeline.data.format import PrepareError
from pipeline.prepare.raster import GDAL_CACHE_MB, first_line, open_raster, valid_pixels
from pipeline.segment.layout import Layout

log = logging.getLogger(__name__)

NODATA = IGNORE_INDEX  # cluster maps: 255 where the input has no data
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".img", ".vrt", ".png", ".jpg", ".jpeg")
PROBABILITY_SCALE = 254  # probabilities are stored as round(p * 254); 255 is nodata


@dataclass(frozen=True)
class Source:
    """One input raster, checked.

    Attributes:
        path: as given (a local path, or a URI GDAL opens such as ``s3://bucket/a.tif``).
        name: output name without suffix, relative to the output folder (``sub/scene``).
        bands, height, width: its shape.
        dtype: its pixel type.
        georeferenced: whether it has a CRS (a map without one is written without one).
    """

    path: str
    name: str
    bands: int
    height: int
    width: int
    dtype: str
    georeferenced: bool


@dataclass(frozen=True)
class Outputs:
    """Where one raster's results go (final names)."""

    clusters: str
    probabilities: str
    preview: str

    @classmethod
    def of(cls, out: str, name: str) -> Outputs:
        return cls(
            storage.join(out, f"{name}_clusters.tif"),
            storage.join(out, f"{name}_probabilities.tif"),
            storage.join(out, f"{name}_preview.png"),
        )

    def done(self, probabilities: bool) -> bool:
        """Whether a finished map is there (the cluster map is renamed into place last)."""
        return storage.is_file(self.clusters) and (
            not probabilities or storage.is_file(self.probabilities)
        )


def find_rasters(src: str) -> list[tuple[str, str]]:
    """(path, output name) of every raster ``src`` names: one raster, a folder (searched
    recursively for raster suffixes), or a glob pattern; names are relative to the folder (or
    the pattern's fixed part), without the suffix.

    Raises:
        ConfigError: nothing found there.
    """
    if storage.is_uri(src) and not any(ch in src for ch in "*?["):
        if storage.is_dir(src):
            found = [p for p in storage.list_files(src) if p.lower().endswith(RASTER_SUFFIXES)]
            return [(p, Path(p.rsplit("/", 1)[-1]).stem) for p in found] or _none(src)
        return [(src, Path(src.rsplit("/", 1)[-1]).stem)]
    if any(ch in src for ch in "*?["):
        paths = sorted(p for p in glob.glob(src, recursive=True) if Path(p).is_file())
        root = Path(src.split("*")[0].split("?")[0].split("[")[0])
        root = root if src.endswith(os.sep) or root.is_dir() else root.parent
    elif Path(src).is_dir():
        root = Path(src)
        paths = sorted(
            str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES
        )
    elif Path(src).is_file():
        return [(src, Path(src).stem)]
    else:
        raise ConfigError(f"--src: {src} does not exist")
    return [(p, Path(p).relative_to(root).with_suffix("").as_posix()) for p in paths] or _none(src)


def _none(src: str) -> list:
    raise ConfigError(f"--src: no rasters ({', '.join(RASTER_SUFFIXES)}) in {src}")


def inspect(path: str, name: str, cfg: Config) -> Source:
    """Open a raster and check it against the model's config.

    Raises:
        PrepareError: one line naming the raster: unreadable, or its band count or pixel type
            is not the model's.
    """
    with open_raster(path) as src:
        bands, dtype = src.count, src.dtypes[0]
        georeferenced = src.crs is not None
        height, width = src.height, src.width
    if bands != cfg.model.in_channels:
        raise PrepareError(
            f"{path}: has {bands} bands, the model takes {cfg.model.in_channels} "
            f"(model.in_channels)"
        )
    if cfg.data.dtype and dtype != cfg.data.dtype:
        raise PrepareError(
            f"{path}: holds {dtype} pixels, the model was trained on {cfg.data.dtype} imagery "
            "(data.dtype); convert it, or train on imagery like it"
        )
    return Source(path, name, bands, height, width, dtype, georeferenced)


def read_window(src, layout: Layout, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    """The window the model reads for the core at (row, col), padded with 0 past the raster.

    Args:
        src: the open raster.

    Returns:
        (raw pixels (bands, tile, tile) in the raster's type, valid (tile, tile) bool: False
        for padding and for the raster's nodata).

    Raises:
        PrepareError: the read failed (a truncated or corrupt file).
    """
    t = layout.tile
    top, left = layout.window(row, col)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + t, src.height), min(left + t, src.width)
    raw = np.zeros((src.count, t, t), dtype=src.dtypes[0])
    valid = np.zeros((t, t), dtype=bool)
    if r1 <= r0 or c1 <= c0:
        return raw, valid
    window = Window(c0, r0, c1 - c0, r1 - r0)
    try:
        band = src.read(window=window)
    except RasterioError as err:
        raise PrepareError(
            f"{src.name}: read failed at rows {r0}-{r1}, columns {c0}-{c1} "
            f"(truncated or corrupt? {first_line(err)})"
        ) from err
    inner = (slice(r0 - top, r1 - top), slice(c0 - left, c1 - left))
    valid[inner] = valid_pixels(src, band, window)
    raw[(slice(None), *inner)] = band
    return raw, valid


# Rasters a read worker keeps open between batches: GDAL's block cache of a raster lives with
# its open dataset, and a window shares blocks with its neighbours (the margins). Keyed by the
# run as well as the path, so a later run never reads through a stale handle.
_OPEN: dict[tuple[str, str], object] = {}
_KEEP_OPEN = 4


def _cached(run: str, path: str):
    key = (run, path)
    if key not in _OPEN:
        while len(_OPEN) >= _KEEP_OPEN:
            _OPEN.pop(next(iter(_OPEN))).close()
        _OPEN[key] = open_raster(path)
    return _OPEN[key]


def read_windows(
    batch: dict[str, np.ndarray],
    run: str,
    paths: Sequence[str],
    core: int,
    margin: int,
    bands: int,
    dtype: str,
) -> dict[str, np.ndarray]:
    """The read stage of ``iid segment``: the windows of a batch of cores (``raster``: index
    into ``paths``, ``row``, ``col``) of rasters of ``bands`` bands of ``dtype``.

    A window that cannot be read comes back as an ``error`` line (and zeros), so one bad raster
    fails alone.

    Args:
        batch: the cores, as Ray Data hands them over.
        run: an id of the run (rasters are kept open per run).
        paths: the rasters.
        core, margin: the layout.
        bands, dtype: of every raster (checked before the run).

    Returns:
        The batch with ``image`` (n, bands, tile, tile), ``valid`` (n, tile, tile) and
        ``error`` added.
    """
    t = core + 2 * margin
    images = np.zeros((len(batch["raster"]), bands, t, t), dtype=dtype)
    valid = np.zeros((len(batch["raster"]), t, t), dtype=bool)
    errors = []
    # A bounded block cache: GDAL's default (5% of RAM) would grow with the raster.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20):
        for j, (i, r, c) in enumerate(
            zip(batch["raster"], batch["row"], batch["col"], strict=True)
        ):
            try:
                src = _cached(run, paths[i])
                layout = Layout(src.height, src.width, core, margin)
                images[j], valid[j] = read_window(src, layout, int(r), int(c))
                errors.append("")
            except (PrepareError, RasterioError, OSError) as err:
                errors.append(str(err).splitlines()[0])
    out = {k: batch[k] for k in ("raster", "row", "col")}
    return out | {"image": images, "valid": valid, "error": np.array(errors, dtype=object)}


def cluster_colours(k: int) -> dict[int, tuple[int, int, int, int]]:
    """The colour table of a map of ``k`` clusters (the plots' palette; nodata transparent)."""
    from pipeline.plots import class_palette

    table = {
        i: (*(int(round(255 * v)) for v in rgb), 255) for i, rgb in enumerate(class_palette(k))
    }
    return table | {NODATA: (0, 0, 0, 0)}


def legend_labels(names: Sequence[str]) -> list[str]:
    """``"0 road"`` for a named cluster, ``"z=0"`` for one without a name."""
    return [f"{i} {n}" if n else f"z={i}" for i, n in enumerate(names)]


class MapWriter:
    """The outputs of one raster, written window by window, finished or abandoned whole.

    Args:
        source: the input raster.
        layout: its windows.
        out: output folder (local or a URI; a URI is written locally, then uploaded).
        names: per cluster: its name ("" if none).
        probabilities: also write the per-cluster probabilities.
        tags: dataset tags recorded in the map (model, head, sub-head).
    """

    def __init__(
        self,
        source: Source,
        layout: Layout,
        out: str,
        names: Sequence[str],
        probabilities: bool,
        tags: dict[str, str],
    ):
        self.source, self.layout, self.names = source, layout, list(names)
        self.outputs = Outputs.of(out, source.name)
        self._stack = contextlib.ExitStack()
        folder = storage.join(out, *source.name.split("/")[:-1])
        self.local = self._stack.enter_context(storage.staged_dir(folder))
        self.stem = source.name.split("/")[-1]
        self.remaining = len(layout)
        with open_raster(source.path) as src:
            profile = {
                "driver": "GTiff",
                "height": src.height,
                "width": src.width,
                "crs": src.crs,
                "transform": src.transform,
                "tiled": True,
                "blockxsize": layout.core,
                "blockysize": layout.core,
                "compress": "deflate",
                "nodata": NODATA,
                "dtype": "uint8",
                "BIGTIFF": "IF_SAFER",
            }
        k = len(self.names)
        self.parts = [self._part("clusters")]
        self.maps = [self._stack.enter_context(_quiet_open(self.parts[0], "w", count=1, **profile))]
        self.maps[0].write_colormap(1, cluster_colours(k))
        self.maps[0].set_band_description(1, _description(self.names, tags))
        self.maps[0].update_tags(**tags)
        self.maps[0].update_tags(1, **{f"CLUSTER_{i}": n for i, n in enumerate(self.names) if n})
        if probabilities:
            self.parts.append(self._part("probabilities"))
            probs = self._stack.enter_context(
                _quiet_open(self.parts[1], "w", count=k, **profile | {"predictor": 2})
            )
            for i, label in enumerate(legend_labels(self.names)):
                probs.set_band_description(i + 1, f"P({label})")
            probs.scales = (1 / PROBABILITY_SCALE,) * k
            probs.update_tags(**tags)
            self.maps.append(probs)

    def _part(self, kind: str) -> Path:
        return self.local / f".{self.stem}_{kind}.part.tif"

    def write(self, row: int, col: int, ids: np.ndarray, probs: np.ndarray | None) -> None:
        """One core's cluster ids (core, core) and, if asked for, probabilities (K, core, core)
        in PROBABILITY_SCALE units; the part past the raster's edge is dropped."""
        h, w = self.layout.kept(row, col)
        window = Window(col, row, w, h)
        self.maps[0].write(ids[:h, :w], 1, window=window)
        if len(self.maps) > 1 and probs is not None:
            self.maps[1].write(probs[:, :h, :w], window=window)
        self.remaining -= 1

    def finish(self, preview_size: int, lo: Sequence[float], hi: Sequence[float]) -> Outputs:
        """Close the parts, copy them into COGs with overviews, draw the preview, and give the
        maps their final names (the cluster map last). Returns the final names."""
        for dataset in self.maps:
            dataset.close()
        finals = [
            self.local / Path(self.outputs.clusters).name,
            self.local / Path(self.outputs.probabilities).name,
        ]
        resampling = ["MODE", "AVERAGE"]  # cluster ids are categories; probabilities average
        cogs = []
        for part, final, how in zip(self.parts, finals, resampling, strict=False):
            cog = final.with_name(f".{final.name}.cog.part.tif")
            with _quiet():
                rasterio.shutil.copy(
                    part,
                    cog,
                    driver="COG",
                    COMPRESS="DEFLATE",
                    BLOCKSIZE=512,
                    OVERVIEW_RESAMPLING=how,
                    BIGTIFF="IF_SAFER",
                )
            part.unlink()
            cogs.append((cog, final))
        preview = self.local / Path(self.outputs.preview).name
        self._preview(cogs[0][0], preview, preview_size, lo, hi)
        for cog, final in reversed(cogs):  # the cluster map, which marks the raster done, last
            cog.replace(final)
        self._stack.close()  # uploads, when the output is a URI
        return self.outputs

    def _preview(
        self, cog: Path, path: Path, size: int, lo: Sequence[float], hi: Sequence[float]
    ) -> None:
        from pipeline.data.format import to_unit
        from pipeline.plots import plot_map_preview, save_figure

        scale = min(1.0, size / max(self.source.height, self.source.width))
        shape = (
            max(1, math.ceil(self.source.height * scale)),
            max(1, math.ceil(self.source.width * scale)),
        )
        with _quiet_open(cog) as m:  # overviews: a small read
            ids = m.read(1, out_shape=shape, resampling=Resampling.nearest)
        with open_raster(self.source.path) as src:
            raw = src.read(out_shape=(src.count, *shape), resampling=Resampling.average)
        image = to_unit(raw[None], lo, hi)[0]
        save_figure(plot_map_preview(image, ids, legend_labels(self.names)), path)

    def abort(self) -> None:
        """Drop everything written for this raster; nothing appears under a final name."""
        for dataset in self.maps:
            with contextlib.suppress(Exception):
                dataset.close()
        for path in self.local.glob(f".{self.stem}_*.part.tif"):
            path.unlink(missing_ok=True)
        # staged_dir sees a failure: a URI output uploads nothing and drops its local copy.
        err = RuntimeError(f"{self.source.path}: abandoned")
        self._stack.__exit__(RuntimeError, err, None)


def remove_parts(out: str, name: str) -> None:
    """Delete what a killed run left of ``name`` in a local output folder (never a final
    file)."""
    if storage.is_uri(out):
        return
    folder = Path(out, name).parent
    stem = Path(name).name
    for path in folder.glob(f".{stem}_*.part.tif"):
        path.unlink(missing_ok=True)


def _description(names: Sequence[str], tags: dict[str, str]) -> str:
    head = f"IID clusters (head {tags.get('IID_HEAD', '?')}, sub-head {tags.get('IID_SUBHEAD')})"
    if any(names):
        return head + ": " + ", ".join(legend_labels(names))
    return head


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def _quiet_open(path, mode: str = "r", **profile):
    """rasterio.open without the warning for a map of a raster that has no CRS (said once,
    by the caller)."""
    with _quiet():
        return rasterio.open(path, mode, **profile)
