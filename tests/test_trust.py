"""Trust: nothing read from a data path runs code, and a run's name cannot leave its storage."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline.checkpoint import CHECKPOINT_FILE, load
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError


class Payload:
    """Unpickling this runs a shell command (what a planted checkpoint would carry)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_carries_code_is_refused_unread(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "run" / "checkpoint_000000"
    folder.mkdir(parents=True)
    state = {"model": {}, "epoch": 0, "history": [{"acc": Payload(str(marker))}], "config": {}}
    torch.save(state, folder / CHECKPOINT_FILE)

    refused = r"is not a plain checkpoint, refused unread \(.*GLOBAL posix.system"
    with pytest.raises(ConfigError, match=f"{folder / CHECKPOINT_FILE} {refused}"):
        load(tmp_path / "run")
    assert not marker.exists()

    # `iid evaluate` on the run: one line naming the file, exit 2, nothing run.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert cli_main(["evaluate", "--model", str(tmp_path / "run"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and CHECKPOINT_FILE in err[0] and "refused unread" in err[0], err
    assert not marker.exists()


class PickledModel(torch.nn.Module):
    """A model whose pickle runs a shell command when loaded."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_registered_models_load_as_weights_and_planted_code_is_refused(tmp_path, monkeypatch):
    import mlflow
    import mlflow.pytorch

    from pipeline import tracking
    from pipeline.checkpoint import load_model
    from pipeline.config import Config
    from pipeline.models import build_model

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.use(uri)
    cfg = Config.from_dict(
        {
            "data": {"shards": "x"},
            "model": {"in_channels": 3, "n_clusters_a": 4, "n_subheads": 2, "width": 0.125},
            "run": {"name": "good", "experiment": "trust"},
        }
    )
    model = build_model(cfg.model)
    run_id = tracking.run_for(uri, cfg, tmp_path / "runs" / "good")
    info = {"subhead": 1, "names": ["", "", ""]}
    assert (
        tracking.log_report(uri, run_id, cfg, model, {"eval_acc": 0.5}, [], info=info)
        == "models:/good/1"
    )
    for name in ("models:/good/1", "models:/good/latest", f"runs:/{run_id}/model"):
        loaded, loaded_cfg = load_model(name)
        assert loaded_cfg == cfg and not loaded.training
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)

    # A pickled model in the registry (what an attacker with access to MLflow would plant):
    # refused without unpickling it.
    marker = tmp_path / "payload-ran"
    mlflow.set_experiment("trust")
    with mlflow.start_run():
        mlflow.pytorch.log_model(
            PickledModel(str(marker)),
            name="model",
            registered_model_name="pickled",
            serialization_format="pickle",
            pip_requirements=[],
        )
    with pytest.raises(ConfigError, match=r"models:/pickled/1 was not logged by this pipeline"):
        load_model("models:/pickled/1")
    # Weights that carry code instead of tensors: refused unread too.
    folder = tmp_path / "planted"
    folder.mkdir()
    torch.save({"trunk.0.weight": Payload(str(marker))}, folder / tracking.WEIGHTS_FILE)
    (folder / tracking.CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path=tracking.MODEL_DIR)
    with pytest.raises(ConfigError, match=r"weights.pt is not a plain checkpoint, refused unread"):
        load_model(f"runs:/{run.info.run_id}/model")
    assert not marker.exists()
