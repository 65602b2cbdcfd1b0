"""Your own imagery with masks: class-index and colour-coded masks, pairing, merges, the
majority band count, and the real Potsdam crop prepared as a folder of class-index masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import yaml
from PIL import Image

from pipeline.cli import main
from pipeline.data.format import PrepareError, label_lut
from pipeline.prepare.folder import prepare_folder
from pipeline.prepare.labels import read_classes
from pipeline.prepare.potsdam import colours_to_classes, prepare_potsdam
from pipeline.prepare.run import TilingOptions
from pipeline.prepare.shards import BadFilesError
from tests.conftest import decode_row, write_tif

OPTS = TilingOptions(tile=32, stride=32, progress=False, test_fraction=0.3)
NAMES = ["road", "building", "low_veg", "tree", "car"]
COLOURS = [(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0)]


def read_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.rglob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def total_class_pixels(manifest: dict) -> list[int]:
    return np.sum([s["class_pixels"] for s in manifest["splits"].values()], axis=0).tolist()


def image(path: Path, seed: int, bands: int = 3, side: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    return write_tif(path, rng.integers(0, 256, (bands, side, side), dtype=np.uint8), georef=False)


def index_mask(seed: int, n: int, side: int = 64, dtype=np.uint8, ignore: int = 255) -> np.ndarray:
    """(side, side) class ids 0..n-1 with ~5% ``ignore``."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, n, (side, side)).astype(dtype)
    mask[rng.random((side, side)) < 0.05] = ignore
    return mask


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def labels_by_tile(out: Path) -> dict[tuple[str, int, int], np.ndarray]:
    """(source, row_off, col_off) -> the label read back from the shards (labelled tiles)."""
    return {
        (r["source"], r["row_off"], r["col_off"]): decode_row(r)[1]
        for r in read_rows(out)
        if r["label"] is not None
    }


def assert_labels_read_back(out: Path, masks: dict[str, np.ndarray]) -> None:
    """Every labelled tile's label is its window of the stored-id mask, and every window of a
    mask with a class pixel is a labelled tile."""
    got = labels_by_tile(out)
    want = {
        (name, r, c): m[r : r + 32, c : c + 32]
        for name, m in masks.items()
        for r in range(0, m.shape[0], 32)
        for c in range(0, m.shape[1], 32)
        if (m[r : r + 32, c : c + 32] != 255).any()
    }
    assert sorted(got) == sorted(want)
    for key, label in got.items():
        assert np.array_equal(label, want[key]), key


# ------------------------------------------------------------------------- the two mask forms
@pytest.mark.parametrize(
    ("dtype", "ignore", "classes", "values"),
    [
        # uint8 ids 0..4, 255 ignored, names from a YAML list
        (np.uint8, None, NAMES, [0, 1, 2, 3, 4]),
        # uint16 ids 1..5 beside a 0 no-data value (LoveDA's layout), named by a mapping:
        # stored renumbered 0..4
        (np.uint16, 0, {i + 1: n for i, n in enumerate(NAMES)}, [1, 2, 3, 4, 5]),
        # no --classes: the ids found in the masks are the classes
        (np.uint16, 0, None, [1, 2, 3, 4, 5]),
    ],
)
def test_class_index_masks_prepare_with_exact_class_counts(
    tmp_path, dtype, ignore, classes, values
):
    src, masks = tmp_path / "imgs", tmp_path / "masks"
    stored = {}
    for i, name in enumerate(["a.tif", "sub/b.tif", "sub/deeper/c.tif"]):
        image(src / name, i)
        ids = index_mask(10 + i, len(values))  # stored ids, 255 ignored
        raw = np.where(
            ids == 255, 0 if ignore == 0 else 255, np.take(values + [0], ids, mode="clip")
        )
        write_tif(masks / name, raw.astype(dtype)[None], georef=False)
        stored[name] = ids
    classes_file = write_yaml(tmp_path / "classes.yaml", classes) if classes else None
    manifest = prepare_folder(
        src, tmp_path / "out", OPTS, labels=masks, classes=classes_file, ignore_index=ignore
    )
    everything = np.concatenate([m.ravel() for m in stored.values()])
    assert total_class_pixels(manifest) == np.bincount(everything, minlength=256)[:5].tolist()
    assert (
        sum(s["ignored_pixels"] for s in manifest["splits"].values()) == (everything == 255).sum()
    )
    assert manifest["classes"] == (NAMES if classes else [f"class_{v}" for v in values])
    assert manifest["labels"] == "index" and manifest["ignore_index"] == 255
    assert manifest["mask_values"] == values
    assert manifest["mask_ignore_index"] == (255 if ignore is None else ignore)
    # LABELS outside SRC: images are named relative to SRC, masks by their own path
    assert_labels_read_back(tmp_path / "out", stored)


