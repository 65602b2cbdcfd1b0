"""The registered model: a pyfunc model that predicts in a fresh process, and its answer (chosen
sub-head, matched class names), which travels with checkpoints and registered models alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import tracking
from pipeline.checkpoint import Trained, load_model, load_trained, save
from pipeline.config import Config, ConfigError, Job, PairConfig
from pipeline.data.format import to_unit
from pipeline.models import build_model
from pipeline.serving import predict

CLASSES = ("roads", "buildings", "trees")


def tiny_config(name: str = "pyf", task: str = "segmentation") -> Config:
    return Config.from_dict(
        {
            "data": {"shards": "x", "dtype": "uint8"},
            "model": {
                "task": task,
                "in_channels": 3,
                "n_clusters_a": 5,
                "n_clusters_b": 3,
                "n_subheads": 2,
                "width": 0.25,
            },
            "run": {"name": name, "experiment": "pyfunc"},
        }
    )


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real SQLite MLflow store in tmp_path, which ``models:/`` URIs resolve against."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.use(uri)
    return uri


def register(
    uri: str, cfg: Config, root: Path, info: dict[str, object]
) -> tuple[str, torch.nn.Module]:
    """Log a fresh network of ``cfg`` as a run's report; returns its URI and the network."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    run_id = tracking.run_for(uri, cfg, root / "runs" / cfg.run.name)
    return tracking.log_report(uri, run_id, cfg, model, {"eval_acc": 0.5}, [], info=info), model


