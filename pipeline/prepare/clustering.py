"""Whole-image datasets for IID clustering -> the same Parquet shards (one image per row).

scikit-learn's digits (shipped inside the package), MNIST (IDX files or label + pixel CSVs),
STL-10 binary files and folders with one sub-folder per class. Rows carry ``class_id`` (or null
for STL-10's unlabelled part) instead of a label raster. No tiling: every image is one row, so
only the options of ``TilingOptions`` that concern the split and the output apply. Large binary
files are memory-mapped and written in chunks.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from pipeline.data.format import PrepareError, Tile
from pipeline.prepare.run import TilingOptions
from pipeline.prepare.shards import ShardWriter

CHUNK = 4096
DIGIT_CLASSES = {"task": "clustering", "bands": 1, "classes": [str(c) for c in range(10)]}

# (stem of the source's shards, its image count for the progress bar, its (split, tile) rows)
Part = tuple[str, int, Iterator[tuple[str, Tile]]]


def _rows(
    images: np.ndarray,
    labels: np.ndarray | None,
    source: str,
    splits: str | np.ndarray,
    start: int = 0,
) -> Iterator[tuple[str, Tile]]:
    """(split, tile) per image of ``images`` (n, bands, H, W); ``splits``: one split for all,
    or one per image. Tile ids count from ``start``, the index of ``images[0]`` in its file."""
    for i, img in enumerate(images):
        tile = Tile(
            tile_id=f"{source}#{start + i}",
            source=source,
            row_off=0,
            col_off=0,
            src_height=img.shape[1],
            src_width=img.shape[2],
            image=np.asarray(img),
            class_id=None if labels is None else int(labels[i]),
        )
        yield (splits if isinstance(splits, str) else str(splits[i])), tile


def _chunked(
    images: np.ndarray, labels: np.ndarray | None, source: str, splits: str | np.ndarray
) -> Iterator[tuple[str, Tile]]:
    """``_rows`` over a memory-mapped array, CHUNK images read at a time."""
    for start in range(0, len(images), CHUNK):
        chunk = np.ascontiguousarray(images[start : start + CHUNK])
        lab = None if labels is None else labels[start : start + CHUNK]
        part = splits if isinstance(splits, str) else splits[start : start + CHUNK]
        yield from _rows(chunk, lab, source, part, start)


def _write(
    out: Path,
    parts: list[Part],
    meta: dict,
    n_classes: int,
    opts: TilingOptions,
    bad: Sequence[dict] = (),
) -> dict:
    """Write ``parts`` as shards under ``out``, then the manifest.

    Args:
        out: output folder.
        parts: one per source; each is committed as a whole or not at all.
        meta: dataset description merged into the manifest.
        n_classes: classes for the histograms.
        opts: the split is already made; output options and the progress bar.
        bad: inputs skipped. Read after the parts, so a part's generator may add to it.

    Returns:
        The manifest dict, with ``image_size`` [height, width] when every image shares one
        (what a clustering model's input size is chosen from).

    Raises:
        PrepareError: on an unusable output folder.
        BadFilesError: if ``bad`` is not empty and ``opts.skip_bad`` is false.
    """
    sizes: set[tuple[int, int]] = set()
    bar = tqdm(
        total=sum(n for _, n, _ in parts),
        unit="image",
        desc="writing",
        disable=None if opts.progress else True,
    )
    with (
        bar,
        ShardWriter(out, n_classes, opts.rows_per_shard, opts.compression, opts.overwrite) as w,
    ):
        for stem, _, rows in parts:
            with w.source(stem, stem):
                for split, tile in rows:
                    w.add(tile, split)
                    sizes.add(tile.image.shape[-2:])
                    bar.update()
        for b in bad:
            w.skip(b["file"], b["error"])
        if len(sizes) == 1:
            meta = meta | {"image_size": [int(v) for v in sizes.pop()]}
        return w.finish(meta, opts.skip_bad)


def _hash_split(n: int, name: str, opts: TilingOptions) -> np.ndarray:
    """Which of ``n`` images of ``name`` are test images: a hash of (seed, name, index) against
    ``opts.test_fraction``, so the same files give the same split on every run."""
    draws = [
        int.from_bytes(
            hashlib.blake2b(f"{opts.seed}:{name}:{i}".encode(), digest_size=8).digest(), "big"
        )
        / 2**64
        for i in range(n)
    ]
    return np.array(draws) < opts.test_fraction


def _split_names(n: int, name: str, opts: TilingOptions) -> np.ndarray:
    return np.where(_hash_split(n, name, opts), "test", "train")


def _split_meta(opts: TilingOptions, by_file_name: bool, hashed: bool) -> dict:
    """How the train/test split was made, for the manifest."""
    meta: dict = {"by_file_name": by_file_name}
    if hashed:
        meta |= {"test_fraction": opts.test_fraction, "seed": opts.seed}
    return meta


# ------------------------------------------------------------------------------------- digits
@dataclass(frozen=True)
class DigitsSpec:
    """Which digits ``prepare_digits`` writes.

    At ``size`` 8, scikit-learn's images as they are. Larger, a stand-in for bigger digit images
    (MNIST's 28 px): each image is upscaled (cubic) so the digit fills the central 20/28 of the
    side, as MNIST's do, its strokes are thickened or thinned at random, and an elastic
    distortion (Simard et al. 2003: a random displacement field smoothed by a Gaussian of sigma 4
    px and scaled by alpha 34 px at 28 px, both in proportion to ``size``) bends it, so that no two
    copies of an image match pixel for pixel.

    Attributes:
        size: side in pixels (8: the originals, untouched).
        copies: distorted copies of each image (only above 8 px).
        half: "all" images, or only the "even" or "odd" indices: two disjoint sets of
            originals, so that a recipe chosen on one can be judged on the other.
        seed: the distortions' random seed.
    """

    size: int = 8
    copies: int = 1
    half: Literal["all", "even", "odd"] = "all"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"digits size must be >= 8 px, got {self.size!r}")
        if self.copies < 1 or (self.size == 8 and self.copies != 1):
            raise ValueError(
                f"digits copies must be >= 1, and 1 at 8 px (nothing to distort), got "
                f"{self.copies!r}"
            )
        if self.half not in ("all", "even", "odd"):
            raise ValueError(f"digits half must be all, even or odd, got {self.half!r}")


def distort_digits(images: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``DigitsSpec``'s larger stand-in of 8x8 images.

    Args:
        images: (n, 8, 8) floats in [0, 1].
        size: output side in pixels.
        rng: draws the stroke changes and displacement fields.

    Returns:
        (n, size, size) uint8.
    """
    from scipy import ndimage

    inner = round(size * 20 / 28)
    pad = (size - inner) // 2
    sigma, alpha = 4 * size / 28, 34 * size / 28
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for i, image in enumerate(images):
        canvas = np.zeros((size, size))
        big = np.clip(ndimage.zoom(image, inner / 8, order=3), 0, 1)
        canvas[pad : pad + big.shape[0], pad : pad + big.shape[1]] = big
        stroke = rng.integers(-1, 2)  # thinner, as drawn, thicker
        if stroke > 0:
            canvas = ndimage.grey_dilation(canvas, size=(2, 2))
        elif stroke < 0:
            canvas = (canvas + ndimage.grey_erosion(canvas, size=(2, 2))) / 2
        dy, dx = (
            ndimage.gaussian_filter(rng.uniform(-1, 1, (size, size)), sigma) * alpha
            for _ in range(2)
        )
        bent = ndimage.map_coordinates(canvas, [yy + dy, xx + dx], order=1, mode="constant")
        out[i] = np.clip(np.rint(bent * 255), 0, 255)
    return out


def prepare_digits(out: Path, opts: TilingOptions, spec: DigitsSpec = DigitsSpec()) -> dict:
    """scikit-learn's 1797 8x8 digits (values 0-16 scaled to 0-255), hash-split train/test, or
    the larger stand-in ``spec`` describes.

    Args:
        out: output folder.
        opts: ``test_fraction`` and ``seed`` make the split (by original image: every copy of
            one lands in the same split); the output options apply.
        spec: size, copies and half.

    Returns:
        The manifest dict.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.arange(len(d.images))
    if spec.half != "all":
        keep = keep[keep % 2 == (spec.half == "odd")]
    splits = _split_names(len(d.images), "digits", opts)[keep]
    labels = d.target[keep]
    if spec.size == 8:
        images = np.clip(d.images[keep] * 16, 0, 255).astype(np.uint8)[:, None]
        parts = [("digits", len(images), _rows(images, labels, "digits", splits))]
    else:
        rng = np.random.default_rng(spec.seed)
        originals = d.images[keep] / 16.0
        copies = [distort_digits(originals, spec.size, rng)[:, None] for _ in range(spec.copies)]
        n = len(keep)
        rows = (
            _rows(images, labels, "digits", splits, start=c * n) for c, images in enumerate(copies)
        )
        parts = [("digits", n * spec.copies, itertools.chain.from_iterable(rows))]
    meta = {"dataset": "digits"} | DIGIT_CLASSES | {"split": _split_meta(opts, False, True)}
    if spec != DigitsSpec():
        meta["digits"] = dataclasses.asdict(spec)
    return _write(out, parts, meta, 10, opts)


# -------------------------------------------------------------------------------------- MNIST
IDX_SETS = (("train", "train"), ("t10k", "test"))  # file prefix, split


def _open_bytes(path: Path) -> np.ndarray:
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            return np.frombuffer(f.read(), dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An IDX (MNIST) array of unsigned bytes with ``dims`` dimensions.

    Raises:
        PrepareError: wrong magic number, or a size that disagrees with the header.
    """
    data = _open_bytes(path)
    header = 4 + 4 * dims
    if len(data) < header:
        raise PrepareError(f"{path}: {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(bytes(data[:4]), "big")
    if magic != 0x0800 + dims:
        raise PrepareError(
            f"{path}: IDX magic {magic:#010x}, expected {0x0800 + dims:#010x} "
            f"(unsigned bytes, {dims} dimensions)"
        )
    shape = tuple(int.from_bytes(bytes(data[4 + 4 * i : 8 + 4 * i]), "big") for i in range(dims))
    need = header + int(np.prod(shape))
    if len(data) != need:
        raise PrepareError(
            f"{path}: {len(data)} bytes, expected {need} for shape {shape} (truncated?)"
        )
    return data[header:].reshape(shape)


def _idx_names(prefix: str) -> tuple[str, str]:
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find(src: Path, name: str) -> Path:
    for candidate in (src / name, src / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise PrepareError(f"{src}: {name}[.gz] not found (expected the MNIST IDX files)")


def _check_labels(labels: np.ndarray, name: str | Path) -> None:
    """MNIST-style class ids are 0-9 (the manifest lists 10 classes)."""
    if len(labels) and int(labels.max()) > 9:
        i = int(np.argmax(labels > 9))
        raise PrepareError(f"{name}: label {int(labels[i])} at item {i}, expected 0-9")


def prepare_mnist(src: Path, out: Path, opts: TilingOptions) -> dict:
    """MNIST or Fashion-MNIST: IDX files, or CSVs of label + pixels (see ``read_mnist_csv``).

    ``src`` is a folder with the IDX files, a folder with ``.csv`` files, or one ``.csv`` file.
    IDX: with both sets (``train-*`` and ``t10k-*``, each images + labels, ``.gz`` or not) the
    files name the split and ``opts.test_fraction`` does not apply; with one set, its images
    are split by ``opts.test_fraction`` and ``opts.seed``. CSV: when the folder holds both a
    file whose name contains "train" and one whose name contains "test", the names decide
    their split; every other file (or a single ``.csv``) is split by the fraction.

    Args:
        src: the folder or the ``.csv`` file.
        out: output folder.
        opts: split and output options.

    Returns:
        The manifest dict.

    Raises:
        PrepareError: no MNIST files, IDX files and CSVs in the same folder, a set missing its
            labels or images, a malformed file (nothing is written then), or a bad output.
    """
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise PrepareError(f"{src}: not a .csv file (give a .csv or a folder of MNIST files)")
        return _prepare_mnist_csv([src], out, opts)
    if not src.is_dir():
        raise PrepareError(f"{src}: no such folder or .csv file")
    sets = [
        (prefix, split)
        for prefix, split in IDX_SETS
        if any((src / f"{n}{gz}").is_file() for n in _idx_names(prefix) for gz in ("", ".gz"))
    ]
    csvs = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
    if sets and csvs:
        raise PrepareError(
            f"{src}: holds both MNIST IDX files and .csv files ({csvs[0].name}); give a folder "
            "with one kind, or a single .csv file"
        )
    if csvs:
        return _prepare_mnist_csv(csvs, out, opts)
    if not sets:
        raise PrepareError(
            f"{src}: no MNIST files: expected train-images-idx3-ubyte[.gz] and "
            "train-labels-idx1-ubyte[.gz] (and/or the t10k- pair), or .csv files"
        )
    parts: list[Part] = []
    for prefix, split in sets:
        image_name, label_name = _idx_names(prefix)
        images = read_idx(_find(src, image_name), 3)
        labels_path = _find(src, label_name)
        labels = read_idx(labels_path, 1)
        if len(images) != len(labels):
            raise PrepareError(f"{src}: {prefix} has {len(images)} images but {len(labels)} labels")
        _check_labels(labels, labels_path)
        source = f"mnist-{prefix}"
        # One set alone would leave a split empty: its images are hash-split instead.
        splits = split if len(sets) == 2 else _split_names(len(images), source, opts)
        parts.append((source, len(images), _chunked(images[:, None], labels, source, splits)))
    by_name = len(sets) == 2
    meta = {"dataset": "mnist"} | DIGIT_CLASSES | {"split": _split_meta(opts, by_name, not by_name)}
    return _write(out, parts, meta, 10, opts)


_INT = re.compile(r"-?[0-9]+")


def read_mnist_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CSV of label + pixels, as Kaggle's ``mnist_train.csv``: every line a class id 0-9,
    then side*side pixel values 0-255, row by row. The first line is a header (skipped) when
    its first field is not an integer (``label,pixel0,...`` or ``label,1x1,...``). Read with
    pyarrow's streaming reader, block by block.

    Args:
        path: the CSV file.

    Returns:
        Images (n, side, side) and labels (n,), both uint8.

    Raises:
        PrepareError: no data lines, a pixel count that is not a square, or a bad line: a wrong
            number of values, a value that is not an integer or out of range (the first such
            line is named by its line number in the file, the header counted).
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        first = f.readline().rstrip("\r\n")
    if not first:
        raise PrepareError(f"{path}: empty first line (expected a header or label,pixels...)")
    fields = first.split(",")
    header = not _INT.fullmatch(fields[0].strip('"'))
    width = len(fields)
    side = math.isqrt(width - 1)
    if width < 2 or side * side != width - 1:
        raise PrepareError(
            f"{path}: {width - 1} pixel columns after the label, expected a square number "
            "(side*side, such as 784 for 28x28)"
        )
    names = [f"c{i}" for i in range(width)]
    read = pacsv.ReadOptions(column_names=names, skip_rows=int(header), block_size=1 << 22)
    # No null values: an empty field is a bad value, not a missing pixel.
    convert = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.int64()), null_values=[])
    chunks: list[np.ndarray] = []
    good = 0  # data lines read and checked
    try:
        with pacsv.open_csv(path, read_options=read, convert_options=convert) as reader:
            for batch in reader:
                block = np.stack([c.to_numpy() for c in batch.columns], axis=1)
                if block.min() < 0 or block[:, 1:].max() > 255 or block[:, 0].max() > 9:
                    raise PrepareError(_bad_csv_line(path, header, width, good))
                chunks.append(block.astype(np.uint8))
                good += len(block)
    except pa.ArrowInvalid as err:
        # pyarrow's message names neither the line nor, reliably, the row: find it again.
        raise PrepareError(
            _bad_csv_line(path, header, width, good) or f"{path}: {str(err).splitlines()[0]}"
        ) from err
    if not good:
        raise PrepareError(f"{path}: no data lines")
    table = np.concatenate(chunks)
    return table[:, 1:].reshape(-1, side, side), table[:, 0]


def _bad_csv_line(path: Path, header: bool, width: int, skip: int) -> str:
    """The first bad line of ``path`` after ``skip`` good data lines, as a one-line error
    ("" if none is found). Slow (Python), so only run once a block has been found bad."""
    side = math.isqrt(width - 1)
    seen = 0
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        for number, line in enumerate(f, 1):
            text = line.rstrip("\r\n")
            if (number == 1 and header) or not text:  # pyarrow skips empty lines too
                continue
            seen += 1
            if seen <= skip:
                continue
            fields = text.split(",")
            if len(fields) != width:
                return (
                    f"{path}: line {number}: {len(fields)} values, expected {width} "
                    f"(a label, then {side}x{side} pixels)"
                )
            for column, field in enumerate(fields, 1):
                value = field.strip('"')
                if not _INT.fullmatch(value):
                    return f"{path}: line {number}: column {column} is {field!r}, not an integer"
                top, what = (9, "label") if column == 1 else (255, "pixel")
                if not 0 <= int(value) <= top:
                    return (
                        f"{path}: line {number}: column {column} is {what} {value}, "
                        f"expected 0-{top}"
                    )
    return ""


def _prepare_mnist_csv(files: list[Path], out: Path, opts: TilingOptions) -> dict:
    """Every CSV is read and checked before anything is written, so a bad line costs nothing."""
    named = [
        "test" if "test" in p.name.lower() else "train" if "train" in p.name.lower() else None
        for p in files
    ]
    # Names decide only when both splits are named; else one split would be empty.
    by_name = "test" in named and "train" in named
    parts: list[Part] = []
    hashed = False
    for path, split in zip(files, named, strict=True):
        images, labels = read_mnist_csv(path)
        if not (by_name and split):
            split = _split_names(len(images), path.name, opts)
            hashed = True
        parts.append(
            (f"mnist-{path.stem}", len(images), _rows(images[:, None], labels, path.name, split))
        )
    meta = {"dataset": "mnist"} | DIGIT_CLASSES | {"split": _split_meta(opts, by_name, hashed)}
    return _write(out, parts, meta, 10, opts)


# ------------------------------------------------------------------------------------- STL-10
STL_SIDE = 96
STL_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def _stl_images(path: Path) -> np.ndarray:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    size = 3 * STL_SIDE * STL_SIDE
    if len(data) % size:
        raise PrepareError(
            f"{path}: {len(data)} bytes is not a whole number of 3x96x96 images (truncated?)"
        )
    # Stored column-major per band: (n, 3, W, H) -> (n, 3, H, W)
    return data.reshape(-1, 3, STL_SIDE, STL_SIDE).transpose(0, 1, 3, 2)


def prepare_stl10(src: Path, out: Path, opts: TilingOptions) -> dict:
    """STL-10 binary files (``stl10_binary/``): train, test and the 100k unlabelled images.

    Args:
        src: the folder with ``train_X.bin``, ``train_y.bin``, ``test_*`` and (optionally)
            ``unlabeled_X.bin``.
        out: output folder.
        opts: output options; the files name the split, so ``test_fraction`` does not apply.

    Returns:
        The manifest dict.

    Raises:
        PrepareError: a file missing or truncated, labels that disagree with the images, or a
            bad output folder.
    """
    parts: list[Part] = []
    for name, split in (("train", "train"), ("test", "test"), ("unlabeled", "unlabelled")):
        x = src / f"{name}_X.bin"
        if not x.is_file():
            if name == "unlabeled":
                continue
            raise PrepareError(f"{x}: not found (expected the STL-10 binary files)")
        images = _stl_images(x)
        labels = None
        if split != "unlabelled":
            y = src / f"{name}_y.bin"
            if not y.is_file():
                raise PrepareError(f"{y}: not found (expected the STL-10 binary files)")
            labels = np.fromfile(y, dtype=np.uint8).astype(np.int64) - 1
            if len(labels) != len(images):
                raise PrepareError(f"{y}: {len(labels)} labels for {len(images)} images")
            if len(labels) and not 0 <= labels.min() <= labels.max() <= 9:
                raise PrepareError(f"{y}: labels outside 1-10 (STL-10 counts classes from 1)")
        source = f"stl10-{name}"
        parts.append((source, len(images), _chunked(images, labels, source, split)))
    meta = {
        "dataset": "stl10",
        "task": "clustering",
        "bands": 3,
        "classes": list(STL_CLASSES),
        "split": _split_meta(opts, True, False),
    }
    return _write(out, parts, meta, 10, opts)


# ------------------------------------------------------------------------------ class folders
# Pillow modes of one grey band; I;16* and I (Pillow's 32-bit integer mode) are kept as 16 bits.
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"})
WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def _is_grey(im) -> bool:
    """One grey band: a greyscale mode, or a palette whose every colour is a grey."""
    if im.mode in ("P", "PA"):
        pal = im.getpalette() or []
        return all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))
    return im.mode in GREY_MODES


