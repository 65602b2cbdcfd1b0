"""Every MLflow call of the project: the tracking URI, a run's record, the per-epoch metrics of
rank 0, the final report with the registered model, and the parent and child runs of a search.

A run's record: params (the flat config) when it is created, metrics per epoch from the worker
of rank 0, then once, after training, the plots as artifacts, the final ``eval_*`` metrics and
the model, registered under the run name. MLflow is imported inside the functions, so the
modules below the driver load it only when they track something.

The model is logged as data: ``weights.pt`` (a state dict), ``config.json`` (the training
config) and ``info.json`` (the label-free choice of sub-head, the class each cluster was matched
to), loaded by ``checkpoint.load_trained`` with ``weights_only=True``. A pickled model would run
whatever the registry holds on every machine that evaluates it. The same files are the artifacts
of a pyfunc model logged "from code" (``pipeline/serving.py``, its ``predict``), so that
``mlflow.pyfunc.load_model`` serves it, and nothing of it is a cloudpickle either.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.config import Config, ConfigError

REPORT_TAG = "iid.report"  # set once the final report is logged: a resumed run skips it
MODEL_DIR = "model"  # the run's artifact folder of the model
WEIGHTS_FILE, CONFIG_FILE, INFO_FILE = "weights.pt", "config.json", "info.json"
# The pyfunc model's artifact names of those files (its MLmodel maps each to a path).
MODEL_ARTIFACTS = {"weights": WEIGHTS_FILE, "config": CONFIG_FILE, "info": INFO_FILE}
SERVING_CODE = Path(__file__).with_name("serving.py")  # the pyfunc model, logged as code
# What the serving code imports (the pipeline package travels with the model as code), pinned
# to the versions installed here.
SERVING_REQUIREMENTS = ("mlflow", "torch", "torchvision", "numpy", "scipy", "pyarrow", "PyYAML")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
BOOKKEEPING = ("epoch", "epochs_done", "start_epoch", "n_nodes")  # tags, not charts
RUN_ID_FILE = "mlflow_run_id"  # in the run folder: a resumed run logs to the same record


def resolve_uri(explicit: str = "") -> str:
    """The tracking URI: ``explicit``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file in the
    working directory (``sqlite:///<cwd>/mlflow.db``)."""
    return (
        explicit
        or os.environ.get("MLFLOW_TRACKING_URI", "")
        or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    )


def use(uri: str) -> None:
    """Make ``uri`` the store that ``models:/`` and ``runs:/`` URIs resolve against."""
    import mlflow

    mlflow.set_tracking_uri(uri)


def check_reachable(uri: str) -> None:
    """Fail before training when the tracking store cannot be reached.

    Raises:
        ConfigError: one line naming ``run.tracking_uri``.
    """
    import mlflow

    # One quick attempt: MLflow's default HTTP retries would stall for minutes before failing.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means "unreachable"
        raise ConfigError(
            f"run.tracking_uri: cannot reach MLflow at {uri} ({str(err).splitlines()[0][:200]})"
        ) from err


def _create_run(
    uri: str, experiment: str, name: str, tags: Mapping[str, str], params: Mapping[str, object]
) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    client = mlflow.MlflowClient(uri)
    # MLflow 3's UI opens an experiment of unknown kind on its GenAI traces page.
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    run = client.create_run(experiment_id, run_name=name, tags=_source_tags() | dict(tags))
    client.log_batch(
        run.info.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()]
    )
    return run.info.run_id


def _source_tags() -> dict[str, str]:
    """Where a run came from, as MLflow's fluent API would tag it: the command and, when the
    package runs from a git checkout, its commit."""
    import subprocess
    import sys

    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": " ".join(sys.argv[:2])}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return tags
    if commit.returncode == 0:
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
    return tags


def metric_key(name: str) -> str | None:
    """The MLflow name of a per-epoch metric, grouped by prefix so the UI charts them in
    sections (``train/``, ``eval/``, ``masses/``, ``time/``); None for bookkeeping values,
    which are tags rather than charts."""
    if name in BOOKKEEPING:
        return None
    if name.startswith("loss_"):
        return f"train/{name}"
    if name.startswith("mass_"):
        return f"masses/{name}"
    if name.startswith("seconds_"):
        return f"time/{name.removeprefix('seconds_')}"
    return f"eval/{name}"


