"""Every MLflow call of the project: the tracking URI, a run's record, the per-epoch metrics of
rank 0, the final report with the registered model, and the parent and child runs of a search.

A run's record: params (the flat config) when it is created, metrics per epoch from the worker
of rank 0, then once, after training, the plots as artifacts, the final ``eval_*`` metrics and
the model, registered under the run name. MLflow is imported inside the functions, so the
modules below the driver load it only when they track something.

The model is logged as data, not code: ``model/weights.pt`` (a state dict) and
``model/config.json`` (the training config), loaded by ``checkpoint.load_model`` with
``weights_only=True``. A pickled model would run whatever the registry holds on every machine
that evaluates it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from pipeline import storage
from pipeline.config import Config, ConfigError

REPORT_TAG = "iid.report"  # set once the final report is logged: a resumed run skips it
MODEL_DIR = "model"  # the run's artifact folder of the model
WEIGHTS_FILE, CONFIG_FILE = "weights.pt", "config.json"
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
    run = client.create_run(experiment_id, run_name=name, tags=dict(tags))
    client.log_batch(
        run.info.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()]
    )
    return run.info.run_id


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


class EpochLogger:
    """Plain MLflow calls on world rank 0 (the reliable pattern in Ray Train V2)."""

    def __init__(self, uri: str, run_id: str):
        import mlflow

        mlflow.set_tracking_uri(uri)
        self.client, self.run_id = mlflow.MlflowClient(uri), run_id

    def log(self, metrics: Mapping[str, float], epoch: int) -> None:
        for key, value in metrics.items():
            if key != "epoch":
                self.client.log_metric(self.run_id, key, float(value), step=epoch)

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
) -> str:
    """Log the plots, the final metrics and the model (weights and config), registered under
    the run name, to an existing run, then tag the report done. Returns the registered model's
    URI (``models:/NAME/VERSION``)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        for p in plots:
            mlflow.log_artifact(str(p), artifact_path="plots")
        mlflow.log_metrics(dict(metrics))
        torch.save(model.cpu().state_dict(), Path(tmp) / WEIGHTS_FILE)
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))
        mlflow.log_artifacts(tmp, artifact_path=MODEL_DIR)
        if not client.search_registered_models(filter_string=f"name = '{cfg.run.name}'"):
            client.create_registered_model(cfg.run.name)
        version = client.create_model_version(
            cfg.run.name, mlflow.get_artifact_uri(MODEL_DIR), run_id=run_id
        )
        mlflow.set_tag(REPORT_TAG, "done")
    return f"models:/{cfg.run.name}/{version.version}"


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
