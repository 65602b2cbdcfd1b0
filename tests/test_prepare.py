"""Preparation: real Potsdam data, generated rasters, and every bad input of the issue."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio

from pipeline.data.format import PrepareError
from pipeline.prepare.folder import prepare_folder
from pipeline.prepare.potsdam import COLOURS, prepare_potsdam
from pipeline.prepare.run import TilingOptions
from pipeline.prepare.shards import BadFilesError
from tests.conftest import colour_label, decode_row, make_release, truncate, write_tif

IID = shutil.which("iid", path=str(Path(sys.executable).parent))
OPTS = TilingOptions(tile=32, stride=32, progress=False, test_fraction=0.3)


def read_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.rglob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def shard_class_counts(out: Path, n_classes: int = 6) -> np.ndarray:
    counts = np.zeros(n_classes, dtype=np.int64)
    for row in read_rows(out):
        label = decode_row(row)[1]
        if label is not None:
            counts += np.bincount(label.ravel(), minlength=256)[:n_classes]
    return counts


def direct_counts(label_tif: Path, region: tuple[slice, slice] = (slice(None), slice(None))):
    """Per-class pixel counts straight from a colour-coded label TIFF, colour by colour."""
    with rasterio.open(label_tif) as src:
        rgb = src.read()[:, region[0], region[1]]
    return np.array([int(((rgb == np.array(c)[:, None, None]).all(0)).sum()) for c in COLOURS])


# ---------------------------------------------------------------------------- real Potsdam crop
LABEL = "5_Labels_all_noBoundary/top_potsdam_2_10_label_noBoundary.tif"


def test_potsdam_mini_class_counts_equal_the_label_tiff(potsdam_mini, tmp_path):
    opts = TilingOptions(tile=256, stride=256, progress=False)
    manifest = prepare_potsdam(potsdam_mini, tmp_path / "full", opts)
    want = direct_counts(potsdam_mini / LABEL)
    assert shard_class_counts(tmp_path / "full").tolist() == want.tolist()
    total = sum(np.array(s["class_pixels"]) for s in manifest["splits"].values())
    assert total.tolist() == want.tolist()
    assert manifest["ignored_label_pixels"]["boundary"] == 512 * 512 - want.sum()
    assert manifest["ignored_label_pixels"]["off_palette"] == 0
    assert want[5] == 0 and (want[:5] > 0).all()  # no clutter in this crop, the rest present


def test_potsdam_mini_200px_tiles_cover_the_whole_crop_edges_padded(potsdam_mini, tmp_path):
    """512 px is no multiple of 200: the last row and column of tiles reach past the crop,
    padded (image 0, label ignored, invalid), so every pixel and every label is in a tile."""
    prepare_potsdam(potsdam_mini, tmp_path / "t200", TilingOptions(progress=False))
    want = direct_counts(potsdam_mini / LABEL)
    assert shard_class_counts(tmp_path / "t200").tolist() == want.tolist()
    rows = read_rows(tmp_path / "t200")
    offsets = [0, 200, 400]
    assert sorted((r["row_off"], r["col_off"]) for r in rows) == [
        (r, c) for r in offsets for c in offsets
    ]
    with rasterio.open(potsdam_mini / "2_Ortho_RGB/top_potsdam_2_10_RGB.tif") as src:
        whole = src.read()
    for r in rows:  # pixels are the source's, untouched; the padding is 0 and invalid
        image = decode_row(r)[0]
        h, w = r["src_height"], r["src_width"]
        assert (h, w) == (min(200, 512 - r["row_off"]), min(200, 512 - r["col_off"]))
        y, x = r["row_off"], r["col_off"]
        assert np.array_equal(image[:, :h, :w], whole[:, y : y + h, x : x + w])
        assert not image[:, h:].any() and not image[:, :, w:].any()
        valid = None if r["valid"] is None else np.frombuffer(r["valid"], np.uint8)
        if (h, w) == (200, 200):
            assert valid is None
        else:
            valid = valid.reshape(200, 200)
            assert valid[:h, :w].all() and not valid[h:].any() and not valid[:, w:].any()


@pytest.mark.skipif(IID is None, reason="console script `iid` not installed")
def test_cli_prepares_potsdam_mini_with_downscale(potsdam_mini, tmp_path):
    run = subprocess.run(
        [
            IID,
            "prepare",
            "potsdam",
            str(potsdam_mini),
            str(tmp_path / "o"),
            "--downscale",
            "0.5",
            "--tile",
            "128",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    rows = read_rows(tmp_path / "o")
    assert len(rows) == 4 and all(r["height"] == 128 and r["src_height"] == 256 for r in rows)
    for r in rows:  # nearest resampling keeps labels on the palette
        assert set(np.unique(decode_row(r)[1])) <= {0, 1, 2, 3, 4, 255}


# ------------------------------------------------------------------------- generated releases
def test_georeference_and_windows_are_recorded(tmp_path):
    make_release(tmp_path / "src", {"1_1": (64, 96)})
    prepare_potsdam(tmp_path / "src", tmp_path / "out", OPTS)
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 2 * 3
    for r in rows:
        assert "32633" in r["crs"] or "UTM zone 33N" in r["crs"]
        a, b, c, d, e, f = r["transform"]
        assert (a, e) == (0.05, -0.05)
        assert c == pytest.approx(368000 + r["col_off"] * 0.05)
        assert f == pytest.approx(5808000 - r["row_off"] * 0.05)


def test_split_is_deterministic_and_disjoint(tmp_path):
    make_release(tmp_path / "src", {"1_1": (128, 128), "1_2": (128, 128)})
    split_of = []
    for seed in (0, 0, 1):
        out = tmp_path / f"out{len(split_of)}"
        opts = TilingOptions(tile=16, stride=16, progress=False, test_fraction=0.3, seed=seed)
        prepare_potsdam(tmp_path / "src", out, opts)
        split_of.append({r["tile_id"]: r["split"] for r in read_rows(out)})
    assert split_of[0] == split_of[1]
    assert split_of[0] != split_of[2]
    assert len(split_of[0]) == 2 * 64  # each tile exactly once
    test_share = sum(s == "test" for s in split_of[0].values()) / len(split_of[0])
    assert 0.15 < test_share < 0.45


def test_tiles_without_labels_go_to_unlabelled(tmp_path):
    make_release(tmp_path / "src", {"1_1": (64, 64)})
    make_release(tmp_path / "src", {"1_2": (64, 64)}, with_labels=False, seed=1)
    cls = np.full((64, 64), 255, np.uint8)  # 1_3: a label that is all boundary in one tile
    cls[:, 32:] = 2
    write_tif(tmp_path / "src/2_Ortho_RGB/top_potsdam_1_3_RGB.tif", np.zeros((3, 64, 64), np.uint8))
    write_tif(
        tmp_path / "src/5_Labels_all_noBoundary/top_potsdam_1_3_label_noBoundary.tif",
        colour_label(cls),
    )
    manifest = prepare_potsdam(tmp_path / "src", tmp_path / "out", OPTS)
    rows = read_rows(tmp_path / "out")
    unlabelled = {r["tile_id"] for r in rows if r["split"] == "unlabelled"}
    assert {t for t in unlabelled if "1_2" in t} == {
        r["tile_id"] for r in rows if "1_2" in r["tile_id"]
    }
    assert {t for t in unlabelled if "1_3" in t} == {
        "top_potsdam_1_3_RGB_r0_c0",
        "top_potsdam_1_3_RGB_r32_c0",
    }
    assert all(r["label"] is None for r in rows if r["split"] == "unlabelled")
    assert manifest["splits"]["unlabelled"]["tiles"] == len(unlabelled)


def test_off_palette_colours_are_ignored_and_counted(tmp_path):
    make_release(tmp_path / "src", {"1_1": (32, 32)})
    label = tmp_path / "src/5_Labels_all_noBoundary/top_potsdam_1_1_label_noBoundary.tif"
    with rasterio.open(label) as src:
        rgb = src.read()
    rgb[:, :2, :5] = np.array([12, 200, 99], np.uint8)[:, None, None]  # 10 off-palette pixels
    write_tif(label, rgb)
    manifest = prepare_potsdam(tmp_path / "src", tmp_path / "out", OPTS)
    assert manifest["ignored_label_pixels"]["off_palette"] == 10
    row = read_rows(tmp_path / "out")[0]
    assert (decode_row(row)[1][:2, :5] == 255).all()


# ------------------------------------------------------------------------------- bad inputs
def test_truncated_tiff_is_skipped_listed_and_leaves_no_shard(tmp_path):
    make_release(tmp_path / "src", {"1_1": (96, 96), "1_2": (96, 96)})
    bad = tmp_path / "src/2_Ortho_RGB/top_potsdam_1_2_RGB.tif"
    truncate(bad)
    with pytest.raises(BadFilesError, match="top_potsdam_1_2_RGB.tif"):
        prepare_potsdam(tmp_path / "src", tmp_path / "out", OPTS)
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert [b["file"] for b in manifest["bad_files"]] == [str(bad)]
    names = {p.name for p in (tmp_path / "out").rglob("*")}
    assert not any("1_2" in n for n in names)  # nothing of the broken file
    assert not any(n.endswith(".tmp") for n in names)  # no partial shard
    assert any("1_1" in n for n in names)  # the good file is complete
    assert sum(s["tiles"] for s in manifest["splits"].values()) == 9
    # --skip-bad accepts the loss
    opts = TilingOptions(tile=32, stride=32, progress=False, skip_bad=True)
    assert prepare_potsdam(tmp_path / "src", tmp_path / "out2", opts)["bad_files"]


def test_unreadable_file_is_a_one_line_error(tmp_path):
    make_release(tmp_path / "src", {"1_1": (32, 32)})
    (tmp_path / "src/2_Ortho_RGB/top_potsdam_9_9_RGB.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(BadFilesError) as err:
        prepare_potsdam(tmp_path / "src", tmp_path / "out", OPTS)
    assert "top_potsdam_9_9_RGB.tif: not a readable raster" in str(err.value)
    assert "\n" not in str(err.value)


def test_image_label_size_mismatch(tmp_path):
    make_release(tmp_path / "src", {"1_1": (64, 64)})
    write_tif(
        tmp_path / "src/5_Labels_all_noBoundary/top_potsdam_1_1_label_noBoundary.tif",
        colour_label(np.zeros((48, 64), np.uint8)),
    )
    with pytest.raises(BadFilesError, match=r"label is 64x48, expected 64x64"):
        prepare_potsdam(tmp_path / "src", tmp_path / "out", OPTS)


def test_wrong_band_count_for_variant(tmp_path):
    make_release(
        tmp_path / "src", {"1_1": (32, 32)}, bands=3, variant="RGBIR", folder="4_Ortho_RGBIR"
    )
    with pytest.raises(BadFilesError, match="has 3 bands, expected 4"):
        prepare_potsdam(tmp_path / "src", tmp_path / "out", OPTS, variant="rgbir")


def test_empty_source(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(PrepareError, match="2_Ortho_RGB: folder not found"):
        prepare_potsdam(tmp_path / "src", tmp_path / "out", OPTS)
    (tmp_path / "src/2_Ortho_RGB").mkdir()
    with pytest.raises(PrepareError, match="no top_potsdam_.*images found"):
        prepare_potsdam(tmp_path / "src", tmp_path / "out", OPTS)
    with pytest.raises(PrepareError, match="no images found"):
        prepare_folder(tmp_path / "src", tmp_path / "out", OPTS)


def test_unwritable_output(tmp_path):
    make_release(tmp_path / "src", {"1_1": (32, 32)})
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    with pytest.raises(PrepareError, match="output folder is not writable"):
        prepare_potsdam(tmp_path / "src", blocker / "out", OPTS)


def test_sources_whose_names_read_alike_keep_every_tile(tmp_path):
    """x.tif and x.tiff, a/b.tif and a__b.tif once wrote the same shard names: one file's
    tiles vanished with exit 0."""
    src = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    names = ("x.tif", "x.tiff", "a/b.tif", "a__b.tif")
    for name in names:
        write_tif(src / name, rng.integers(0, 255, (3, 64, 64), dtype=np.uint8), georef=False)
    manifest = prepare_folder(src, tmp_path / "out", OPTS)
    assert sum(s["tiles"] for s in manifest["splits"].values()) == 4 * len(names)
    assert len({s["path"] for s in manifest["shards"]}) == len(manifest["shards"])
    assert len({s["path"].split("/")[1].rsplit("-", 1)[0] for s in manifest["shards"]}) == 4
    rows = read_rows(tmp_path / "out")
    assert sorted({r["source"] for r in rows}) == sorted(names)
    assert len(rows) == 4 * len(names)


def _images(src: Path, sides: tuple[int, ...]) -> Path:
    """Images of the given sides; side 0 is a corrupt file with an image's name."""
    rng = np.random.default_rng(0)
    for i, side in enumerate(sides):
        if side == 0:
            src.mkdir(parents=True, exist_ok=True)
            (src / f"{i}.tif").write_bytes(b"II*\0 not really a TIFF")
            continue
        write_tif(src / f"{i}.tif", rng.integers(0, 255, (3, side, side), dtype=np.uint8))
    return src


