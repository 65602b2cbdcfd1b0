"""The `iid` command line as users run it: the installed console script in a subprocess, or its
``main`` in this process where only the message is checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main as cli_main
from pipeline.config import Config
from pipeline.models import build_model
from pipeline.train import WORKER_COUNT_NOTICE

IID = shutil.which("iid", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(IID is None, reason="console script `iid` not installed next to this python")
def test_demo_trains_evaluates_and_writes_metrics(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        # 6 epochs: both views are drawn, so after 3 the chosen sub-head's ACC is still about
        # 0.28 (seeds 0, 1); after 6 it was 0.33-0.47 (seeds 0-2).
        [IID, "demo", "--epochs", "6", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "k-means on raw pixels" in run.stdout
    metrics = json.loads((out / "demo_metrics.json").read_text())
    assert set(metrics["iid"]) == {"acc", "nmi", "ari"}
    # 10 balanced classes: a matched random clustering scores about 0.11; training must beat it.
    assert metrics["iid"]["acc"] > 0.25
    chosen = metrics["iid_chosen_subhead"]
    assert metrics["iid"]["acc"] == metrics["iid_all_subheads_acc"][chosen]
    assert not list(out.glob("*.tmp"))


@pytest.mark.skipif(IID is None, reason="console script `iid` not installed next to this python")
def test_unknown_command_fails_with_usage():
    run = subprocess.run([IID, "nonsense"], capture_output=True, text=True)
    assert run.returncode != 0
    assert "invalid choice" in run.stderr


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("nowhere", "--model: 'nowhere' is neither a checkpoint path nor an MLflow model URI"),
        ("{tmp}", "--model: no checkpoint.pt in {tmp} or its checkpoint_* dirs"),
        ("{tmp}/broken.pt", "--model: {tmp}/broken.pt is not a readable checkpoint"),
        ("{tmp}/bare.pt", "--model: {tmp}/bare.pt is not a checkpoint of this pipeline"),
        ("{tmp}/badcfg.pt", "--model: {tmp}/badcfg.pt carries no valid config (data.shards:"),
        (
            "{tmp}/other.pt",
            "--model: {tmp}/other.pt: the weights do not fit the network its config describes",
        ),
    ],
)
def test_evaluate_bad_model_is_one_line(tmp_path, model, message, monkeypatch, capsys):
    # In this process (a subprocess costs 8 s of imports); test_cli_train_bad_config_is_one_line
    # checks the exit status of the real console script.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    cfg = Config.from_dict({"data": {"shards": "x"}, "model": {"in_channels": 3, "width": 0.125}})
    narrow = build_model(cfg.model).state_dict()
    torch.save(narrow, tmp_path / "bare.pt")  # a bare state dict
    torch.save({"model": narrow, "config": {"data": {}}}, tmp_path / "badcfg.pt")
    wide = cfg.to_dict() | {"model": cfg.to_dict()["model"] | {"width": 0.25}}
    torch.save({"model": narrow, "config": wide}, tmp_path / "other.pt")  # another shape
    model, message = model.format(tmp=tmp_path), message.format(tmp=tmp_path)
    assert cli_main(["evaluate", "--model", model, "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"iid evaluate: error: {message}"), err


def test_evaluate_with_plots_on_unlabelled_shards(tmp_path, monkeypatch, capsys):
    from pipeline.prepare.folder import prepare_folder
    from pipeline.prepare.run import TilingOptions
    from tests.conftest import write_tif

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    write_tif(tmp_path / "src" / "a.tif", rng.integers(0, 255, (3, 64, 64), dtype=np.uint8))
    shards = tmp_path / "shards"
    prepare_folder(tmp_path / "src", shards, TilingOptions(tile=32, progress=False))
    cfg = Config.from_dict(
        {
            "data": {"shards": str(shards), "eval_split": "unlabelled"},
            "model": {"in_channels": 3, "n_clusters_a": 4, "width": 0.125},
            "loss": {"half_window": 3},
        }
    )
    model = {"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict()}
    torch.save(model, tmp_path / "model.pt")
    args = ["evaluate", "--model", str(tmp_path / "model.pt"), "--data", str(shards)]
    assert cli_main([*args, "--plots", str(tmp_path / "plots")]) == 0
    assert "(no labelled pixels)" in capsys.readouterr().out
    # no confusion without labels; the clusters overlay the images instead
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["confusion.json", "joint.png", "overlays.png"]


def test_prepare_synthetic_too_small_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "scene"
    assert cli_main(["prepare", "synthetic", str(out), "--size", "128", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("scene size must be >= 256 px, got 128"), err
    assert not out.exists()


def test_print_config_round_trips(tmp_path, capsys):
    from pipeline.config import load_config

    base = tmp_path / "c.yaml"
    base.write_text("data: {shards: somewhere}\noptim: {lr: 1E-4}\nmodel: {n_clusters_b: 4}\n")
    sets = ["--set", "optim.lr=1e-3", "--set", "optim.epochs=8.0", "--set", "pairs.crop=48"]
    assert cli_main(["train", "--config", str(base), *sets, "--print-config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    want = load_config(base, ["optim.lr=1e-3", "optim.epochs=8.0", "pairs.crop=48"])
    assert load_config(printed) == want and want.optim.lr == 1e-3 and want.optim.epochs == 8


def test_dry_run_checks_everything_and_starts_nothing(tmp_path, monkeypatch, capsys):
    import pipeline.train as train_module
    from tests.conftest import small_synthetic

    shards = small_synthetic(tmp_path / "data", seed=3)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_module, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    config = tmp_path / "c.yaml"
    config.write_text(
        f"data: {{shards: {shards}, merge: potsdam3}}\nmodel: {{width: 0.125}}\n"
        f"optim: {{epochs: 2}}\nrun: {{name: dry, storage_path: {tmp_path / 'runs'}}}\n"
    )
    assert cli_main(["train", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("config: run 'dry', segmentation, 3 bands (uint8 pixels), 2 epochs")
    assert out[1].startswith(f"data: {shards}: ") and "3 classes" in out[1]
    assert out[3] == f"run folder: {tmp_path / 'runs' / 'dry'}: new: epochs 1 to 2"
    assert out[-1] == "dry run: nothing started"
    assert not (tmp_path / "runs").exists()
    # A bad value is still refused before anything, as training would refuse it.
    args = ["train", "--config", str(config), "--dry-run", "--set", "loss.half_window=40"]
    assert cli_main(args) == 2
    assert "loss.half_window: 40 does not fit" in capsys.readouterr().err


# Ray's and MLflow's own lines: log records, ANSI codes, and Ray Core's C++ log ("file.cc:123").
NOISE = ("Token authentication", " INFO ", "WARNING", "\x1b[", "Deprecat", "Execution plan", ".cc:")


def noise(lines: list[str]) -> list[str]:
    """The lines of ``lines`` that are not the project's own (the raylet's worker-count
    notice, which every driver of the shared test cluster is sent, included)."""
    theirs = (*NOISE, WORKER_COUNT_NOTICE)
    return [ln for ln in lines if any(n in ln for n in theirs)]


@pytest.mark.skipif(IID is None, reason="console script `iid` not installed next to this python")
def test_train_prints_a_line_per_epoch_quietly_and_a_finished_rerun_trains_nothing(
    tmp_path, ray_cluster
):
    from tests.conftest import small_run_config

    # A relative storage path, as in configs/demo.yaml: Ray's workers run elsewhere.
    scaling = "{num_workers: 1, cpus_per_worker: 1}"
    config = small_run_config(tmp_path, "lines", 2, scaling, storage_path="runs")
    # The test's cluster, joined as `ray start` users join theirs (no second cluster to start).
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    run = subprocess.run(
        [IID, "train", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    lines = (run.stdout + run.stderr).splitlines()
    epochs = [ln for ln in lines if ln.startswith("epoch ")]
    assert len(epochs) == 2, lines
    assert epochs[0].startswith("epoch 1/2: loss A ") and "held-out MI" in epochs[0]
    assert "ACC" in epochs[0] and "s left" in epochs[0] and "s left" not in epochs[1]
    # Before the first epoch's line, the stretch of starting Ray and the workers is said too.
    assert lines.index("Ray ready; starting 1 training worker(s)") < lines.index(epochs[0])
    assert lines.index("1 worker(s) ready: training epoch 1/2") < lines.index(epochs[0])
    # The summary counts epochs as the per-epoch lines do (it said "epoch 1 of 2" here).
    assert any(ln.startswith("run lines: epoch 2 of 2, sub-head ") for ln in lines), lines
    assert not noise(lines), lines
    # The run's page, not the experiment's (which MLflow 3's UI opens on its GenAI pages).
    run_id = next(ln.split()[2] for ln in lines if ln.startswith("mlflow: run "))
    browse = next(ln for ln in lines if ln.startswith("  browse: "))
    assert browse.startswith("  browse: mlflow ui --backend-store-uri sqlite:///"), browse
    assert browse.endswith(f"then http://127.0.0.1:5000/#/experiments/1/runs/{run_id}"), browse

    again = subprocess.run(
        [IID, "train", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    assert "run lines: already finished, nothing trained" in again.stdout
    assert "run lines: epoch 2 of 2, sub-head " in again.stdout
    assert not [ln for ln in again.stdout.splitlines() if ln.startswith("epoch ")]
    assert "starting" not in again.stdout  # Ray was not started
