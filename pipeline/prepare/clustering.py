"""Whole-image datasets for IID clustering -> the same Parquet shards (one image per row).

scikit-learn's digits (shipped inside the package), MNIST IDX files, STL-10 binary files and
folders with one sub-folder per class. Rows carry ``class_id`` (or null for STL-10's unlabelled
part) instead of a label raster. Large binary files are memory-mapped and written in chunks.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pipeline.data.format import PrepareError, Tile
from pipeline.prepare.run import TilingOptions
from pipeline.prepare.shards import ShardWriter

CHUNK = 4096
DIGIT_CLASSES = {"task": "clustering", "bands": 1, "classes": [str(c) for c in range(10)]}


def _rows(
    images: np.ndarray, labels: np.ndarray | None, source: str, start: int = 0
) -> Iterator[Tile]:
    for i, img in enumerate(images):
        yield Tile(
            tile_id=f"{source}#{start + i}",
            source=source,
            row_off=0,
            col_off=0,
            src_height=img.shape[1],
            src_width=img.shape[2],
            image=np.asarray(img),
            class_id=None if labels is None else int(labels[i]),
        )


def _write(
    out: Path,
    parts: list[tuple[str, str, Iterator[Tile]]],
    meta: dict,
    n_classes: int,
    opts: TilingOptions,
    bad: Sequence[dict] = (),
) -> dict:
    """parts: (stem, split, tiles). Each part is committed as a whole or not at all; ``bad``:
    inputs already skipped."""
    with ShardWriter(
        out, n_classes, opts.rows_per_shard, opts.compression, opts.overwrite
    ) as writer:
        for stem, split, tiles in parts:
            with writer.source(stem, stem):
                for tile in tiles:
                    writer.add(tile, split)
        for b in bad:
            writer.skip(b["file"], b["error"])
        return writer.finish(meta, opts.skip_bad)


# ------------------------------------------------------------------------------------- digits
def prepare_digits(out: Path, opts: TilingOptions) -> dict:
    """scikit-learn's 1797 8x8 digits (values 0-16 scaled to 0-255), hash-split train/test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * 16, 0, 255).astype(np.uint8)[:, None]
    test = _hash_split(len(images), "digits", opts)
    parts = [
        ("digits-train", "train", _rows(images[~test], d.target[~test], "digits")),
        ("digits-test", "test", _rows(images[test], d.target[test], "digits")),
    ]
    return _write(out, parts, {"dataset": "digits"} | DIGIT_CLASSES, 10, opts)


def _hash_split(n: int, name: str, opts: TilingOptions) -> np.ndarray:
    draws = [
        int.from_bytes(
            hashlib.blake2b(f"{opts.seed}:{name}:{i}".encode(), digest_size=8).digest(), "big"
        )
        / 2**64
        for i in range(n)
    ]
    return np.array(draws) < opts.test_fraction


# -------------------------------------------------------------------------------------- MNIST
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


def _find(src: Path, name: str) -> Path:
    for candidate in (src / name, src / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise PrepareError(f"{src}: {name}[.gz] not found (expected the MNIST IDX files)")


def prepare_mnist(src: Path, out: Path, opts: TilingOptions) -> dict:
    """MNIST (or Fashion-MNIST) IDX files: train-* -> train split, t10k-* -> test split."""
    parts = []
    for prefix, split in (("train", "train"), ("t10k", "test")):
        images = read_idx(_find(src, f"{prefix}-images-idx3-ubyte"), 3)
        labels = read_idx(_find(src, f"{prefix}-labels-idx1-ubyte"), 1)
        if len(images) != len(labels):
            raise PrepareError(f"{src}: {prefix} has {len(images)} images but {len(labels)} labels")
        parts.append((f"mnist-{prefix}", split, _rows(images[:, None], labels, f"mnist-{prefix}")))
    return _write(out, parts, {"dataset": "mnist"} | DIGIT_CLASSES, 10, opts)


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


def _chunked(images: np.ndarray, labels: np.ndarray | None, source: str) -> Iterator[Tile]:
    for start in range(0, len(images), CHUNK):
        chunk = np.ascontiguousarray(images[start : start + CHUNK])
        lab = None if labels is None else labels[start : start + CHUNK]
        yield from _rows(chunk, lab, source, start)


def prepare_stl10(src: Path, out: Path, opts: TilingOptions) -> dict:
    """STL-10 binary files (``stl10_binary/``): train, test and the 100k unlabelled images."""
    parts = []
    for name, split in (("train", "train"), ("test", "test"), ("unlabeled", "unlabelled")):
        x = src / f"{name}_X.bin"
        if not x.is_file():
            if name == "unlabeled":
                continue
            raise PrepareError(f"{x}: not found (expected the STL-10 binary files)")
        images = _stl_images(x)
        labels = None
        if split != "unlabelled":
            labels = np.fromfile(src / f"{name}_y.bin", dtype=np.uint8).astype(np.int64) - 1
            if len(labels) != len(images):
                raise PrepareError(
                    f"{src / f'{name}_y.bin'}: {len(labels)} labels for {len(images)} images"
                )
        parts.append((f"stl10-{name}", split, _chunked(images, labels, f"stl10-{name}")))
    meta = {"dataset": "stl10", "task": "clustering", "bands": 3, "classes": list(STL_CLASSES)}
    return _write(out, parts, meta, 10, opts)


# ------------------------------------------------------------------------------ class folders
def prepare_class_folders(src: Path, out: Path, opts: TilingOptions, size: int = 0) -> dict:
    """``SRC/<class>/<image>``: one class per sub-folder (sorted names -> ids 0..K-1).

    Args:
        size: resize every image to size x size (0: keep; then all must share one size).
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
    shape: tuple[int, ...] | None = None
    splits: dict[str, list[Tile]] = {"train": [], "test": []}
    bad = []
    for (cls, path), is_test in zip(files, test, strict=True):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if size:
                    im = im.resize((size, size), Image.BILINEAR)
                arr = np.asarray(im).transpose(2, 0, 1)
        except (UnidentifiedImageError, OSError) as err:
            bad.append({"file": str(path), "error": f"{path}: not a readable image ({err})"})
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
        splits["test" if is_test else "train"].append(
            Tile(
                tile_id=rel,
                source=rel,
                row_off=0,
                col_off=0,
                src_height=arr.shape[1],
                src_width=arr.shape[2],
                image=arr,
                class_id=classes.index(cls),
            )
        )
    parts = [(f"classes-{split}", split, iter(tiles)) for split, tiles in splits.items()]
    meta = {"dataset": "class_folders", "task": "clustering", "bands": 3, "classes": classes}
    return _write(out, parts, meta, len(classes), opts, bad)