@pytest.mark.parametrize(
    ("sides", "opts", "bands", "message"),
    [
        ((64,), {"rows_per_shard": 0}, None, r"--rows-per-shard must be >= 1, got 0"),
        ((64,), {}, 0, r"--bands must be >= 1, got 0"),
        # --skip-bad, but every file was skipped: no dataset to accept
        ((0,), {"skip_bad": True}, None, r"no tile written \(1 file\(s\) skipped, first: "),
    ],
)
def test_bad_folder_preparations_are_one_line(tmp_path, sides, opts, bands, message):
    src = _images(tmp_path / "src", sides)
    with pytest.raises(PrepareError, match=message) as err:
        prepare_folder(
            src, tmp_path / "out", TilingOptions(**{"tile": 32, "progress": False} | opts), bands
        )
    assert "\n" not in str(err.value)


def test_an_image_smaller_than_a_tile_is_one_padded_tile(tmp_path):
    src = _images(tmp_path / "src", (64, 16))
    manifest = prepare_folder(src, tmp_path / "out", OPTS)
    assert manifest["bad_files"] == []
    assert sum(s["tiles"] for s in manifest["splits"].values()) == 4 + 1
    small = next(r for r in read_rows(tmp_path / "out") if r["source"] == "1.tif")
    valid = np.frombuffer(small["valid"], np.uint8).reshape(32, 32)
    assert valid[:16, :16].all() and valid.sum() == 16 * 16
    assert (small["src_height"], small["src_width"]) == (16, 16)


