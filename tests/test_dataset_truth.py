"""The manifest is the dataset: readers take exactly the shards it lists, each checked up front,
and a prepare into a folder that holds a dataset replaces it whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import Config
from pipeline.data.format import PrepareError, training_inputs
from pipeline.data.read import iter_tiles
from pipeline.prepare import run as prepare_run
from pipeline.prepare.folder import prepare_folder
from pipeline.prepare.potsdam import prepare_potsdam
from pipeline.prepare.run import TilingOptions
from pipeline.prepare.shards import check_output
from tests.conftest import make_release, truncate, write_tif

IID = shutil.which("iid", path=str(Path(sys.executable).parent))
OPTS = TilingOptions(tile=32, stride=32, progress=False, test_fraction=0.3)


def config(shards: Path) -> Config:
    return Config.from_dict(
        {"data": {"shards": str(shards), "merge": "potsdam3"}, "model": {"in_channels": 3}}
    )


def tiles_read(shards: Path, splits: list[str]) -> int:
    return sum(len(images) for images, _, _ in iter_tiles(shards, splits, batch_size=16))


@pytest.fixture
def dataset(tmp_path) -> Path:
    make_release(tmp_path / "src", {"1_1": (96, 96), "1_2": (96, 96)})
    prepare_potsdam(tmp_path / "src", tmp_path / "out", OPTS)
    return tmp_path / "out"


def test_a_stale_shard_beside_the_listed_ones_is_never_read(dataset, tmp_path):
    manifest = json.loads((dataset / "manifest.json").read_text())
    train = manifest["splits"]["train"]["tiles"]
    # An earlier prepare's shard with another tile size, left in the split folder.
    make_release(tmp_path / "old", {"9_9": (128, 128)})
    opts = TilingOptions(tile=64, stride=64, progress=False, test_fraction=0.0)
    prepare_potsdam(tmp_path / "old", tmp_path / "old-out", opts)
    stale = next((tmp_path / "old-out" / "train").glob("*.parquet"))
    shutil.copy(stale, dataset / "train" / "stale-00000.parquet")

    assert tiles_read(dataset, ["train"]) == train
    inputs = training_inputs(config(dataset))
    assert len(inputs.train_files) == len(
        [s for s in manifest["shards"] if s["path"].startswith("train/")]
    )
    assert not any(Path(f).name.startswith("stale") for f in inputs.train_files + inputs.eval_files)


def _missing(path: Path) -> None:
    path.unlink()


def _other_tiles(path: Path) -> None:
    """The file replaced by one of another tile size (a re-prepare with another --tile)."""
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("height"), "height", [[64] * len(table)])
    pq.write_table(table, path)


def _fewer_rows(path: Path) -> None:
    pq.write_table(pq.read_table(path).slice(0, 1), path)


def _garbage(path: Path) -> None:
    path.write_bytes(b"PAR1 not really parquet")


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_missing, ": missing"),
        (truncate, ": not a readable Parquet file"),
        (_garbage, ": not a readable Parquet file"),
        (_other_tiles, ": 64x32 tiles, expected 32x32"),
        (_fewer_rows, r": 1 rows, the manifest says \d+"),
    ],
    ids=["missing", "truncated", "garbage", "other-tile-size", "fewer-rows"],
)
def test_a_damaged_listed_shard_is_one_line_naming_it_before_training(dataset, damage, expected):
    manifest = json.loads((dataset / "manifest.json").read_text())
    listed = next(s["path"] for s in manifest["shards"] if s["path"].startswith("train/"))
    damage(dataset / listed)
    with pytest.raises(PrepareError, match=f"{dataset / listed}{expected}") as err:
        training_inputs(config(dataset))
    assert "\n" not in str(err.value)
    with pytest.raises(PrepareError, match=f"{dataset / listed}{expected}"):
        tiles_read(dataset, ["train"])


def _names(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_prepare_into_a_dataset_needs_overwrite_and_a_failed_one_keeps_the_old(
    dataset, tmp_path, monkeypatch
):
    before = _names(dataset)
    with pytest.raises(PrepareError, match=f"{dataset}: holds a prepared dataset; pass --overwr"):
        prepare_potsdam(tmp_path / "src", dataset, OPTS)
    assert _names(dataset) == before

    # A re-prepare with --overwrite that dies half way (here: interrupted on the third tile).
    real = prepare_run.iter_tiles

    def dies(*args, **kwargs):
        for i, tile in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield tile

    monkeypatch.setattr(prepare_run, "iter_tiles", dies)
    again = TilingOptions(tile=16, stride=16, progress=False, test_fraction=0.3, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        prepare_potsdam(tmp_path / "src", dataset, again)
    assert _names(dataset) == before  # the previous dataset, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging left
    monkeypatch.setattr(prepare_run, "iter_tiles", real)

    # Completed, it replaces the old one whole: only the new tiles, none of the old shards.
    manifest = prepare_potsdam(tmp_path / "src", dataset, again)
    assert manifest["tiling"]["tile"] == 16
    assert sorted(str(p.relative_to(dataset)) for p in dataset.rglob("*.parquet")) == sorted(
        s["path"] for s in manifest["shards"]
    )
    assert tiles_read(dataset, ["train", "test"]) == sum(
        manifest["splits"][s]["tiles"] for s in ("train", "test")
    )


def test_what_a_killed_prepare_left_is_cleaned_or_restored(dataset, tmp_path):
    before = _names(dataset)
    # Killed while staging (a dead pid owns it, a partial shard inside): removed on the next run.
    staging = tmp_path / ".out.preparing"
    (staging / "train").mkdir(parents=True)
    (staging / "train" / "x-00000.parquet.tmp").write_bytes(b"partial")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (staging / ".owner").write_text(f"{os.uname().nodename} {dead.pid}\n")
    check_output(dataset, overwrite=True)
    assert not staging.exists()
    # A live owner: refused, not removed.
    staging.mkdir()
    (staging / ".owner").write_text(f"{os.uname().nodename} {os.getpid()}\n")
    with pytest.raises(
        PrepareError, match=rf"{dataset}: another `iid prepare` \(pid {os.getpid()}"
    ):
        check_output(dataset, overwrite=True)
    shutil.rmtree(staging)
    # Killed between the swap's two renames: the previous dataset comes back.
    dataset.rename(tmp_path / ".out.replaced")
    check_output(dataset, overwrite=True)
    assert _names(dataset) == before


def test_a_folder_that_is_not_a_dataset_is_never_replaced(tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    opts = TilingOptions(tile=32, progress=False, overwrite=True)
    make_release(tmp_path / "src", {"1_1": (64, 64)})
    with pytest.raises(PrepareError, match=f"{keep}: not empty and holds no prepared dataset"):
        prepare_potsdam(tmp_path / "src", keep, opts)
    assert (keep / "notes.txt").read_text() == "mine"


def test_an_out_inside_src_is_not_read_as_input_on_a_rerun(tmp_path):
    import numpy as np

    src = tmp_path / "imagery"
    write_tif(src / "a.tif", np.zeros((3, 64, 64), np.uint8))
    opts = TilingOptions(tile=32, progress=False, overwrite=True)
    first = prepare_folder(src, src / "shards", opts)
    again = prepare_folder(src, src / "shards", opts)
    assert again["bad_files"] == [] and again["splits"] == first["splits"]


def test_cli_prepare_into_a_dataset_is_one_line_naming_overwrite(tmp_path):
    make_release(tmp_path / "src", {"1_1": (64, 64)})
    cmd = [IID, "prepare", "potsdam", str(tmp_path / "src"), str(tmp_path / "out"), "--tile", "32"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"iid prepare: error: {tmp_path / 'out'}: holds a prepared dataset; pass --overwrite "
        "to replace it (the old one stays until the new one is complete)"
    ]
    assert subprocess.run([*cmd, "--overwrite"], capture_output=True).returncode == 0
