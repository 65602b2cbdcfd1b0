"""Storage locations: local paths and pyarrow filesystem URIs go through the same helpers.

``file://`` URIs take the URI code path (pyarrow's ``FileSystem.from_uri``) that ``s3://`` and
``gs://`` take, without a network; the two-node test trains with them end to end.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.checkpoint import CHECKPOINT_FILE
from pipeline.checkpoint import load as load_checkpoint
from pipeline.config import ConfigError
from pipeline.data.format import PrepareError, read_manifest
from pipeline.data.read import iter_tiles
from tests.conftest import small_synthetic


def test_join_keeps_uri_schemes():
    assert storage.join("s3://bucket/runs/", "t", "report.json") == "s3://bucket/runs/t/report.json"
    assert storage.join("gs://b", "x") == "gs://b/x"
    assert storage.join("runs", "t") == str(Path("runs", "t"))
    assert storage.absolute("s3://b/p") == "s3://b/p"
    assert storage.absolute("runs") == str(Path("runs").resolve())


def test_write_read_list_through_a_uri(tmp_path):
    root = f"file://{tmp_path}"
    storage.write_text_atomic(storage.join(root, "a", "one.txt"), "1")
    storage.write_text_atomic(storage.join(root, "a", "one.txt"), "one")  # replaced whole
    storage.write_text_atomic(storage.join(root, "a", "checkpoint_2", "x"), "")
    storage.write_text_atomic(storage.join(root, "a", "checkpoint_1", "x"), "")
    assert storage.read_text(storage.join(root, "a", "one.txt")) == "one"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "checkpoint_1",
        "checkpoint_2",
        "one.txt",
    ]  # no temporary names left behind
    assert storage.list_files(storage.join(root, "a"), ".txt") == [f"{root}/a/one.txt"]
    assert storage.list_dirs(storage.join(root, "a"), "checkpoint_") == [
        f"{root}/a/checkpoint_1",
        f"{root}/a/checkpoint_2",
    ]
    assert storage.list_files(storage.join(root, "nowhere"), ".txt") == []
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(root, "a", "two.txt"))


def test_staged_dir_lands_files_at_the_location(tmp_path):
    with storage.staged_dir(f"file://{tmp_path}/plots") as out:
        (out / "joint.png").write_bytes(b"png")
    assert (tmp_path / "plots" / "joint.png").read_bytes() == b"png"


def test_unknown_scheme_is_a_one_line_error(tmp_path):
    with pytest.raises(storage.StorageError, match=r"^nfs4://host/x: cannot open this location"):
        storage.read_text("nfs4://host/x")
    with pytest.raises(PrepareError, match=r"nfs4://host/x/manifest.json: cannot open"):
        read_manifest("nfs4://host/x")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return small_synthetic(tmp_path_factory.mktemp("storage"), seed=3)


def test_shards_read_the_same_through_a_uri(shards):
    assert read_manifest(f"file://{shards}") == read_manifest(shards)
    local = list(iter_tiles(shards, ["train"], 4))
    remote = list(iter_tiles(f"file://{shards}", ["train"], 4))
    assert len(local) == len(remote) > 0
    for (xa, ya, _), (xb, yb, _) in zip(local, remote, strict=True):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_newest_checkpoint_of_a_run_through_a_uri(tmp_path):
    for i in (1, 3, 2):
        d = tmp_path / "run" / f"checkpoint_2026-11-23_12-0{i}-00.000000"
        d.mkdir(parents=True)
        torch.save({"epoch": i}, d / CHECKPOINT_FILE)
    assert load_checkpoint(f"file://{tmp_path}/run")["epoch"] == 3
    assert load_checkpoint(tmp_path / "run")["epoch"] == 3


def test_a_run_whose_newest_checkpoint_is_unreadable_loads_the_one_before(tmp_path, caplog):
    """A failed write (a full disk) leaves an empty checkpoint: the one before it is loaded,
    and the skipped one is named."""
    run = tmp_path / "run"
    for i, content in enumerate((None, None, b"")):
        d = run / f"checkpoint_2026-11-23_12-0{i}-00.000000"
        d.mkdir(parents=True)
        if content is None:
            torch.save({"epoch": i}, d / CHECKPOINT_FILE)
        else:
            (d / CHECKPOINT_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert load_checkpoint(run)["epoch"] == 1
    assert "checkpoint_2026-11-23_12-02-00.000000" in caplog.text and "skipped" in caplog.text
    # Nothing readable at all: one line naming the newest.
    for d in run.iterdir():
        (d / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"12-02-00.000000/checkpoint.pt is not a readable"):
        load_checkpoint(run)


def test_a_lock_is_exclusive_taken_over_from_a_dead_holder_and_removed_after(tmp_path):
    path = tmp_path / "run" / ".lock"
    with storage.lock(path) as taken_over:
        assert taken_over == "" and path.is_file()
        with pytest.raises(storage.LockedError, match=rf"held by pid {os.getpid()}, since "):
            with storage.lock(path):
                pass
    assert not path.exists()
    # A holder on this host that is gone: taken over, and its line handed back.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(f"{socket.gethostname()} {dead.pid} abc 2026-11-24T10:00:00\n")
    with storage.lock(path) as taken_over:
        assert taken_over.startswith(f"{socket.gethostname()} {dead.pid} ")
    assert not path.exists()
    # One on another host cannot be checked from here: it counts as running.
    path.write_text("elsewhere 1 abc 2026-11-24T10:00:00\n")
    with pytest.raises(storage.LockedError, match="held by pid 1 on host elsewhere"):
        with storage.lock(path):
            pass
    assert path.read_text().startswith("elsewhere 1 ")  # not removed by the refused one