def run_for(
    uri: str, cfg: Config, run_dir: str | Path, tags: Mapping[str, str] | None = None
) -> str:
    """The MLflow run of ``run_dir``: created once (params = the flat config), then reused.

    The id is kept in ``run_dir/mlflow_run_id``, so resuming a run logs to the same record.
    """
    import mlflow

    marker = storage.join(run_dir, RUN_ID_FILE)
    mlflow.set_tracking_uri(uri)
    if storage.is_file(marker):
        run_id = storage.read_text(marker).strip()
        try:
            mlflow.MlflowClient(uri).get_run(run_id)
        except mlflow.exceptions.MlflowException as err:
            raise ConfigError(
                f"run.tracking_uri: {run_dir} logs to MLflow run {run_id}, which {uri} does not "
                "hold; give the tracking URI it was trained with, or another run.name"
            ) from err
        return run_id
    run_id = _create_run(uri, cfg.run.experiment, cfg.run.name, tags or {}, cfg.flat())
    storage.write_text_atomic(marker, run_id)
    return run_id


def log_dataset(uri: str, run_id: str, shards: str, manifest: Mapping[str, object]) -> None:
    """Record the shards a run trains on as its MLflow dataset input: where they are, and a
    digest of their manifest (the manifest is what a dataset holds), so runs on the same data
    are seen to be."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # a local path "can be read two ways"; both are the path
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(storage.absolute(shards))
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode())
    name = Path(str(shards).rstrip("/")).name or "shards"
    dataset = MetaDataset(source, name=name, digest=digest.hexdigest()[:16])
    context = mlflow.entities.InputTag("mlflow.data.context", "training")
    # What mlflow.log_input does, without the fluent API: that would end the run it opened.
    entity = mlflow.entities.DatasetInput(dataset._to_mlflow_entity(), tags=[context])
    mlflow.MlflowClient(uri).log_inputs(run_id, datasets=[entity])


class EpochLogger:
    """Plain MLflow calls on world rank 0 (the reliable pattern in Ray Train V2)."""

    def __init__(self, uri: str, run_id: str):
        import mlflow

        mlflow.set_tracking_uri(uri)
        self.client, self.run_id = mlflow.MlflowClient(uri), run_id

    def log(self, metrics: Mapping[str, float], epoch: int) -> None:
        """One epoch's metrics (``metric_key`` names them); the bookkeeping values as tags."""
        from mlflow import entities

        stamp = int(time.time() * 1000)
        logged = [
            entities.Metric(key, float(value), stamp, epoch)
            for name, value in metrics.items()
            if (key := metric_key(name)) is not None
        ]
        tags = [
            entities.RunTag(f"iid.{name}", str(metrics[name]))
            for name in BOOKKEEPING
            if name in metrics and name != "epoch"
        ]
        self.client.log_batch(self.run_id, metrics=logged, tags=tags)

    def log_figure(self, figure, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact of the run (``overlays/epoch_003.png``)."""
        self.client.log_figure(self.run_id, figure, artifact_file)


def set_status(uri: str, run_id: str, status: str, note: str = "") -> None:
    """Set the run's MLflow status (``RUNNING`` while training, then ``FINISHED``, ``FAILED``
    or ``KILLED``); ``note`` (what ended or resumed it; the status itself if empty) goes to
    the tag ``iid.status_note``."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    client.set_tag(run_id, "iid.status_note", note or status.lower())
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


def mark_killed_driver(uri: str, run_id: str, lock_line: str) -> None:
    """Record on the run that a driver of it was killed (the lock line it left: host, pid,
    start time); kept whatever status the resumed run ends with."""
    import mlflow

    mlflow.MlflowClient(uri).set_tag(run_id, "iid.killed_driver", lock_line)


def mark_finished(uri: str, run_id: str) -> None:
    """Tag the run ``status: finished`` (its training reached the last epoch)."""
    import mlflow

    mlflow.MlflowClient(uri).set_tag(run_id, "status", "finished")


def browse(uri: str, run_id: str) -> str:
    """How to see ``run_id`` in MLflow's UI: the run's page on a tracking server, or the
    command that serves a local store and the page to open. Linking the run's page matters:
    MLflow 3's UI opens an experiment on its GenAI pages in a fresh browser, whatever the
    experiment's kind (mlflow/mlflow#24498).
    """
    import mlflow

    experiment = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    page = f"#/experiments/{experiment}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/{page}"


def report_logged(uri: str, run_id: str) -> bool:
    """Whether ``log_report`` has completed for the run."""
    import mlflow

    return mlflow.MlflowClient(uri).get_run(run_id).data.tags.get(REPORT_TAG) == "done"