def _image_array(im, path: Path, grey: bool, wide: bool, size: int, majority: str) -> np.ndarray:
    """``im`` as (bands, H, W): (1, H, W) uint8, or uint16 if ``wide``, for a ``grey``
    dataset; else (3, H, W) uint8.

    Raises:
        PrepareError: a colour image in a greyscale dataset, or 32-bit values beyond 16 bits.
    """
    from PIL import Image

    if grey and not _is_grey(im):
        raise PrepareError(
            f"{path}: colour image (mode {im.mode}) in a greyscale dataset ({majority}); "
            "expected one grey band"
        )
    mode = im.mode
    if mode in WIDE_MODES:
        # "I" resizes in every Pillow; 16-bit values stay exact in it.
        im = im.convert("I")
        if size:
            im = im.resize((size, size), Image.BILINEAR)
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise PrepareError(
                f"{path}: values {arr.min()}..{arr.max()} (mode {mode}) do not fit 16 bits"
            )
        arr = arr.astype(np.uint16)
        if not grey:
            return np.repeat((arr >> 8).astype(np.uint8)[None], 3, axis=0)
        return arr[None]
    im = im.convert("L" if grey else "RGB")  # drops alpha; repeats grey into R, G and B
    if size:
        im = im.resize((size, size), Image.BILINEAR)
    arr = np.asarray(im)
    if not grey:
        return arr.transpose(2, 0, 1)
    # 8-bit images among 16-bit ones: scaled so that white stays white.
    return (arr.astype(np.uint16) * 257)[None] if wide else arr[None]


