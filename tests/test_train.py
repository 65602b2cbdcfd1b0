"""Training: bad runs fail before any work; a real 2-worker Ray Train run on CPU logs to a real
MLflow SQLite store, checkpoints every epoch, and resumes instead of retraining."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline.config import Config, ConfigError
from pipeline.prepare.run import TilingOptions
from pipeline.prepare.shards import PrepareError
from pipeline.prepare.synthetic import SceneSpec, prepare_synthetic
from pipeline.train import CHECKPOINT_FILE, fit

IID = shutil.which("iid", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    opts = TilingOptions(tile=32, stride=32, progress=False, test_fraction=0.2)
    prepare_synthetic(out, opts, SceneSpec(size=256, seed=1), baselines=False)
    return out / "shards"


def config(shards: Path, tmp: Path, **run) -> Config:
    return Config.from_dict(
        {
            "data": {
                "shards": str(shards),
                "batch_size": 8,
                "merge": "potsdam3",
                "pairs_on": "worker",
            },
            "model": {
                "in_channels": 3,
                "n_clusters_a": 5,
                "n_clusters_b": 3,
                "n_subheads": 2,
                "width": 0.125,
            },
            "loss": {"lamb_a": 1.0, "lamb_b": 1.5, "half_window": 3},
            "optim": {"lr": 0.002, "epochs": 2},
            "pairs": {"crop": 24},
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
            "run": {
                "name": "t",
                "storage_path": str(tmp / "runs"),
                "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                "experiment": "test",
            }
            | run,
        }
    )


def test_band_mismatch_fails_before_training(shards, tmp_path):
    cfg = config(shards, tmp_path)
    bad = Config.from_dict(cfg.to_dict() | {"model": cfg.to_dict()["model"] | {"in_channels": 4}})
    with pytest.raises(ConfigError, match="4 bands configured but the shards .* have 3"):
        fit(bad)
    assert not (tmp_path / "runs").exists()


def test_half_window_larger_than_tiles(shards, tmp_path):
    d = config(shards, tmp_path).to_dict()
    d["loss"]["half_window"] = 30
    with pytest.raises(ConfigError, match="loss.half_window: 30 does not fit 24-pixel tiles"):
        fit(Config.from_dict(d))


def test_missing_shards(tmp_path):
    with pytest.raises(PrepareError, match="no manifest"):
        fit(config(tmp_path / "nowhere", tmp_path))


def test_unreachable_tracking_server_fails_first(shards, tmp_path):
    cfg = config(shards, tmp_path, tracking_uri="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"cannot reach MLflow at http://127.0.0.1:9"):
        fit(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_two_workers_train_checkpoint_log_and_resume(shards, tmp_path, ray_cluster):
    cfg = config(shards, tmp_path)
    result = fit(cfg)
    assert result.metrics["epoch"] == 1
    assert 0 <= result.metrics["acc"] <= 1 and "mass_0" in result.metrics
    state = torch.load(Path(result.checkpoint.path) / CHECKPOINT_FILE, weights_only=False)
    assert state["epoch"] == 1 and len(state["history"]) == 2
    assert {"model", "optimizer", "torch_rng", "config"} <= set(state)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    client = mlflow.MlflowClient(cfg.run.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["loss.lamb_b"] == "1.5" and run.data.tags["status"] == "finished"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc")] == [0, 1]

    # Same run name again: resumes from the last checkpoint, nothing is retrained.
    again = fit(cfg)
    assert again.checkpoint.path == result.checkpoint.path
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc")] == [0, 1]
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.skipif(IID is None, reason="console script `iid` not installed")
def test_cli_train_bad_config_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {shards: x}\nloss: {lamb_b: -1}\n")
    run = subprocess.run([IID, "train", "--config", str(path)], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].endswith("loss.lamb_b: expected > 0, got -1.0")
