"""Whole-image clustering datasets: digits, MNIST (IDX and CSV), STL-10 binary, class folders."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli_main
from pipeline.data.format import PrepareError, decode_raw
from pipeline.prepare.clustering import (
    DigitsSpec,
    prepare_class_folders,
    prepare_digits,
    prepare_mnist,
    prepare_stl10,
)
from pipeline.prepare.run import TilingOptions
from pipeline.prepare.shards import BadFilesError

OPTS = TilingOptions(progress=False, test_fraction=0.2)


def rows_of(out):
    return [r for p in sorted(out.rglob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def image_of(row) -> np.ndarray:
    """A row's image (B, H, W) through the pipeline's decoder."""
    return decode_raw({k: [v] for k, v in row.items()})[0][0]


def split_of(out) -> dict[str, str]:
    return {r["tile_id"]: r["split"] for r in rows_of(out)}


def test_digits_stand_in_is_larger_bent_and_split_by_original(tmp_path):
    even = prepare_digits(tmp_path / "even", OPTS, DigitsSpec(28, copies=2, half="even"))
    odd = prepare_digits(tmp_path / "odd", OPTS, DigitsSpec(28, copies=2, half="odd", seed=1))
    assert even["image_size"] == [28, 28] and even["digits"]["half"] == "even"
    rows = rows_of(tmp_path / "even")
    assert len(rows) == 2 * 899 and len({r["tile_id"] for r in rows}) == len(rows)
    images = np.stack([image_of(r) for r in rows])
    assert images.shape[1:] == (1, 28, 28) and images.dtype == np.uint8
    # The digit sits inside the frame, as MNIST's do: the border rows are (almost) empty.
    assert images[:, 0, :2].mean() < 10 and images[:, 0, 10:18, 10:18].mean() > 40
    # Copy c of original i is row c * 899 + i: copies differ (bent apart), share class and split.
    first, second = images[:899].astype(int), images[899:].astype(int)
    assert all(np.abs(a - b).mean() > 3 for a, b in zip(first[:50], second[:50], strict=True))
    by_id = {int(r["tile_id"].split("#")[1]): r for r in rows}
    for i in range(899):
        a, b = by_id[i], by_id[899 + i]
        assert a["class_id"] == b["class_id"] and a["split"] == b["split"]
    # The halves hold different originals: their classes interleave as sklearn's order does.
    assert sum(odd["splits"][s]["tiles"] for s in ("train", "test")) == 2 * 898
    with pytest.raises(ValueError, match="digits copies must be >= 1, and 1 at 8 px"):
        DigitsSpec(copies=3)
    with pytest.raises(ValueError, match="digits size must be >= 8 px, got 4"):
        DigitsSpec(size=4)


def write_idx(path, array, gz=False):
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_digits(tmp_path):
    manifest = prepare_digits(tmp_path, OPTS)
    rows = rows_of(tmp_path)
    assert len(rows) == 1797 and len({r["tile_id"] for r in rows}) == 1797
    assert manifest["splits"]["train"]["tiles"] + manifest["splits"]["test"]["tiles"] == 1797
    assert sum(manifest["splits"]["train"]["class_pixels"]) == manifest["splits"]["train"]["tiles"]
    assert image_of(rows[0]).shape == (1, 8, 8) and rows[0]["class_id"] in range(10)


# -------------------------------------------------------------------------------------- MNIST
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
    # Both sets: the files name the split, whatever the test fraction.
    assert manifest["splits"]["train"]["tiles"] == 30 and manifest["splits"]["test"]["tiles"] == 10
    assert manifest["split"] == {"by_file_name": True}
    first = next(r for r in rows_of(tmp_path / "out") if r["tile_id"] == "mnist-train#3")
    assert np.array_equal(image_of(first)[0], train[3]) and first["class_id"] == 3
    data = (src / "train-images-idx3-ubyte").read_bytes()
    (src / "train-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(
        PrepareError, match=r"train-images-idx3-ubyte: .* bytes, expected .*truncated"
    ):
        prepare_mnist(src, tmp_path / "out2", OPTS)


@pytest.mark.parametrize(("prefix", "gz"), [("train", False), ("t10k", True)])
def test_mnist_single_idx_set_is_split_by_test_fraction(tmp_path, prefix, gz):
    rng = np.random.default_rng(3)
    src = tmp_path / "mnist"
    src.mkdir()
    images = rng.integers(0, 255, (60, 28, 28))
    ext = ".gz" if gz else ""
    write_idx(src / f"{prefix}-images-idx3-ubyte{ext}", images, gz=gz)
    write_idx(src / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(60) % 10, gz=gz)
    opts = TilingOptions(progress=False, test_fraction=0.3, seed=5)
    manifest = prepare_mnist(src, tmp_path / "a", opts)
    train, test = manifest["splits"]["train"]["tiles"], manifest["splits"]["test"]["tiles"]
    assert train > 0 and test > 0 and train + test == 60
    assert manifest["split"] == {"by_file_name": False, "test_fraction": 0.3, "seed": 5}
    prepare_mnist(src, tmp_path / "b", opts)
    assert split_of(tmp_path / "a") == split_of(tmp_path / "b")  # deterministic
    row = next(r for r in rows_of(tmp_path / "a") if r["tile_id"] == f"mnist-{prefix}#7")
    assert np.array_equal(image_of(row)[0], images[7]) and row["class_id"] == 7
    other = prepare_mnist(src, tmp_path / "c", TilingOptions(progress=False, test_fraction=0.6))
    assert other["splits"]["test"]["tiles"] > test


def test_mnist_set_without_labels_is_one_line(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)))
    with pytest.raises(PrepareError, match=r"train-labels-idx1-ubyte\[\.gz\] not found"):
        prepare_mnist(tmp_path, tmp_path / "out", OPTS)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    with pytest.raises(PrepareError, match="no MNIST files: expected train-images-idx3-ubyte"):
        prepare_mnist(tmp_path, tmp_path / "out", OPTS)


def write_csv(path, images, labels, header=None):
    lines = [header] if header else []
    lines += [
        ",".join(map(str, [lab, *img.ravel()])) for img, lab in zip(images, labels, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "label," + ",".join(f"pixel{i}" for i in range(16)),
        "label," + ",".join(f"{r}x{c}" for r in range(1, 5) for c in range(1, 5)),
    ],
    ids=["no header", "pixelN header", "RxC header"],
)
def test_mnist_csv_single_file_split_by_test_fraction(tmp_path, header):
    rng = np.random.default_rng(4)
    images, labels = rng.integers(0, 256, (50, 4, 4)), np.arange(50) % 10
    write_csv(tmp_path / "mnist_train.csv", images, labels, header)
    manifest = prepare_mnist(tmp_path / "mnist_train.csv", tmp_path / "out", OPTS)
    train, test = manifest["splits"]["train"]["tiles"], manifest["splits"]["test"]["tiles"]
    assert train > 0 and test > 0 and train + test == 50
    rows = {r["tile_id"]: r for r in rows_of(tmp_path / "out")}
    assert len(rows) == 50
    row = rows["mnist_train.csv#0"]
    assert np.array_equal(image_of(row), images[0][None]) and row["class_id"] == 0
    assert image_of(row).dtype == np.uint8 and manifest["bands"] == 1


def test_mnist_csv_folder_names_decide_the_split(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "csv"
    src.mkdir()
    write_csv(src / "mnist_train.csv", rng.integers(0, 256, (20, 28, 28)), np.arange(20) % 10)
    write_csv(src / "mnist_test.csv", rng.integers(0, 256, (6, 28, 28)), np.arange(6))
    manifest = prepare_mnist(src, tmp_path / "out", OPTS)
    assert manifest["splits"]["train"]["tiles"] == 20 and manifest["splits"]["test"]["tiles"] == 6
    (src / "mnist_test.csv").unlink()  # a train file alone: split by the fraction
    manifest = prepare_mnist(src, tmp_path / "out2", OPTS)
    assert manifest["splits"]["test"]["tiles"] > 0
    assert manifest["splits"]["train"]["tiles"] + manifest["splits"]["test"]["tiles"] == 20


@pytest.mark.parametrize(
    ("bad", "line", "message"),
    [
        ("3,1,2", 3, "3 values, expected 17 (a label, then 4x4 pixels)"),
        ("3," + ",".join(["7"] * 15) + ",x", 3, "column 17 is 'x', not an integer"),
        ("3," + ",".join(["7"] * 15) + ",", 3, "column 17 is '', not an integer"),
        ("3," + ",".join(["7"] * 15) + ",1.5", 3, "column 17 is '1.5', not an integer"),
        ("3," + ",".join(["7"] * 15) + ",256", 3, "column 17 is pixel 256, expected 0-255"),
        ("3,-1" + ",7" * 15, 3, "column 2 is pixel -1, expected 0-255"),
        ("12" + ",7" * 16, 3, "column 1 is label 12, expected 0-9"),
    ],
)
def test_mnist_csv_bad_line_is_one_line_naming_file_and_line(tmp_path, capsys, bad, line, message):
    path = tmp_path / "digits.csv"
    good = ",".join(["1"] + ["0"] * 16)
    path.write_text(f"label,{','.join(f'p{i}' for i in range(16))}\n{good}\n{bad}\n{good}\n")
    with pytest.raises(PrepareError) as err:
        prepare_mnist(path, tmp_path / "out", OPTS)
    assert str(err.value) == f"{path}: line {line}: {message}"
    assert not (tmp_path / "out").exists()  # checked before anything is written
    assert cli_main(["prepare", "mnist", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert err_lines == [f"iid prepare: error: {path}: line {line}: {message}"]


def test_mnist_csv_bad_line_found_in_a_later_block(tmp_path):
    # Past pyarrow's first 4 MiB block: the line number still counts from the file's start.
    rows = 3000
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (rows, 28, 28))
    write_csv(tmp_path / "big.csv", images, np.arange(rows) % 10)
    lines = (tmp_path / "big.csv").read_text().splitlines()
    lines[2800] = lines[2800] + ",5"
    (tmp_path / "big.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(PrepareError, match=r"big.csv: line 2801: 786 values, expected 785"):
        prepare_mnist(tmp_path / "big.csv", tmp_path / "out", OPTS)


def test_mnist_csv_pixels_not_a_square(tmp_path):
    (tmp_path / "x.csv").write_text("1,2,3,4\n")
    with pytest.raises(PrepareError, match="x.csv: 3 pixel columns after the label, expected a"):
        prepare_mnist(tmp_path / "x.csv", tmp_path / "out", OPTS)


# ------------------------------------------------------------------------------------- STL-10
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
    assert np.array_equal(image_of(row), imgs[4]) and row["class_id"] == 9
    (tmp_path / "test_X.bin").write_bytes((tmp_path / "test_X.bin").read_bytes()[:-7])
    with pytest.raises(PrepareError, match="not a whole number of 3x96x96 images"):
        prepare_stl10(tmp_path, tmp_path / "out2", OPTS)


# ------------------------------------------------------------------------------ class folders
def test_class_folders_with_a_broken_image(tmp_path):
    rng = np.random.default_rng(2)
    for cls in ("cats", "dogs"):
        for i in range(4):
            write_png(
                tmp_path / "src" / cls / f"{i}.png",
                rng.integers(0, 255, (20, 24, 3), dtype=np.uint8),
            )
    (tmp_path / "src/dogs/broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(BadFilesError, match="broken.png: not a readable image"):
        prepare_class_folders(tmp_path / "src", tmp_path / "out", OPTS, size=16)
    rows = rows_of(tmp_path / "out")
    assert len(rows) == 8
    assert {r["class_id"] for r in rows if r["source"].startswith("dogs")} == {1}
    assert all(image_of(r).shape == (3, 16, 16) for r in rows)


def test_class_folders_greyscale_stays_one_band(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(7)
    grey = {}
    for cls in ("a", "b"):
        for i in range(3):
            grey[f"{cls}/{i}.png"] = rng.integers(0, 255, (12, 10), dtype=np.uint8)
            write_png(tmp_path / "src" / f"{cls}/{i}.png", grey[f"{cls}/{i}.png"])
    # A 1-bit image counts as greyscale too; an RGB one is the minority, so a bad file.
    Image.fromarray(np.eye(12, 10, dtype=bool)).save(tmp_path / "src/b/bits.png")
    write_png(tmp_path / "src/a/colour.png", rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
    with pytest.raises(
        BadFilesError, match=r"colour.png: colour image \(mode RGB\) in a greyscale dataset"
    ):
        prepare_class_folders(tmp_path / "src", tmp_path / "out", OPTS)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["bands"] == 1 and manifest["dtype"] == "uint8"
    rows = {r["source"]: r for r in rows_of(tmp_path / "out")}
    assert len(rows) == 7 and all(r["bands"] == 1 for r in rows.values())
    assert np.array_equal(image_of(rows["a/1.png"]), grey["a/1.png"][None])
    assert np.array_equal(image_of(rows["b/bits.png"])[0], np.eye(12, 10) * 255)
    assert [b["file"] for b in manifest["bad_files"]] == [str(tmp_path / "src/a/colour.png")]


def test_class_folders_16_bit_greyscale_kept(tmp_path):
    rng = np.random.default_rng(8)
    wide = rng.integers(0, 65535, (8, 8), dtype=np.uint16)
    write_png(tmp_path / "src/a/wide.png", wide)
    write_png(tmp_path / "src/a/wide2.png", wide[::-1].copy())
    write_png(tmp_path / "src/b/narrow.png", np.full((8, 8), 255, np.uint8))
    manifest = prepare_class_folders(tmp_path / "src", tmp_path / "out", OPTS)
    assert manifest["bands"] == 1 and manifest["dtype"] == "uint16"
    rows = {r["source"]: r for r in rows_of(tmp_path / "out")}
    assert np.array_equal(image_of(rows["a/wide.png"])[0], wide)
    assert (image_of(rows["b/narrow.png"]) == 65535).all()  # 8-bit white stays white


def test_class_folders_colour_stays_three_bands(tmp_path):
    rng = np.random.default_rng(9)
    rgb = rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "src/a/rgb.png", rgb)
    rgba = rng.integers(0, 255, (6, 5, 4), dtype=np.uint8)
    write_png(tmp_path / "src/a/rgba.png", rgba)
    write_png(tmp_path / "src/b/rgb.png", rgb[::-1].copy())
    grey = rng.integers(0, 255, (6, 5), dtype=np.uint8)
    write_png(tmp_path / "src/b/grey.png", grey)  # the minority: repeated into three bands
    manifest = prepare_class_folders(tmp_path / "src", tmp_path / "out", OPTS)
    assert manifest["bands"] == 3 and manifest["bad_files"] == []
    rows = {r["source"]: r for r in rows_of(tmp_path / "out")}
    assert np.array_equal(image_of(rows["a/rgb.png"]), rgb.transpose(2, 0, 1))
    assert np.array_equal(image_of(rows["a/rgba.png"]), rgba[..., :3].transpose(2, 0, 1))
    assert np.array_equal(image_of(rows["b/grey.png"]), np.repeat(grey[None], 3, axis=0))


# -------------------------------------------------------------------------------- the CLI
def make_src(kind, tmp_path) -> list[str]:
    """The positional SRC of ``iid prepare KIND`` (none for digits), with data written."""
    rng = np.random.default_rng(10)
    src = tmp_path / "src"
    if kind == "mnist":
        src.mkdir()
        write_idx(src / "train-images-idx3-ubyte", rng.integers(0, 255, (80, 28, 28)))
        write_idx(src / "train-labels-idx1-ubyte", np.arange(80) % 10)
    elif kind == "stl10":
        src.mkdir()
        rng.integers(0, 255, (6, 3, 96, 96), dtype=np.uint8).tofile(src / "train_X.bin")
        np.arange(1, 7, dtype=np.uint8).tofile(src / "train_y.bin")
        rng.integers(0, 255, (2, 3, 96, 96), dtype=np.uint8).tofile(src / "test_X.bin")
        np.array([1, 2], np.uint8).tofile(src / "test_y.bin")
    elif kind == "classes":
        for i in range(40):
            write_png(src / f"c{i % 2}" / f"{i}.png", rng.integers(0, 255, (6, 6), np.uint8))
    return [] if kind == "digits" else [str(src)]


def help_of(kind, capsys) -> set[str]:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["prepare", kind, "--help"])
    assert exit_.value.code == 0
    return set(re.findall(r"--[a-z-]+", capsys.readouterr().out))


@pytest.mark.parametrize("kind", ["digits", "mnist", "stl10", "classes"])
def test_whole_image_kinds_list_only_options_they_honour(tmp_path, capsys, kind):
    flags = help_of(kind, capsys)
    assert not flags & {"--tile", "--stride", "--downscale"}, flags
    assert {"--rows-per-shard", "--compression", "--overwrite", "--no-progress"} <= flags
    # Only class folders can skip a bad file and go on; STL-10's files always name the split.
    assert ("--skip-bad" in flags) == (kind == "classes")
    assert ("--test-fraction" in flags) == ("--seed" in flags) == (kind != "stl10")
    src = make_src(kind, tmp_path)

    def prepare(name, *extra):
        out = tmp_path / name
        args = ["prepare", kind, *src, str(out), "--no-progress", *extra]
        assert cli_main(args) == 0, capsys.readouterr().err
        manifest = json.loads((out / "manifest.json").read_text())
        return out, manifest

    out, manifest = prepare("a", "--rows-per-shard", "700", "--compression", "zstd")
    assert all(s["rows"] <= 700 for s in manifest["shards"]) and len(manifest["shards"]) > 1
    shard = pq.ParquetFile(next(out.rglob("*.parquet")))
    assert shard.metadata.row_group(0).column(0).compression == "ZSTD"
    assert cli_main(["prepare", kind, *src, str(out), "--no-progress"]) == 2  # no --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    prepare("a", "--overwrite")
    if kind == "stl10":
        return
    _, low = prepare("low", "--test-fraction", "0.1")
    _, high = prepare("high", "--test-fraction", "0.5")
    total = sum(low["splits"][s]["tiles"] for s in ("train", "test"))
    assert 0 < low["splits"]["test"]["tiles"] < high["splits"]["test"]["tiles"] < total
    assert sum(high["splits"][s]["tiles"] for s in ("train", "test")) == total
    prepare("seeded", "--test-fraction", "0.5", "--seed", "3")
    assert split_of(tmp_path / "seeded") != split_of(tmp_path / "high")


@pytest.mark.slow
def test_clustering_defaults_train_on_28px_digits_at_their_own_size(tmp_path, ray_cluster):
    from pipeline.config import Config
    from pipeline.evaluate import evaluate_uri
    from pipeline.train import fit

    prepare_digits(tmp_path / "d", OPTS, DigitsSpec(28, copies=1, half="even"))
    cfg = Config.from_dict(
        {
            "data": {"shards": str(tmp_path / "d")},
            "model": {"task": "clustering", "n_clusters_b": 10, "n_subheads": 2},
            "optim": {"epochs": 2},
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
            "run": {
                "name": "d28",
                "storage_path": str(tmp_path / "runs"),
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            },
        }
    )
    assert cfg.model.input_size == 0 and cfg.pairs.rgb_bands == (0, 1, 2)  # left to the data
    fit(cfg)
    ev, classes, trained = evaluate_uri(str(tmp_path / "runs" / "d28"), tmp_path / "d")
    # Fitted to the 28 px grey digits when training started, and kept with the model.
    assert trained.model.input_size == 14 and trained.model.in_channels == 1
    assert trained.pairs.rgb_bands == (0,) and trained.pairs.stroke == 1.0
    assert classes == [str(c) for c in range(10)] and ev.counts.sum(axis=(1, 2)).min() > 0
    report = json.loads((tmp_path / "runs" / "d28" / "report.json").read_text())
    assert "acc" in report["metrics"] and report["epoch"] == 1