def test_palette_masks_prepare_and_count_what_they_ignore(tmp_path):
    src, masks = tmp_path / "src", tmp_path / "src" / "labels"  # LABELS inside SRC
    masks.mkdir(parents=True)
    palette = [{"name": n, "colour": list(c)} for n, c in zip(NAMES, COLOURS, strict=True)]
    palette.insert(2, {"name": "boundary", "colour": [0, 0, 0], "ignore": True})
    lut = np.array([*COLOURS] + [(0, 0, 0)] * 251, np.uint8)  # stored id -> colour; 255 black
    stored, boundary = {}, 0
    for i, name in enumerate(["a.tif", "b.tif"]):
        image(src / name, i)
        ids = index_mask(20 + i, 5)
        rgb = lut[ids].transpose(2, 0, 1).copy()
        rgb[:, 3, :7] = np.array([12, 200, 99], np.uint8)[:, None]  # 7 off-palette pixels
        ids[3, :7] = 255
        boundary += int((rgb == 0).all(0).sum())
        Image.fromarray(rgb.transpose(1, 2, 0)).save(masks / name.replace(".tif", ".png"))
        stored[name] = ids
    manifest = prepare_folder(
        src, tmp_path / "out", OPTS, labels=masks, palette=write_yaml(tmp_path / "p.yaml", palette)
    )
    everything = np.concatenate([m.ravel() for m in stored.values()])
    assert total_class_pixels(manifest) == np.bincount(everything, minlength=256)[:5].tolist()
    assert manifest["classes"] == NAMES and manifest["labels"] == "palette"
    assert manifest["colours"] == [list(c) for c in COLOURS]
    assert manifest["ignored_label_pixels"] == {"boundary": boundary, "off_palette": 14}
    assert manifest["sources"] == 2  # the masks inside SRC are no imagery
    assert_labels_read_back(tmp_path / "out", stored)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (["a", "b"], (("a", "b"), (0, 1), None)),
        ({3: "a", 1: "b"}, (("b", "a"), (1, 3), None)),
        (
            {0: {"name": "a", "colour": [1, 2, 3]}, 1: {"name": "b", "color": [4, 5, 6]}},
            (("a", "b"), (0, 1), ((1, 2, 3), (4, 5, 6))),
        ),
    ],
)
def test_classes_file_forms(tmp_path, raw, want):
    found = read_classes(write_yaml(tmp_path / "c.yaml", raw), "--classes")
    assert (found.names, found.ids, found.colours) == want


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("just a string", "expected a list of classes or a mapping"),
        (["a", "a"], "name 'a' is given twice"),
        ([{"name": "a", "colour": [1, 2]}], r"colour \[1, 2\] of 'a' is not \[r, g, b\]"),
        ({"x": "a"}, "key 'x' is not a class id"),
        ([{"colour": [1, 2, 3]}], "has no name"),
    ],
)
def test_bad_classes_files_are_one_line_naming_the_file(tmp_path, raw, message):
    path = write_yaml(tmp_path / "c.yaml", raw)
    with pytest.raises(PrepareError, match=message) as err:
        read_classes(path, "--classes")
    assert str(err.value).startswith(f"--classes {path}: ") and "\n" not in str(err.value)


def test_a_palette_needs_a_colour_per_class(tmp_path):
    with pytest.raises(PrepareError, match="class 'b' has no colour"):
        read_classes(write_yaml(tmp_path / "p.yaml", ["b"]), "--palette", need_colours=True)


# ------------------------------------------------------------------------------------ pairing
def test_pairing_by_stem_across_suffixes_and_sub_folders(tmp_path):
    src, masks = tmp_path / "src", tmp_path / "src" / "masks"
    image(src / "a/b/x.tif", 0)
    image(src / "y.tiff", 1)
    image(src / "z.tif", 2)  # no mask: trained on, not scored
    (masks / "a/b").mkdir(parents=True)
    x, y = index_mask(3, 4), index_mask(4, 4)
    Image.fromarray(x).save(masks / "a/b/x.png")
    write_tif(masks / "y.TIF", y[None], georef=False)
    write_tif(masks / "orphan.tif", y[None], georef=False)  # a mask without its image
    manifest = prepare_folder(src, tmp_path / "out", OPTS, labels=masks, num_classes=4)
    assert manifest["unpaired_masks"] == ["orphan.tif"] and manifest["bad_files"] == []
    assert manifest["labelled_sources"] == 2 and manifest["sources"] == 3
    rows = read_rows(tmp_path / "out")
    assert {r["source"] for r in rows if r["split"] == "unlabelled"} == {"z.tif"}
    assert {r["label_source"] for r in rows if r["label"] is not None} == {
        "masks/a/b/x.png",
        "masks/y.TIF",
    }
    assert_labels_read_back(tmp_path / "out", {"a/b/x.tif": x, "y.tiff": y})