def log_report(
    uri: str,
    run_id: str,
    cfg: Config,
    model: torch.nn.Module,
    metrics: Mapping[str, float],
    plots: Iterable[Path],
    *,
    info: Mapping[str, object],
) -> str:
    """Log the plots, the final metrics and the model to an existing run, register the model
    under the run name, then tag the report done.

    The model is a pyfunc model logged from code (``pipeline/serving.py``) whose artifacts are
    ``weights.pt``, ``config.json`` and ``info.json``: no Python object of it is pickled.

    Args:
        uri: the tracking URI.
        run_id: the run to log to.
        cfg: the training config (``config.json``; the signature's band count and pixel type).
        model: the trained network (its state dict becomes ``weights.pt``).
        metrics: the final ``eval_*`` metrics.
        plots: image files logged under ``plots/``.
        info: ``{"subhead": head B's chosen sub-head, "names": the class matched to each
            cluster of head B, "" where none}``, written as ``info.json``.

    Returns:
        The registered model's URI (``models:/NAME/VERSION``).
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        for p in plots:
            mlflow.log_artifact(str(p), artifact_path="plots")
        mlflow.log_metrics(dict(metrics))
        files = _write_model_files(Path(tmp), cfg, model, info)
        model_id = _log_pyfunc(cfg, files)
        if not client.search_registered_models(filter_string=f"name = '{cfg.run.name}'"):
            client.create_registered_model(cfg.run.name)
        # Registered here rather than by log_model(registered_model_name=...), which prints
        # two lines of its own; the source is the logged model, as log_model would give it.
        version = client.create_model_version(
            cfg.run.name, f"models:/{model_id}", run_id=run_id, model_id=model_id
        )
        mlflow.set_tag(REPORT_TAG, "done")
    return f"models:/{cfg.run.name}/{version.version}"


# Defaults of ``predict``'s params; the signature's ParamSchema carries the same ones.
DEFAULT_PARAMS: dict[str, Any] = {"head": "B", "subhead": -1, "probabilities": False}


def pixel_type(cfg: Config) -> np.dtype:
    """The pixel type ``predict`` takes: the training imagery's, float32 when not recorded."""
    return np.dtype(cfg.data.dtype or "float32")


def id_type(n_clusters: int) -> np.dtype:
    """The smallest unsigned integer type that holds ``n_clusters`` cluster ids."""
    return np.dtype(np.uint8 if n_clusters <= 256 else np.uint16)