def prepare_class_folders(src: Path, out: Path, opts: TilingOptions, size: int = 0) -> dict:
    """``SRC/<class>/<image>``: one class per sub-folder (sorted names -> ids 0..K-1),
    hash-split into train/test.

    Bands follow the images' majority, decided from their modes before any is decoded: when
    more than half are greyscale (Pillow modes 1, L, LA, I, I;16..., or a palette of greys) the
    dataset has one band, uint16 if any greyscale image has 16 bits (8-bit ones are then scaled
    by 257), else uint8; a colour image in it is a bad file, named with its mode. Otherwise
    (ties included: nothing is lost) it has three uint8 bands: RGB, alpha dropped, and a
    greyscale image is repeated into the three (16-bit ones reduced to their high byte).
    Images are decoded one at a time and written as they come.

    Args:
        src: the folder of class sub-folders.
        out: output folder.
        opts: split and output options; ``skip_bad`` accepts bad files.
        size: resize every image to size x size (0: keep; then all must share one size).

    Returns:
        The manifest dict.

    Raises:
        PrepareError: no class sub-folders, or a bad output folder.
        BadFilesError: some files were unreadable, of the minority colour mode or of another
            size, and ``opts.skip_bad`` is false (the dataset is written without them).
    """
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise PrepareError(f"{src}: no class sub-folders found")
    files = [
        (c, p)
        for c in classes
        for p in sorted((src / c).iterdir())
        if p.is_file() and not p.name.startswith(".")
    ]
    test = _hash_split(len(files), src.name, opts)
    bad: list[dict] = []
    readable: list[tuple[str, Path, bool]] = []
    greys: list[str] = []  # modes of the greyscale files
    for (cls, path), is_test in zip(files, test, strict=True):
        try:
            with Image.open(path) as im:  # reads the header only
                mode, is_grey = im.mode, _is_grey(im)
        except (UnidentifiedImageError, OSError) as err:
            bad.append({"file": str(path), "error": f"{path}: not a readable image ({err})"})
            continue
        if mode == "F":
            bad.append({"file": str(path), "error": f"{path}: mode F (32-bit float) unsupported"})
            continue
        if is_grey:
            greys.append(mode)
        readable.append((cls, path, bool(is_test)))
    grey = 2 * len(greys) > len(readable)
    wide = grey and any(m in WIDE_MODES for m in greys)
    majority = f"{len(greys)} of {len(readable)} images are greyscale"
    class_ids = {c: i for i, c in enumerate(classes)}

    def rows() -> Iterator[tuple[str, Tile]]:
        shape: tuple[int, ...] | None = None
        for cls, path, is_test in readable:
            try:
                with Image.open(path) as im:
                    arr = _image_array(im, path, grey, wide, size, majority)
            except PrepareError as err:
                bad.append({"file": str(path), "error": str(err)})
                continue
            except (UnidentifiedImageError, OSError) as err:
                bad.append({"file": str(path), "error": f"{path}: not a readable image ({err})"})
                continue
            except ValueError as err:  # Pillow: a mode it cannot convert
                bad.append({"file": str(path), "error": f"{path}: not a usable image ({err})"})
                continue
            if shape is None:
                shape = arr.shape
            if arr.shape != shape:
                bad.append(
                    {
                        "file": str(path),
                        "error": f"{path}: {arr.shape[2]}x{arr.shape[1]} "
                        f"pixels, expected {shape[2]}x{shape[1]} (pass --size to resize)",
                    }
                )
                continue
            rel = str(path.relative_to(src))
            tile = Tile(
                tile_id=rel,
                source=rel,
                row_off=0,
                col_off=0,
                src_height=arr.shape[1],
                src_width=arr.shape[2],
                image=arr,
                class_id=class_ids[cls],
            )
            yield ("test" if is_test else "train"), tile

    meta = {
        "dataset": "class_folders",
        "task": "clustering",
        "bands": 1 if grey else 3,
        "classes": classes,
        "split": _split_meta(opts, False, True),
    }
    return _write(out, [("classes", len(readable), rows())], meta, len(classes), opts, bad)