PREDICT_IN_A_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(sys.argv[1])
    x = np.load(sys.argv[2])
    with_probs = model.predict(x, params={"probabilities": True})
    out = {
        "ids": model.predict(x),
        "clusters": with_probs["clusters"],
        "probabilities": with_probs["probabilities"],
        "head_a": model.predict(x, params={"head": "A"}),
        "subhead_0": model.predict(x, params={"subhead": 0}),
    }
    np.savez(sys.argv[3], **out)
    try:
        model.predict(np.zeros((2, 4, 40, 56), np.uint8))
        refused = ""
    except Exception as err:
        refused = f"{type(err).__name__}: {err}"
    print(json.dumps({"refused": refused}))
    """
)


def test_the_registered_model_predicts_in_a_fresh_process(store, tmp_path):
    cfg = tiny_config()
    info = {"subhead": 1, "names": ["buildings", "", "roads"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_uri, model = register(store, cfg, tmp_path, info)
    assert model_uri == "models:/pyf/1"
    # Logging the model warns about nothing (signature, requirements, input example).
    assert not [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]

    x = np.random.default_rng(0).integers(0, 256, (2, 3, 40, 56), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    # On the CPU, as the direct pass below: the ids are compared exactly.
    env = os.environ | {"MLFLOW_TRACKING_URI": store, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", PREDICT_IN_A_FRESH_PROCESS, model_uri, "x.npy", "out.npz"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")

    model.eval()
    with torch.inference_mode():
        unit = torch.from_numpy(to_unit(x, cfg.data.band_lo, cfg.data.band_hi))
        head_b, head_a = model(unit, "B"), model(unit, "A")
    # Head B's recorded sub-head (1) by default, another on request.
    assert out["ids"].dtype == np.uint8 and out["ids"].shape == (2, 40, 56)
    assert np.array_equal(out["ids"], head_b[1].argmax(dim=1).numpy())
    assert np.array_equal(out["subhead_0"], head_b[0].argmax(dim=1).numpy())
    assert not np.array_equal(out["ids"], out["subhead_0"])  # the sub-head choice matters
    probs = out["probabilities"]
    assert probs.dtype == np.float32 and probs.shape == (2, 3, 40, 56)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert np.array_equal(out["clusters"], out["ids"])
    assert out["head_a"].max() < cfg.model.n_clusters_a
    assert np.array_equal(out["head_a"], head_a[1].argmax(dim=1).numpy())
    # A wrong band count: refused by the signature, before the network sees it.
    refused = json.loads(done.stdout.strip().splitlines()[-1])["refused"]
    assert refused.startswith("MlflowException: "), refused
    assert "Shape of input (2, 4, 40, 56) does not match expected shape (-1, 3, -1, -1)" in refused

    # iid reads the same model as data: the answer from info.json, the same weights.
    trained = load_trained(model_uri)
    assert (trained.subhead, trained.names) == (1, ("buildings", "", "roads"))
    assert trained.config == cfg and not trained.model.training
    for key, value in model.state_dict().items():
        assert torch.equal(trained.model.state_dict()[key], value)


def test_clustering_models_give_one_id_per_image(tmp_path):
    cfg = tiny_config(task="clustering")
    model = build_model(cfg.model).eval()
    trained = Trained(model, cfg, subhead=1, names=("", "", ""))
    x = np.random.default_rng(1).integers(0, 256, (3, 3, 24, 24), dtype=np.uint8)
    out = predict(trained, x, probabilities=True)
    with torch.inference_mode():
        direct = model(torch.from_numpy(to_unit(x)), "B")[1]
    assert out["clusters"].shape == (3,) and out["clusters"].dtype == np.uint8
    assert np.array_equal(out["clusters"], direct.argmax(dim=1).numpy())
    assert out["probabilities"].shape == (3, 3)


def test_load_trained_of_a_checkpoint_takes_its_last_epoch_answer(tmp_path):
    cfg = tiny_config()
    model = build_model(cfg.model)
    job = Job(cfg, CLASSES, tuple(range(256)), "", "", PairConfig())
    history = [{"epoch": 0, "best_subhead": 0}, {"epoch": 1, "best_subhead": 1}]
    counts = torch.zeros(2, 3, 3, dtype=torch.int64)
    counts[0] = torch.eye(3, dtype=torch.int64)  # sub-head 0: cluster i is class i
    counts[1] = torch.tensor([[0, 5, 1], [9, 0, 0], [0, 0, 0]])  # the last epoch's choice
    folder = tmp_path / "run" / "checkpoint_000001"
    folder.mkdir(parents=True)
    save(folder, model, torch.optim.SGD(model.parameters(), lr=0.1), history, job, counts, [])

    trained = load_trained(str(tmp_path / "run"))
    # Cluster 2 never met a label: Hungarian still gives it the class left over (trees).
    assert (trained.subhead, trained.names) == (1, ("buildings", "roads", "trees"))
    assert trained.config == cfg and not trained.model.training
    loaded, loaded_cfg = load_model(str(tmp_path / "run"))  # the thin wrapper
    assert loaded_cfg == cfg and torch.equal(
        loaded.state_dict()["heads.B.1.weight"], model.state_dict()["heads.B.1.weight"]
    )

    # Trained on data without labels: counts of zeros name nothing.
    save(folder, model, torch.optim.SGD(model.parameters(), lr=0.1), history, job, 0 * counts, [])
    assert load_trained(str(folder)).names == ("", "", "")


def test_models_registered_before_the_pyfunc_flavour_still_load(store, tmp_path):
    import mlflow

    cfg = tiny_config("old")
    model = build_model(cfg.model)
    old = tmp_path / "old"
    old.mkdir()
    torch.save(model.state_dict(), old / tracking.WEIGHTS_FILE)
    (old / tracking.CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))
    mlflow.set_experiment("pyfunc")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(old), artifact_path=tracking.MODEL_DIR)
        client = mlflow.MlflowClient()
        client.create_registered_model("old")
        client.create_model_version(
            "old", mlflow.get_artifact_uri(tracking.MODEL_DIR), run_id=run.info.run_id
        )
    for uri in ("models:/old/1", "models:/old/latest", f"runs:/{run.info.run_id}/model"):
        trained = load_trained(uri)
        # No info.json: the first sub-head, no names.
        assert (trained.subhead, trained.names) == (0, ("", "", ""))
        assert torch.equal(
            trained.model.state_dict()["trunk.0.weight"], model.state_dict()["trunk.0.weight"]
        )

    # An info.json that does not fit the model: one line naming it.
    (old / tracking.INFO_FILE).write_text(json.dumps({"subhead": 2, "names": ["a"]}))
    with mlflow.start_run() as bad:
        mlflow.log_artifacts(str(old), artifact_path=tracking.MODEL_DIR)
    with pytest.raises(
        ConfigError, match=r"info.json: expected \{\"subhead\": an integer in \[0, 2\)"
    ):
        load_trained(f"runs:/{bad.info.run_id}/model")


def test_model_files_ignore_paths_leading_out_of_the_folder(tmp_path):
    folder = tmp_path / "model"
    (folder / "artifacts").mkdir(parents=True)
    for file in (tracking.WEIGHTS_FILE, tracking.CONFIG_FILE):
        (folder / "artifacts" / file).write_text("x")
        (tmp_path / file).write_text("x")
    (folder / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n"
        "      weights: {path: ../weights.pt}\n      config: {path: artifacts/config.json}\n"
    )
    assert tracking.model_files(folder) is None  # the weights it names lie outside
    (folder / "artifacts" / tracking.INFO_FILE).write_text("{}")
    (folder / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n"
        "      weights: {path: artifacts/weights.pt}\n      config: {path: artifacts/config.json}\n"
        "      info: {path: artifacts/info.json}\n"
    )
    files = tracking.model_files(folder)
    assert files == tracking.ModelFiles(
        folder / "artifacts" / tracking.WEIGHTS_FILE,
        folder / "artifacts" / tracking.CONFIG_FILE,
        folder / "artifacts" / tracking.INFO_FILE,
    )