def signature(cfg: Config):
    """The pyfunc ``predict``'s contract (an MLflow ``ModelSignature``): images (N,
    in_channels, H, W) of the training pixel type in, head B's cluster ids out ((N, H, W), or
    (N,) for clustering), and the params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    ids = (-1, -1, -1) if cfg.model.task == "segmentation" else (-1,)
    return ModelSignature(
        inputs=Schema([TensorSpec(pixel_type(cfg), (-1, cfg.model.in_channels, -1, -1))]),
        outputs=Schema([TensorSpec(id_type(cfg.model.n_clusters_b), ids)]),
        params=ParamSchema(
            [
                ParamSpec("head", "string", DEFAULT_PARAMS["head"]),
                ParamSpec("subhead", "long", DEFAULT_PARAMS["subhead"]),
                ParamSpec("probabilities", "boolean", DEFAULT_PARAMS["probabilities"]),
            ]
        ),
    )


def _write_model_files(
    folder: Path, cfg: Config, model: torch.nn.Module, info: Mapping[str, object]
) -> dict[str, str]:
    """Write weights, config and info into ``folder``; returns artifact name -> path."""
    torch.save(model.cpu().state_dict(), folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))
    (folder / INFO_FILE).write_text(json.dumps(dict(info)))
    return {name: str(folder / file) for name, file in MODEL_ARTIFACTS.items()}


def _log_pyfunc(cfg: Config, artifacts: Mapping[str, str]) -> str:
    """Log the serving code with ``artifacts`` as the active run's pyfunc model ``model``;
    returns its logged model id (``m-...``)."""
    import mlflow.pyfunc

    # The signature is given, the requirements pinned and no input example kept, so MLflow
    # neither infers requirements (a subprocess loading the model) nor warns about either.
    # Its uv detection would copy the working directory's uv.lock into the model: the
    # requirements below are the model's environment, whatever project training ran in. The
    # artifacts are copied from local files: no progress bars for that.
    quiet = {
        "MLFLOW_UV_AUTO_DETECT": "false",
        "MLFLOW_LOG_UV_FILES": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    with _environment(quiet), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*input example", category=UserWarning)
        logged = mlflow.pyfunc.log_model(
            name=MODEL_DIR,
            python_model=str(SERVING_CODE),
            artifacts=dict(artifacts),
            code_paths=[str(SERVING_CODE.parent)],
            signature=signature(cfg),
            pip_requirements=pinned_requirements(),
        )
    return logged.model_id


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def pinned_requirements() -> list[str]:
    """``name==version`` of each package the serving code needs, as installed here.

    A local version label (``torch 2.14.1+cu130``) is dropped: ``==2.14.1`` is what an index
    offers, and the local build here still satisfies it.
    """
    return [
        f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in SERVING_REQUIREMENTS
    ]


def download_model(uri: str) -> Path:
    """The folder of a model logged by ``log_report`` (``models:/name/3``, ``models:/name/latest``,
    ``runs:/<id>/model``), downloaded; nothing in it is loaded here.

    Raises:
        ConfigError: the URI names nothing in the store.
    """
    import mlflow.artifacts

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for a bad URI
        raise ConfigError(f"--model: cannot load {uri} ({str(err).splitlines()[0][:200]})") from err


@dataclass(frozen=True)
class ModelFiles:
    """The files of a logged model in a local folder.

    Attributes:
        weights: ``weights.pt``, the state dict.
        config: ``config.json``, the training config.
        info: ``info.json`` (chosen sub-head, matched class names); None for models logged
            before it was written.
    """

    weights: Path
    config: Path
    info: Path | None


def model_files(folder: Path) -> ModelFiles | None:
    """Find the weights, config and info of a downloaded model, whatever its layout: the
    paths a pyfunc model's ``MLmodel`` gives its artifacts (this pipeline's models since
    the pyfunc flavour), else the files at the top of the folder (models registered before).
    Only file names and the YAML of ``MLmodel`` are read; nothing is loaded.

    Args:
        folder: the local model folder (``download_model``'s).

    Returns:
        The files, or None when the folder holds no weights and config (a model logged by
        something else, such as a pickled one).
    """
    import yaml

    found = {name: folder / file for name, file in MODEL_ARTIFACTS.items()}
    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        try:
            spec = yaml.safe_load(mlmodel.read_text())
            artifacts = spec["flavors"]["python_function"]["artifacts"]
        except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError):
            artifacts = {}  # not a pyfunc model with artifacts: only the flat layout applies
        root = folder.resolve()
        for name in MODEL_ARTIFACTS:
            entry = artifacts.get(name) if isinstance(artifacts, dict) else None
            path = entry.get("path") if isinstance(entry, dict) else None
            # The MLmodel is the registry's word: a path leading out of the folder is ignored.
            if isinstance(path, str) and (root / path).resolve().is_relative_to(root):
                found[name] = root / path
    if not (found["weights"].is_file() and found["config"].is_file()):
        return None
    info = found["info"] if found["info"].is_file() else None
    return ModelFiles(weights=found["weights"], config=found["config"], info=info)


# ------------------------------------------------------------------------------ searches
def create_search_run(uri: str, experiment: str, name: str, params: Mapping[str, object]) -> str:
    """A search's parent run (tag ``iid.kind: search``); returns its id."""
    return _create_run(uri, experiment, name, {"iid.kind": "search"}, params)


def trial_runs(uri: str, parent_run_id: str) -> dict[str, str]:
    """trial id -> MLflow run id of a search's child runs."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=10_000,
    )
    return {
        r.data.tags["iid.trial_id"]: r.info.run_id for r in runs if "iid.trial_id" in r.data.tags
    }


def close_trial_run(uri: str, run_id: str, epochs: int, status: str) -> None:
    """Tag a trial's child run with what the search counted of it, and end it."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    # The trial's rank 0 logs every epoch it trains. A trial that ASHA stops may finish (and
    # log) one more epoch while the stop is on its way, which the search does not count: the
    # tag says which epochs the search ranked the trial on.
    client.set_tag(run_id, "iid.epochs_counted", str(epochs))
    client.set_tag(run_id, "iid.stopped_early", str(status == "stopped early").lower())
    client.set_tag(run_id, "iid.status", status)
    client.set_terminated(run_id, "FAILED" if status.startswith("error") else "FINISHED")


def finish_search_run(
    uri: str,
    run_id: str,
    texts: Mapping[str, str],
    plots: Iterable[Path],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
) -> None:
    """Log a search's outcome to its parent run (text artifacts by name, plots, summary
    metrics, tags) and end the run."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    for name, text in texts.items():
        client.log_text(run_id, text, name)
    for p in plots:
        client.log_artifact(run_id, str(p), artifact_path="plots")
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    for k, v in metrics.items():
        client.log_metric(run_id, k, float(v))
    client.set_terminated(run_id, "FINISHED")