def test_img_dir_ann_dir_layout_pairs_without_labels(tmp_path, capsys):
    src = tmp_path / "loveda"
    image(src / "img_dir/train/1.png", 0)
    image(src / "img_dir/val/2.png", 1)
    masks = {"img_dir/train/1.png": index_mask(5, 3), "img_dir/val/2.png": index_mask(6, 3)}
    for name, mask in masks.items():
        path = src / name.replace("img_dir", "ann_dir")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(path)
    (src / "README.txt").write_text("outside img_dir: not read")
    out = tmp_path / "out"
    assert main(["prepare", "folder", str(src), str(out), "--tile", "32", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["class_0", "class_1", "class_2"]
    assert manifest["sources"] == 2 and manifest["bad_files"] == []
    assert_labels_read_back(out, masks)
    assert "error" not in capsys.readouterr().err


def test_ambiguous_mask_skips_the_image_naming_both_masks(tmp_path):
    src, masks = tmp_path / "src", tmp_path / "masks"
    image(src / "a.tif", 0)
    image(src / "b.tif", 1)
    for name in ("a.tif", "b.png", "b.tif"):
        write_tif(masks / name, index_mask(7, 2)[None], georef=False)
    with pytest.raises(BadFilesError, match=r"b.tif: 2 masks match it \(.*b.png, .*b.tif\)"):
        prepare_folder(src, tmp_path / "out", OPTS, labels=masks, num_classes=2)


# ------------------------------------------------------------------------- one line per problem
def test_size_mismatch_is_one_line_naming_both_files(tmp_path):
    src, masks = tmp_path / "src", tmp_path / "masks"
    image(src / "a.tif", 0)
    image(src / "b.tif", 1)
    write_tif(masks / "a.tif", index_mask(1, 3)[None], georef=False)
    write_tif(masks / "b.tif", index_mask(2, 3, side=48)[None], georef=False)
    with pytest.raises(BadFilesError) as err:
        prepare_folder(src, tmp_path / "out", OPTS, labels=masks, num_classes=3)
    message = str(err.value)
    assert f"{masks / 'b.tif'}: label is 48x48, expected 64x64" in message
    assert str(src / "b.tif") in message and "\n" not in message


def test_values_outside_the_classes_are_one_line_naming_both_files(tmp_path, capsys):
    src, masks = tmp_path / "src", tmp_path / "masks"
    image(src / "a.tif", 0)
    image(src / "b.tif", 1)
    write_tif(masks / "a.tif", index_mask(1, 3)[None], georef=False)
    bad = index_mask(2, 3)
    bad[40, 40], bad[41, 41] = 7, 9
    write_tif(masks / "b.tif", bad[None], georef=False)
    with pytest.raises(BadFilesError) as err:
        prepare_folder(src, tmp_path / "out", OPTS, labels=masks, num_classes=3)
    assert f"{masks / 'b.tif'} (label of {src / 'b.tif'}): values 7, 9 are not class ids" in str(
        err.value
    )
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert [b["file"] for b in manifest["bad_files"]] == [str(src / "b.tif")]
    assert {r["source"] for r in read_rows(tmp_path / "out")} == {"a.tif"}
    # the CLI: exit 1, one error line naming both files
    cmd = ["prepare", "folder", str(src), str(tmp_path / "out2"), "--labels", str(masks)]
    assert main([*cmd, "--tile", "32", "--no-progress", "--num-classes", "3"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert str(masks / "b.tif") in errors[0] and f"label of {src / 'b.tif'}" in errors[0]


@pytest.mark.parametrize(
    ("mask_bands", "flags", "message"),
    [
        (3, {"num_classes": 2}, r"has 3 bands, expected 1 \(class ids\); a colour-coded mask"),
        # no --num-classes: the pass over the masks finds no 1-band mask
        (3, {}, r"no class ids in the masks .* 1 have several bands, first: .* need --palette"),
        (1, {"palette": True}, r"has 1 band, expected 3 \(RGB colours, as --palette says"),
    ],
)
def test_mask_of_the_wrong_form_is_one_line_naming_it(tmp_path, mask_bands, flags, message):
    src, masks = tmp_path / "src", tmp_path / "masks"
    image(src / "a.tif", 0)
    write_tif(masks / "a.tif", np.zeros((mask_bands, 64, 64), np.uint8), georef=False)
    if flags.get("palette"):
        flags["palette"] = write_yaml(tmp_path / "p.yaml", [{"name": "x", "colour": [0, 0, 0]}])
    with pytest.raises(PrepareError, match=message) as err:
        prepare_folder(src, tmp_path / "out", OPTS, labels=masks, **flags)
    assert str(masks / "a.tif") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": None, "num_classes": 3}, "--num-classes describes masks, but there are none"),
        ({"palette": "p.yaml", "classes": "c.yaml"}, "--palette names the classes itself"),
        ({"palette": "p.yaml", "ignore_index": 0}, "--ignore-index is for class-index masks"),
        ({"num_classes": 0}, "--num-classes must be in 1-255, got 0"),
        ({"num_classes": 3, "ignore_index": 2}, "--ignore-index 2 is also a class id"),
        ({"labels": "nope"}, "--labels .*nope: not a folder"),
        ({"classes": "missing.yaml"}, "--classes .*missing.yaml: cannot read"),
    ],
)
def test_bad_mask_options_are_one_line(tmp_path, kwargs, message):
    src, masks = tmp_path / "src", tmp_path / "masks"
    image(src / "a.tif", 0)
    write_tif(masks / "a.tif", index_mask(1, 3)[None], georef=False)
    write_yaml(tmp_path / "p.yaml", [{"name": "x", "colour": [0, 0, 0]}])
    write_yaml(tmp_path / "c.yaml", ["x"])
    args = {"labels": masks} | {
        k: (tmp_path / v if isinstance(v, str) else v) for k, v in kwargs.items()
    }
    with pytest.raises(PrepareError, match=message) as err:
        prepare_folder(src, tmp_path / "out", OPTS, **args)
    assert "\n" not in str(err.value)


def test_no_mask_pairing_with_any_image_is_one_line(tmp_path):
    src, masks = tmp_path / "src", tmp_path / "masks"
    image(src / "a.tif", 0)
    write_tif(masks / "other.tif", index_mask(1, 3)[None], georef=False)
    with pytest.raises(PrepareError, match="no mask pairs with an image"):
        prepare_folder(src, tmp_path / "out", OPTS, labels=masks)


# ------------------------------------------------------------------------------------- merges
def _merge_dataset(tmp_path: Path) -> tuple[Path, Path, Path]:
    src, masks = tmp_path / "src", tmp_path / "masks"
    image(src / "a.tif", 0)
    write_tif(masks / "a.tif", index_mask(1, 5)[None], georef=False)
    return src, masks, write_yaml(tmp_path / "classes.yaml", NAMES)


def test_merges_are_recorded_as_training_applies_them(tmp_path):
    src, masks, classes = _merge_dataset(tmp_path)
    merges_file = write_yaml(
        tmp_path / "merges.yaml",
        {"two": [["road", "car"], {"built": ["building"]}], "veg": "low_veg+3"},
    )
    manifest = prepare_folder(
        src,
        tmp_path / "out",
        OPTS,
        labels=masks,
        classes=classes,
        merges=["coarse=road+car, building ,green:low_veg+tree", str(merges_file)],
    )
    assert manifest["merges"] == {
        "coarse": {"map": [0, 1, 2, 2, 0], "classes": ["road_and_car", "building", "green"]},
        "two": {"map": [0, 1, 255, 255, 0], "classes": ["road_and_car", "built"]},
        "veg": {"map": [255, 255, 0, 0, 255], "classes": ["low_veg_and_tree"]},
    }
    lut, names = label_lut(manifest, "coarse")
    assert lut[:5].tolist() == [0, 1, 2, 2, 0] and names == ["road_and_car", "building", "green"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("coarse=road+roof", "--merge coarse: unknown class 'roof' \\(classes: road, building"),
        ("coarse=road+car,car", "--merge coarse: class 'car' is in two groups"),
        ("coarse=road++car", "--merge coarse: an empty class in a group"),
        ("coarse=", "no groups"),
        ("co arse=road", "merge name 'co arse' must be"),
        ("x=road,a:car,a:tree", "--merge x: group name 'a' is used twice"),
        ("no-such-file.yaml", "--merge no-such-file.yaml: cannot read"),
    ],
)
def test_bad_merge_specs_are_one_line_naming_merge(tmp_path, spec, message):
    src, masks, classes = _merge_dataset(tmp_path)
    with pytest.raises(PrepareError, match=message) as err:
        prepare_folder(src, tmp_path / "out", OPTS, labels=masks, classes=classes, merges=[spec])
    assert str(err.value).startswith("--merge") and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything was tiled


# ------------------------------------------------------------------------- majority band count
def test_the_majority_band_count_wins_and_strays_are_named(tmp_path):
    src = tmp_path / "src"
    image(src / "a_gray.tif", 0, bands=1)  # first by name: once it set the band count
    for i, name in enumerate(["b.tif", "c.tif", "d.tif"]):
        image(src / name, i + 1)
    with pytest.raises(BadFilesError) as err:
        prepare_folder(src, tmp_path / "out", OPTS)
    assert (
        f"{src / 'a_gray.tif'}: has 1 band, expected 3 (the majority of the images; pass "
        "--bands to choose)" in str(err.value)
    )
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["bands"] == 3
    assert sum(s["tiles"] for s in manifest["splits"].values()) == 12
    assert [b["file"] for b in manifest["bad_files"]] == [str(src / "a_gray.tif")]
    # --bands chooses the minority
    opts = TilingOptions(tile=32, stride=32, progress=False, skip_bad=True)
    manifest = prepare_folder(src, tmp_path / "out1", opts, 1)
    assert manifest["bands"] == 1
    assert sum(s["tiles"] for s in manifest["splits"].values()) == 4
    assert all("expected 1 (--bands)" in b["error"] for b in manifest["bad_files"])


def test_masks_are_not_counted_among_the_images(tmp_path):
    src = tmp_path / "src"
    image(src / "a.tif", 0, bands=4)
    for name in ("a.tif", "b.tif", "c.tif"):  # more 1-band masks than images, inside SRC
        write_tif(src / "masks" / name, index_mask(1, 2)[None], georef=False)
    manifest = prepare_folder(src, tmp_path / "out", OPTS, labels=src / "masks", num_classes=2)
    assert manifest["bands"] == 4 and manifest["bad_files"] == []


# ----------------------------------------------------------------------------- real Potsdam crop
def test_potsdam_mini_as_class_index_masks_counts_like_prepare_potsdam(potsdam_mini, tmp_path):
    """The real crop, its colour labels turned into class-index masks by the test, prepared as
    a folder (same relative image names, so the same tiles land in the same splits)."""
    opts = TilingOptions(tile=128, stride=128, progress=False, test_fraction=0.3)
    release = prepare_potsdam(potsdam_mini, tmp_path / "release", opts)
    src = tmp_path / "src"
    for tif in sorted((potsdam_mini / "2_Ortho_RGB").glob("*.tif")):
        (src / "2_Ortho_RGB").mkdir(parents=True, exist_ok=True)
        shutil.copy(tif, src / "2_Ortho_RGB" / tif.name)
        label = tif.name.replace("_RGB.tif", "_label_noBoundary.tif")
        with rasterio.open(potsdam_mini / "5_Labels_all_noBoundary" / label) as lab:
            ids = colours_to_classes(lab.read())
        write_tif(src / "masks/2_Ortho_RGB" / tif.name, ids[None], georef=False)
    classes = write_yaml(
        tmp_path / "potsdam.yaml",
        ["impervious", "building", "low_vegetation", "tree", "car", "clutter"],
    )
    folder = prepare_folder(
        src,
        tmp_path / "folder",
        opts,
        labels=src / "masks",
        classes=classes,
        merges=["potsdam3=impervious+car,building+clutter,vegetation:low_vegetation+tree"],
    )
    assert folder["classes"] == release["classes"]
    for split in ("train", "test", "unlabelled"):
        assert folder["splits"][split] == release["splits"][split], split
    assert sum(s["tiles"] for s in folder["splits"].values()) > 1
    assert folder["merges"]["potsdam3"]["map"] == release["merges"]["potsdam3"]["map"]


# ---------------------------------------------------------------------------------------- CLI
def test_cli_help_describes_masks(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "folder", "--help"])
    out = capsys.readouterr().out
    for text in (
        "--labels",
        "--classes",
        "--num-classes",
        "--ignore-index",
        "--palette",
        "--merge",
        "--bands",
        "img_dir/",
        "unpaired_masks",
        "ignore: true",
    ):
        assert text in out
