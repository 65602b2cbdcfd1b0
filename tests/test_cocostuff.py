"""COCO-Stuff: fine -> coarse -> subset mapping, curation, RGB order, bad pairs."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.prepare.cocostuff import FINE, fine_to_coarse, prepare_cocostuff, subset_lut
from pipeline.prepare.run import TilingOptions
from pipeline.prepare.shards import BadFilesError
from tests.conftest import decode_row

OPTS = TilingOptions(tile=32, stride=32, progress=False)
SKY, GRASS, ROAD, PERSON, WALL = (
    FINE.index(n) for n in ("sky-other", "grass", "road", "person", "wall-brick")
)


def test_hierarchy_covers_every_fine_class():
    coarse = fine_to_coarse()
    assert (coarse[:182] != 255).all() and coarse[255] == 255
    assert coarse[FINE.index("clouds")] == coarse[SKY]
    assert coarse[FINE.index("fog")] == coarse[FINE.index("river")]  # fog is water
    lut3, lut15 = subset_lut(3), subset_lut(15)
    assert [lut3[i] for i in (SKY, GRASS, ROAD, PERSON, WALL, 255)] == [0, 1, 2, 255, 255, 255]
    assert lut15[PERSON] == 255 and len(set(lut15[91:182])) == 15


def write_pair(root, split, stem, fine, rgb=None):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "stuffthingmaps_trainval2017" / split).mkdir(parents=True, exist_ok=True)
    h, w = fine.shape
    if rgb is None:
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[..., 0] = 220  # red: shows whether channels stay in RGB order
    Image.fromarray(rgb).save(root / "images" / split / f"{stem}.jpg", quality=95)
    Image.fromarray(fine.astype(np.uint8)).save(
        root / "stuffthingmaps_trainval2017" / split / f"{stem}.png"
    )


def test_curation_mapping_and_rgb_order(tmp_path):
    good = np.full((120, 160), SKY, np.uint8)
    good[60:, :] = ROAD
    write_pair(tmp_path, "train2017", "a", good)
    few = np.full((120, 160), PERSON, np.uint8)  # things only: < 75% target
    write_pair(tmp_path, "train2017", "b", few)
    write_pair(tmp_path, "train2017", "c", np.full((50, 60), GRASS, np.uint8))  # too small
    write_pair(tmp_path, "val2017", "d", np.full((100, 100), GRASS, np.uint8))
    manifest = prepare_cocostuff(
        tmp_path, tmp_path / "out", OPTS, subset=3, prescale=0.5, min_side=90
    )
    cur = manifest["curation"]
    assert (cur["seen"], cur["kept"], cur["too_few_target"], cur["too_small"]) == (4, 2, 1, 1)
    rows = {
        r["tile_id"]: r
        for p in (tmp_path / "out").rglob("*.parquet")
        for r in pq.read_table(p).to_pylist()
    }
    assert rows["a"]["split"] == "train" and rows["d"]["split"] == "test"
    img, lab = decode_row(rows["a"])
    assert img.shape == (3, 32, 32) and img[0].mean() > 200 and img[2].mean() < 30
    assert set(np.unique(lab)) == {0, 2}  # sky above, road below the centre line
    assert (decode_row(rows["d"])[1] == 1).all()


def test_id_list_overrides_the_rule_and_bad_pairs_are_reported(tmp_path):
    write_pair(tmp_path, "train2017", "x", np.full((120, 160), PERSON, np.uint8))
    write_pair(tmp_path, "train2017", "y", np.full((120, 160), SKY, np.uint8))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(
        tmp_path / "stuffthingmaps_trainval2017/train2017/y.png"
    )  # wrong size label
    ids = tmp_path / "ids.txt"
    ids.write_text("x\ny\n")
    with pytest.raises(BadFilesError, match=r"y.png: label is 10x10, expected 160x120"):
        prepare_cocostuff(tmp_path, tmp_path / "out", OPTS, prescale=0.5, ids=ids)
    rows = [r for p in (tmp_path / "out").rglob("*.parquet") for r in pq.read_table(p).to_pylist()]
    assert [r["tile_id"] for r in rows] == ["x"]
    assert (decode_row(rows[0])[1] == 255).all()  # kept by id, all pixels ignored