def test_folder_of_own_imagery_with_a_non_image(tmp_path):
    from PIL import Image

    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 64, 3), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src / "sub/b.jpg")
    write_tif(src / "c.tif", rng.integers(0, 255, (3, 64, 96), dtype=np.uint8), georef=False)
    (src / "notes.txt").write_text("field notes")
    (src / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(BadFilesError, match="notes.txt: not an image"):
        prepare_folder(src, tmp_path / "out", OPTS)
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert len(manifest["bad_files"]) == 1
    # a.png is 70 px high: a third, padded row of tiles
    assert sum(s["tiles"] for s in manifest["splits"].values()) == 6 + 4 + 6
    rows = read_rows(tmp_path / "out")
    png = next(
        r for r in rows if r["source"] == "a.png" and r["row_off"] == 32 and r["col_off"] == 32
    )
    assert np.array_equal(
        decode_row(png)[0],
        np.asarray(Image.open(src / "a.png")).transpose(2, 0, 1)[:, 32:64, 32:64],
    )


@pytest.mark.skipif(IID is None, reason="console script `iid` not installed")
def test_cli_bad_input_exits_non_zero_with_one_line(tmp_path):
    make_release(tmp_path / "src", {"1_1": (32, 32)})
    truncate(tmp_path / "src/2_Ortho_RGB/top_potsdam_1_1_RGB.tif", 0.3)
    run = subprocess.run(
        [
            IID,
            "prepare",
            "potsdam",
            str(tmp_path / "src"),
            str(tmp_path / "out"),
            "--tile",
            "16",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "top_potsdam_1_1_RGB.tif" in errors[0]
    missing = subprocess.run(
        [IID, "prepare", "potsdam", str(tmp_path / "nope"), str(tmp_path / "out2")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "folder not found" in missing.stderr


@pytest.mark.skipif(IID is None, reason="console script `iid` not installed")
def test_prepare_help_explains_every_option():
    run = subprocess.run([IID, "prepare", "potsdam", "--help"], capture_output=True, text=True)
    for option in (
        "--variant",
        "--labels",
        "--tile",
        "--stride",
        "--downscale",
        "--test-fraction",
        "--seed",
        "--skip-bad",
        "--no-progress",
    ):
        assert option in run.stdout


def test_non_finite_pixels_are_invalid_and_stored_as_zero(tmp_path):
    src = tmp_path / "src"
    image = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    image[1, 40, 50] = np.nan  # one pixel of one band: the bottom-right tile
    image[0, 5, 5] = np.inf  # and the top-left one
    write_tif(src / "float.tif", image)
    write_tif(src / "clean.tif", image[:, :32, 32:].copy())
    manifest = prepare_folder(
        src, tmp_path / "out", TilingOptions(tile=32, stride=32, progress=False)
    )
    assert manifest["nodata"]["invalid_pixels_kept"] == 2
    assert manifest["nodata"]["skipped_tiles"] == 0
    rows = {r["tile_id"]: r for r in read_rows(tmp_path / "out")}
    assert len(rows) == 5
    for r in rows.values():
        assert np.isfinite(decode_row(r)[0]).all()
    broken = {"float_r0_c0": (5, 5), "float_r32_c32": (8, 18)}
    for tile_id, r in rows.items():
        if tile_id not in broken:
            assert r["valid"] is None
            continue
        valid = np.frombuffer(r["valid"], np.uint8).reshape(32, 32)
        assert valid.sum() == 32 * 32 - 1 and valid[broken[tile_id]] == 0
    # the band statistics leave the bad pixels out
    good = np.isfinite(image).all(0)
    both = np.concatenate([image[:, good], image[:, :32, 32:].reshape(3, -1)], axis=1)
    assert np.allclose(manifest["band_stats"]["mean"], both.mean(1), rtol=1e-6)
