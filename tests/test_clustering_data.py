"""Whole-image clustering datasets: digits, MNIST IDX, STL-10 binary, class folders."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data.format import PrepareError
from pipeline.prepare.clustering import (
    prepare_class_folders,
    prepare_digits,
    prepare_mnist,
    prepare_stl10,
)
from pipeline.prepare.run import TilingOptions
from pipeline.prepare.shards import BadFilesError
from tests.conftest import decode_row

OPTS = TilingOptions(progress=False, test_fraction=0.2)


def rows_of(out):
    return [r for p in sorted(out.rglob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def write_idx(path, array, gz=False):
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_digits(tmp_path):
    manifest = prepare_digits(tmp_path, OPTS)
    rows = rows_of(tmp_path)
    assert len(rows) == 1797
    assert manifest["splits"]["train"]["tiles"] + manifest["splits"]["test"]["tiles"] == 1797
    assert sum(manifest["splits"]["train"]["class_pixels"]) == manifest["splits"]["train"]["tiles"]
    assert decode_row(rows[0])[0].shape == (1, 8, 8) and rows[0]["class_id"] in range(10)


def test_mnist_idx_round_trip_and_truncation(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "mnist"
    src.mkdir()
    train = rng.integers(0, 255, (30, 28, 28))
    write_idx(src / "train-images-idx3-ubyte", train)
    write_idx(src / "train-labels-idx1-ubyte", np.arange(30) % 10)
    write_idx(src / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (10, 28, 28)), gz=True)
    write_idx(src / "t10k-labels-idx1-ubyte.gz", np.arange(10) % 10, gz=True)
    manifest = prepare_mnist(src, tmp_path / "out", OPTS)
    assert manifest["splits"]["train"]["tiles"] == 30 and manifest["splits"]["test"]["tiles"] == 10
    first = next(r for r in rows_of(tmp_path / "out") if r["tile_id"] == "mnist-train#3")
    assert np.array_equal(decode_row(first)[0][0], train[3]) and first["class_id"] == 3
    data = (src / "train-images-idx3-ubyte").read_bytes()
    (src / "train-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(
        PrepareError, match=r"train-images-idx3-ubyte: .* bytes, expected .*truncated"
    ):
        prepare_mnist(src, tmp_path / "out2", OPTS)


def test_stl10_binary_layout(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 255, (5, 3, 96, 96), dtype=np.uint8)
    # STL-10 stores each band column-major
    imgs.transpose(0, 1, 3, 2).tofile(tmp_path / "train_X.bin")
    np.array([1, 2, 3, 4, 10], np.uint8).tofile(tmp_path / "train_y.bin")
    imgs[:2].transpose(0, 1, 3, 2).tofile(tmp_path / "test_X.bin")
    np.array([5, 6], np.uint8).tofile(tmp_path / "test_y.bin")
    imgs[:3].transpose(0, 1, 3, 2).tofile(tmp_path / "unlabeled_X.bin")
    manifest = prepare_stl10(tmp_path, tmp_path / "out", OPTS)
    assert [manifest["splits"][s]["tiles"] for s in ("train", "test", "unlabelled")] == [5, 2, 3]
    row = next(r for r in rows_of(tmp_path / "out") if r["tile_id"] == "stl10-train#4")
    assert np.array_equal(decode_row(row)[0], imgs[4]) and row["class_id"] == 9
    (tmp_path / "test_X.bin").write_bytes((tmp_path / "test_X.bin").read_bytes()[:-7])
    with pytest.raises(PrepareError, match="not a whole number of 3x96x96 images"):
        prepare_stl10(tmp_path, tmp_path / "out2", OPTS)


def test_class_folders_with_a_broken_image(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    for cls in ("cats", "dogs"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / "src" / cls / f"{i}.png"
            )
    (tmp_path / "src/dogs/broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(BadFilesError, match="broken.png: not a readable image"):
        prepare_class_folders(tmp_path / "src", tmp_path / "out", OPTS, size=16)
    rows = rows_of(tmp_path / "out")
    assert len(rows) == 8
    assert {r["class_id"] for r in rows if r["source"].startswith("dogs")} == {1}
    assert all(decode_row(r)[0].shape == (3, 16, 16) for r in rows)
