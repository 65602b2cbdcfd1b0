"""The prepared dataset's format: the Parquet row schema, encoding and decoding a row, the
manifest, and what a config needs of a dataset (bands, tile size, classes, splits).

Layout of a prepared dataset::

    OUT/manifest.json
    OUT/{train,test,unlabelled}/{source-stem}-{k:05d}.parquet

``pipeline.prepare`` writes it; ``pipeline.data.read`` reads it. Both stand on this module and
neither imports the other.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import IGNORE_INDEX, storage
from pipeline.config import Config, ConfigError, PairConfig

# torch only where a tensor is made: the readers of rasters and shards (Ray Data read tasks
# among them) then run without it, half a gigabyte lighter per process.
if TYPE_CHECKING:
    import torch

SPLITS = ("train", "test", "unlabelled")
MANIFEST = "manifest.json"

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
        # uint8 H x W, 1 where the pixel holds data, 0 for nodata, non-finite values and the
        # padding of edge tiles; null when every pixel is valid
        pa.field("valid", pa.binary()),
        pa.field("class_id", pa.int32()),  # whole-image class for clustering data; else null
        pa.field("crs", pa.string()),
        pa.field("transform", pa.list_(pa.float64())),  # 6 affine coefficients of the tile grid
    ]
)


# Shards written before the valid mask existed are still read (every pixel valid).
LEGACY_NAMES = [name for name in SCHEMA.names if name != "valid"]


class PrepareError(Exception):
    """A problem with a dataset's files (an input, the output, the manifest), phrased for the
    user (one line)."""


@dataclass
class Tile:
    """One tile as a row is made of it (arrays in C x H x W / H x W layout)."""

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
    valid: np.ndarray | None = None  # (H, W) bool; None: every pixel valid
    inside: int | None = None  # pixels of the tile inside its raster (the rest is padding)

    def row(self, split: str) -> dict:
        """The tile as a row of ``SCHEMA``."""
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
            "valid": None
            if self.valid is None or self.valid.all()
            else np.ascontiguousarray(self.valid, dtype=np.uint8).tobytes(),
            "class_id": self.class_id,
            "crs": self.crs,
            "transform": None if self.transform is None else list(self.transform),
        }


# ------------------------------------------------------------------------------- decoding
def decode_raw(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Rows (a batch from Ray Data or pyarrow: column name -> values) -> images (n, B, H, W)
    in the shard's own dtype (uint8 for Potsdam), labels (n, H, W) uint8, IGNORE_INDEX where
    unknown (a whole-image ``class_id`` labels every pixel of its image), and the valid mask
    (n, H, W) bool, or None when every pixel of the batch is valid.

    Raises:
        ValueError: on an empty batch.
    """
    n = len(batch["image"])
    if n == 0:
        raise ValueError("empty batch")
    shape = (int(batch["bands"][0]), int(batch["height"][0]), int(batch["width"][0]))
    dtype = np.dtype(str(batch["dtype"][0]))
    raw = np.frombuffer(b"".join(batch["image"]), dtype=dtype).reshape(n, *shape)
    labels = np.full((n, shape[1], shape[2]), IGNORE_INDEX, dtype=np.uint8)
    for i, lab in enumerate(batch.get("label", [None] * n)):
        if lab is not None:
            labels[i] = np.frombuffer(lab, dtype=np.uint8).reshape(shape[1], shape[2])
    for i, cls in enumerate(batch.get("class_id", [None] * n)):
        if cls is not None and not (isinstance(cls, float) and np.isnan(cls)):
            labels[i] = int(cls)  # whole-image class: every pixel carries it
    valid = None
    for i, v in enumerate(batch.get("valid", [None] * n)):
        if v is not None:
            if valid is None:
                valid = np.ones((n, shape[1], shape[2]), dtype=bool)
            valid[i] = np.frombuffer(v, dtype=np.uint8).reshape(shape[1], shape[2]) != 0
    return raw, labels, valid


def decode_batch(
    batch: dict[str, np.ndarray], lo: Sequence[float] = (), hi: Sequence[float] = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """As ``decode_raw``, with the images as float32 (``to_unit`` with ``lo``, ``hi``)."""
    raw, labels, valid = decode_raw(batch)
    return to_unit(raw, lo, hi), labels, valid


def to_unit(raw: np.ndarray, lo: Sequence[float] = (), hi: Sequence[float] = ()) -> np.ndarray:
    """Images (n, B, H, W) -> float32 model input.

    With a per-band stretch (``lo``, ``hi``: ``data.band_lo``/``band_hi``, from the dataset's
    band statistics) each band maps [lo, hi] linearly to [0, 1], clipped; without, integers are
    divided by their dtype's maximum and floats are kept as they are.
    """
    if len(lo):
        if len(lo) != raw.shape[1]:
            raise ValueError(f"a stretch of {len(lo)} bands for images of {raw.shape[1]} bands")
        low = np.asarray(lo, dtype=np.float32).reshape(1, -1, 1, 1)
        span = np.asarray(hi, dtype=np.float32).reshape(1, -1, 1, 1) - low
        images = raw.astype(np.float32)
        images -= low
        images /= span
        return np.clip(images, 0, 1, out=images)
    scale = 1.0 / np.iinfo(raw.dtype).max if raw.dtype.kind in "ui" else 1.0
    images = raw.astype(np.float32)
    images *= np.float32(scale)  # in place: one fresh array per batch, not two
    return images


def from_wire(t: torch.Tensor) -> torch.Tensor:
    """A view as the pair stage sent it (the shard's integers, or float16) -> float32, scaled as
    ``to_unit`` scales without a stretch: integers divided by their dtype's maximum, floats as
    they are (a stretched view travels as float16)."""
    import torch

    if t.is_floating_point():
        return t.float()
    return t.float().mul_(1 / torch.iinfo(t.dtype).max)


# ------------------------------------------------------------------------------- manifest
def read_manifest(shards: str | Path) -> dict:
    """``shards/manifest.json`` (a local folder or a storage URI).

    Raises:
        PrepareError: when it is missing, unreadable or not valid JSON.
    """
    path = storage.join(shards, MANIFEST)
    try:
        return json.loads(storage.read_text(path))
    except FileNotFoundError as err:
        raise PrepareError(f"{path}: no manifest; run `iid prepare` first") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrepareError(
            f"{path}: manifest is not valid JSON ({getattr(err, 'msg', err)})"
        ) from err
    except storage.StorageError as err:
        raise PrepareError(str(err)) from err


def dataset_files(shards: str | Path, manifest: dict, splits: Sequence[str]) -> list[str]:
    """The shards of ``splits`` that the manifest lists, split by split and sorted by name,
    each checked.

    The manifest is the dataset: files in the split folders that it does not list (left by an
    earlier prepare) are never read. Each listed file must exist, be a Parquet file with the
    row schema, hold the rows the manifest says and tiles of one size (the manifest's tile
    when it records one). Only the footers are read.

    Raises:
        PrepareError: one line naming the first file that fails.
    """
    order = {split: i for i, split in enumerate(splits)}
    listed = sorted(
        (s for s in manifest.get("shards", []) if s["path"].split("/", 1)[0] in order),
        key=lambda s: (order[s["path"].split("/", 1)[0]], s["path"]),  # split by split, by name
    )
    paths = [storage.absolute(storage.join(shards, s["path"])) for s in listed]
    with ThreadPoolExecutor(max_workers=8) as pool:  # footers of remote shards: one GET each
        footers = list(pool.map(_footer, paths))
    tile = manifest.get("tiling", {}).get("tile")
    expected = (tile, tile) if tile else None  # else the first recorded size: one for all
    for info, path, (meta, error) in zip(listed, paths, footers, strict=True):
        if error:
            raise PrepareError(f"{path}: {error} (listed in {storage.join(shards, MANIFEST)})")
        names = meta.schema.to_arrow_schema().names
        if names not in (SCHEMA.names, LEGACY_NAMES):
            raise PrepareError(f"{path}: not a shard of this format (columns {names})")
        if meta.num_rows != info["rows"]:
            raise PrepareError(
                f"{path}: {meta.num_rows} rows, the manifest says {info['rows']} "
                "(the file was replaced after prepare; prepare again)"
            )
        size = _tile_size(meta, names)
        expected = expected or size
        if size and size != expected:
            raise PrepareError(
                f"{path}: {size[0]}x{size[1]} tiles, expected {expected[0]}x{expected[1]} "
                "(the file was replaced after prepare; prepare again)"
            )
    return paths


def _footer(path: str) -> tuple[pq.FileMetaData | None, str]:
    """A Parquet file's footer, or why it could not be read."""
    try:
        with storage.open_input(path) as src:
            return pq.ParquetFile(src).metadata, ""
    except FileNotFoundError:
        return None, "missing"
    except (OSError, pa.ArrowException, storage.StorageError) as err:
        return None, f"not a readable Parquet file ({str(err).splitlines()[0][:200]})"


def _tile_size(meta: pq.FileMetaData, names: list[str]) -> tuple[int, int] | None:
    """(height, width) of the file's tiles from the footer's statistics (``names``: its
    columns), None when not recorded or when tiles of several sizes share the file."""
    found = set()
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        stats = [group.column(names.index(c)).statistics for c in ("height", "width")]
        if any(st is None or not st.has_min_max for st in stats):
            return None
        found.add((stats[0].min, stats[0].max, stats[1].min, stats[1].max))
    if len(found) != 1:
        return None
    h0, h1, w0, w1 = found.pop()
    return (h0, w0) if h0 == h1 and w0 == w1 else None


def label_lut(manifest: dict, merge: str) -> tuple[np.ndarray, list[str]]:
    """256-entry lookup from stored label ids to evaluated classes, and the class names.

    Raises:
        ConfigError: ``merge`` is not recorded in the manifest.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
    classes = manifest["classes"]
    if merge and classes:  # unlabelled data has nothing to merge: a config's merge is moot
        merges = manifest.get("merges", {})
        if merge not in merges:
            raise ConfigError(
                f"data.merge: {merge!r} is not in the manifest (known: {sorted(merges)})"
            )
        lut[: len(merges[merge]["map"])] = merges[merge]["map"]
        return lut, merges[merge]["classes"]
    lut[: len(classes)] = np.arange(len(classes))
    return lut, list(classes)


def check_data(cfg: Config, manifest: dict, training: bool = True) -> None:
    """The config fits the dataset: band count, the jittered bands, T against the tiles a loss
    sees (the crop in training, whole tiles in evaluation); for training also a crop that fits
    the tiles and an evaluation split with tiles.

    Raises:
        ConfigError: one line naming the config key and the shards.
    """
    bands = manifest.get("bands")
    if bands is not None and cfg.model.in_channels and bands != cfg.model.in_channels:
        raise ConfigError(
            f"model.in_channels: {cfg.model.in_channels} bands configured but the "
            f"shards in {cfg.data.shards} have {bands}"
        )
    stored = manifest.get("tiling", {}).get("tile")
    if training and cfg.pairs.crop and stored and cfg.pairs.crop > stored:
        raise ConfigError(
            f"pairs.crop: {cfg.pairs.crop} is larger than the {stored}-pixel tiles of "
            f"{cfg.data.shards}"
        )
    tile = min((s for s in (cfg.pairs.crop, stored) if s), default=None)
    if cfg.model.task == "segmentation" and tile and cfg.loss.half_window >= tile:
        raise ConfigError(
            f"loss.half_window: {cfg.loss.half_window} does not fit "
            f"{tile}-pixel tiles (must be < {tile})"
        )
    if training and manifest["splits"].get(cfg.data.eval_split, {}).get("tiles", 0) == 0:
        raise ConfigError(
            f"data.eval_split: no tiles in split {cfg.data.eval_split!r} of {cfg.data.shards} "
            "(prepare it again with --test-fraction > 0: unlabelled data then gets held-out "
            "tiles too)"
        )
    pairs = cfg.pairs
    if bands is not None:
        pairs = dataclasses.replace(pairs, rgb_bands=jittered_bands(cfg, bands))
    if pairs.jitters and bands is not None and max(pairs.rgb_bands) >= bands:
        raise ConfigError(
            f"pairs.rgb_bands: {list(pairs.rgb_bands)} names band {max(pairs.rgb_bands)}, but "
            f"the shards in {cfg.data.shards} have {bands} band(s) (0 to {bands - 1}); name "
            "the bands to colour-jitter, or [] for none"
        )
    if cfg.data.band_lo and bands is not None and len(cfg.data.band_lo) != bands:
        raise ConfigError(
            f"data.band_lo: {len(cfg.data.band_lo)} values for the {bands} bands of "
            f"{cfg.data.shards}"
        )


def jittered_bands(cfg: Config, bands: int) -> tuple[int, ...]:
    """The bands g colour-jitters on images of ``bands`` bands: ``pairs.rgb_bands``, except
    that a clustering config's default (0, 1, 2) means its first bands, up to three (a grey
    digit has one); a segmentation config names its bands as they are."""
    rgb = cfg.pairs.rgb_bands
    if cfg.model.task == "clustering" and rgb == PairConfig().rgb_bands and bands < len(rgb):
        return tuple(range(bands))
    return rgb


def clustering_input_size(side: int) -> int:
    """The side a clustering network rescales images of ``side`` px to (``model.input_size``).

    The reference rescales its crops (MNIST: 20 px crops of 28 to 24, STL-10: 64 of 96); the
    trunk's cost grows with the square of the side, and on 2 CPU cores 28 px digits learned more
    per minute at 12 px than at 16 or 28. So: images up to 16 px as they are, larger ones at
    half their side, never below 12 px (28 px digits at 14, STL-10 at 48).
    """
    return side if side <= 16 else max(12, side // 2)


def fit_to_data(cfg: Config, manifest: dict) -> Config:
    """``cfg`` with what it leaves to the dataset filled in from its manifest:
    ``model.in_channels`` (0: the dataset's bands), ``model.input_size`` of a clustering
    network (0: ``clustering_input_size`` of the manifest's ``image_size``), the jittered bands
    (``jittered_bands``), the input stretch ``data.band_lo`` /
    ``band_hi`` (``data.normalise``) and the pixel type ``data.dtype``. The result travels
    with the run (checkpoints, the registered model), so a model meets new data with the
    stretch it was trained with.

    Raises:
        ConfigError: the manifest lacks what the config asks for (one line naming the key).
    """
    model, data = cfg.model, cfg.data
    bands = manifest.get("bands")
    if not model.in_channels:
        if not bands:
            raise ConfigError(
                f"model.in_channels: 0 takes the dataset's band count, but the manifest of "
                f"{data.shards} records none; set it"
            )
        model = dataclasses.replace(model, in_channels=int(bands))
    side = max(manifest.get("image_size") or [0])
    if model.task == "clustering" and not model.input_size and side:
        model = dataclasses.replace(model, input_size=clustering_input_size(side))
    pairs = cfg.pairs
    if bands:
        pairs = dataclasses.replace(pairs, rgb_bands=jittered_bands(cfg, int(bands)))
    mode = data.normalise
    if mode == "auto":  # 8-bit imagery already fills [0, 255]; anything else rarely fills its type
        mode = "unit" if manifest.get("dtype", "uint8") == "uint8" else "stats"
    if mode == "stats" and not data.band_lo:
        stats = manifest.get("band_stats")
        if not stats:
            raise ConfigError(
                f"data.normalise: 'stats' needs the band statistics that `iid prepare` records "
                f"in the manifest; {data.shards} has none (prepare it again, or use 'unit')"
            )
        lo, hi = stretch(stats)
        data = dataclasses.replace(data, band_lo=lo, band_hi=hi)
    if not data.dtype and manifest.get("dtype"):
        data = dataclasses.replace(data, dtype=str(manifest["dtype"]))
    return dataclasses.replace(cfg, model=model, data=data, pairs=pairs)


def stretch(stats: dict, k: float = 3.0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band [lo, hi] of the input stretch from a manifest's ``band_stats``: the mean
    plus and minus ``k`` standard deviations, within the band's range (robust to a few hot or
    dead pixels, yet keeps nearly every value distinct)."""
    lo, hi = [], []
    for mean, std, low, high in zip(
        stats["mean"], stats["std"], stats["min"], stats["max"], strict=True
    ):
        a, b = max(low, mean - k * std), min(high, mean + k * std)
        lo.append(float(a))
        hi.append(float(b) if b > a else float(a) + 1.0)  # a constant band: any span will do
    return tuple(lo), tuple(hi)


@dataclass(frozen=True)
class TrainInputs:
    """What the driver derives from the shards before any worker starts."""

    config: Config  # the run's config, fitted to the dataset (``fit_to_data``)
    lut: np.ndarray  # stored label id -> evaluated class
    classes: list[str]
    train_files: list[str]  # the manifest's shards of the training splits, checked
    eval_files: list[str]
    manifest: dict


def training_inputs(cfg: Config) -> TrainInputs:
    """Check the shards against the config, fit the config to them (``fit_to_data``) and list
    the files of the training and evaluation splits.

    Raises:
        PrepareError: no readable manifest, or a listed shard missing or unreadable.
        ConfigError: one line naming the config key and the shards.
    """
    shards = cfg.data.shards
    manifest = read_manifest(shards)
    check_data(cfg, manifest)
    cfg = fit_to_data(cfg, manifest)
    lut, classes = label_lut(manifest, cfg.data.merge)
    train_files = dataset_files(shards, manifest, cfg.data.train_splits)
    if not train_files:
        raise ConfigError(
            f"data.train_splits: no tiles in {list(cfg.data.train_splits)} of {shards}"
        )
    eval_files = dataset_files(shards, manifest, [cfg.data.eval_split])
    return TrainInputs(cfg, lut, classes, train_files, eval_files, manifest)
