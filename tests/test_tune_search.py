"""Searches: a real Ray Tune search over real Ray Train trials, logged to a real MLflow SQLite
store; interrupted by killing the driver after its first trial and resumed with ``--resume``.

One search serves the end-to-end tests (a trial costs ~40 s of process start-up on 2 cores, so
two run at a time): it is killed once its first trial has finished (the second may have
finished too, or be part way), resumed, and then read back. Checks that need no Ray (options,
bad input, summary helpers) run without starting anything.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, load_config
from pipeline.data.format import PrepareError
from pipeline.tune.search import (
    SearchOptions,
    SearchRecord,
    TrialRow,
    rank_correlation,
    rank_trials,
    resume_search,
    run_search,
    write_best_config,
)
from tests.conftest import small_synthetic

IID = shutil.which("iid", path=str(Path(sys.executable).parent))
EPOCHS = 2
SPACE = {
    "params": {
        "loss.lamb_b": {"uniform": [1.0, 2.0]},
        "loss.half_window": {"choice": [2, 3]},
    }
}


def base_config(shards: Path) -> dict:
    return {
        "data": {"shards": str(shards), "batch_size": 8, "merge": "potsdam3", "pairs_on": "worker"},
        "model": {
            "in_channels": 3,
            "n_clusters_a": 5,
            "n_clusters_b": 3,
            "n_subheads": 2,
            "width": 0.125,
        },
        "loss": {"lamb_a": 1.0, "lamb_b": 1.5, "half_window": 3},
        "optim": {"lr": 0.002, "epochs": EPOCHS},
        "pairs": {"crop": 24},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "run": {"name": "base", "storage_path": "runs", "experiment": "search-test"},
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return small_synthetic(tmp_path_factory.mktemp("tune-data"), seed=1)


# ------------------------------------------------------------------ without starting Ray
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "loss"}, "--metric: 'loss' is not one of mi, agreement, acc"),
        ({"algorithm": "hyperopt"}, "--search: 'hyperopt' is not one of optuna, random"),
        ({"num_samples": 0}, "--num-samples: expected an integer >= 1, got 0"),
        ({"reduction_factor": 1}, "--reduction-factor: expected an integer >= 2"),
        ({"name": "a/b"}, "--name: 'a/b' is not a folder name"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SearchOptions(**kwargs)


def test_bad_searches_fail_before_anything_starts(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = base_config(shards)
    grid = {"params": {"loss.lamb_b": {"grid": [1.0, 2.0]}}}
    with pytest.raises(ConfigError, match="grid dimensions need --search random"):
        run_search(base, grid, SearchOptions(name="g"), "grid.yaml")
    bad = {"params": {"loss.lamb_b": {"uniform": [0.0, 2.0]}}}
    with pytest.raises(ConfigError, match="bad.yaml: .*lamb_b"):
        run_search(base, bad, SearchOptions(name="b"), "bad.yaml")
    # Every extreme is checked against the shards too: T = 30 cannot fit the 24-pixel crops.
    wide = {"params": {"loss.half_window": {"randint": [2, 30]}}}
    with pytest.raises(ConfigError, match="wide.yaml: loss.half_window: 30 does not fit 24-pixel"):
        run_search(base, wide, SearchOptions(name="w"), "wide.yaml")
    # Agreement needs 2+ sub-heads in every trial: the base has 2, the space may go to 1.
    heads = {"params": {"model.n_subheads": {"choice": [1, 2]}}}
    with pytest.raises(ConfigError, match="--metric agreement: needs model.n_subheads >= 2 .* 1"):
        run_search(base, heads, SearchOptions(name="a", metric="agreement"), "heads.yaml")
    missing = base | {"data": base["data"] | {"shards": str(tmp_path / "nowhere")}}
    with pytest.raises(PrepareError, match="nowhere"):
        run_search(missing, SPACE, SearchOptions(name="m"))
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "search.json").write_text("{}")
    with pytest.raises(ConfigError, match="a search 'taken' exists .* `iid tune --resume"):
        run_search(base, SPACE, SearchOptions(name="taken"))
    with pytest.raises(ConfigError, match="no search.json"):
        resume_search(tmp_path / "runs" / "elsewhere")
    assert not list((tmp_path / "runs").glob("*/trials"))


def test_trials_are_ranked_at_equal_budgets():
    """A trial ASHA stopped at epoch 1 with a higher criterion (a near-collapsed clustering's
    sub-heads agree well) does not outrank the trials that trained on."""
    rows = [
        TrialRow("early", {}, 1, "stopped early", {"mi": 0.9, "agreement": 0.74}),
        TrialRow("done-low", {}, EPOCHS, "done", {"mi": 0.5, "agreement": 0.70}),
        TrialRow("done-high", {}, EPOCHS, "done", {"mi": 0.6, "agreement": 0.72}),
        TrialRow("failed", {}, EPOCHS, "error: x", {}),
    ]
    for metric in ("mi", "agreement"):
        ranked = [r.trial_id for r in rank_trials(rows, metric)]
        assert ranked == ["done-high", "done-low", "early", "failed"]


def test_rank_correlation_and_best_config_round_trip(shards, tmp_path):
    rows = [
        TrialRow(str(i), {"loss.lamb_b": 1.0 + i / 10}, EPOCHS, "done", {"mi": mi, "acc": acc})
        for i, (mi, acc) in enumerate([(0.1, 0.5), (0.3, 0.6), (0.2, 0.7), (0.4, 0.8)])
    ]
    assert rank_correlation(rows, "mi", "acc") == pytest.approx(0.8)
    assert math.isnan(rank_correlation(rows[:2], "mi", "acc"))  # too few trials to rank
    record = SearchRecord(
        options=SearchOptions(name="s", metric="mi"),
        base=base_config(shards),
        resolved={},
        space={"params": {"loss.lamb_b": {"uniform": [1.0, 2.0]}}},
        tracking_uri="",
        folder=str(tmp_path),
        parent_run_id="",
    )
    path = write_best_config(record, rows[3], tmp_path / "best.yaml")
    cfg = load_config(path)  # what `iid train --config` reads
    assert cfg.loss.lamb_b == pytest.approx(1.3)
    assert cfg.run.name == "s-best" and cfg.data.shards == str(shards)


# ------------------------------------------------------------- a real, interrupted search
def _wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


def _finished(log: Path) -> list[str]:
    """Trial ids the driver's progress lines report finished."""
    lines = log.read_text().splitlines() if log.is_file() else []
    found = (re.match(r"trial (\S+) finished", ln) for ln in lines)
    return [m.group(1) for m in found if m]


@pytest.fixture(scope="module")
def search(shards, tmp_path_factory) -> dict:
    """``iid tune`` of 3 trials (as the space file says), 2 at a time, SIGKILLed (driver and
    its local Ray cluster) once the first trial has finished, then ``iid tune --resume``."""
    tmp = tmp_path_factory.mktemp("search")
    (tmp / "base.yaml").write_text(yaml.safe_dump(base_config(shards)))
    # The trial count comes from the space file's search section, the concurrency from a flag.
    (tmp / "space.yaml").write_text(yaml.safe_dump(SPACE | {"search": {"num_samples": 3}}))
    # Earlier tests' mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI: not for this search.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"RAY_ADDRESS": ""}
    cmd = [IID, "tune", "--config", "base.yaml", "--space", "space.yaml", "--name", "s"]
    cmd += ["--max-concurrent", "2"]
    trials = tmp / "runs" / "s" / "trials"
    log = (tmp / "first.log").open("w")
    first = subprocess.Popen(
        cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        _wait(lambda: _finished(tmp / "first.log"), 400, "the first trial to finish")
        finished = {f"s-{trial}" for trial in _finished(tmp / "first.log")}
        # Give Tune time to save its state with the trial finished (every 2 s).
        time.sleep(4)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = {
        name: sorted(p.name for p in (trials / name).glob("checkpoint_*")) for name in finished
    }
    resumed = subprocess.run(
        [IID, "tune", "--resume", str(tmp / "runs" / "s")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {
        "tmp": tmp,
        "folder": tmp / "runs" / "s",
        "finished_before_kill": finished,
        "checkpoints_before": before,
        "stdout": resumed.stdout,
        "output": resumed.stdout + resumed.stderr,
        "first_log": (tmp / "first.log").read_text(),
        "uri": f"sqlite:///{tmp / 'mlflow.db'}",
    }


def test_a_search_prints_only_its_own_lines(search):
    """By default: the search's start, a line per trial epoch and per ended trial, the summary.
    Not Tune's experiment box and TensorBoard hint, Optuna's "A new study created", or the
    raylet's notice that it started more worker processes than the machine has cores."""
    from pipeline.train import WORKER_COUNT_NOTICE
    from tests.test_cli import NOISE

    first = search["first_log"].splitlines()
    assert first[0].startswith("search s: 3 trial(s), 2 at a time, ranked by mi; starting a l")
    assert first[1:] and all(ln.startswith("trial ") for ln in first[1:]), first
    resumed = search["output"].splitlines()
    assert resumed[0] == "search s: resuming it; starting a local Ray cluster", resumed
    theirs = NOISE + ("Configuration for", "TensorBoard", "new study", WORKER_COUNT_NOTICE)
    assert not [ln for ln in first + resumed if any(n in ln for n in theirs)], first + resumed


def test_resumed_search_ends_with_all_trials_and_does_not_rerun_finished_ones(search):
    # The first search's lines counted its ended trials as they ended.
    assert "(1 of 3 trials ended)" in search["first_log"], search["first_log"][-3000:]
    rows = list(csv_rows(search["folder"] / "trials.csv"))
    assert len(rows) == 3
    assert all(r["status"] in ("done", "stopped early") for r in rows), rows
    client = mlflow.MlflowClient(search["uri"])
    for name in search["finished_before_kill"]:
        run_dir = search["folder"] / "trials" / name
        # The same checkpoints as before the kill: the trial was not trained again ...
        after = sorted(p.name for p in run_dir.glob("checkpoint_*"))
        assert after == search["checkpoints_before"][name]
        # ... and its MLflow record holds each epoch it trained once. ASHA may have stopped the
        # first trial to end after its first rung (which one depends on timing), and rank 0 logs
        # an epoch before its report: a trial stopped while reporting may show one more epoch
        # in MLflow than Tune recorded.
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        epochs = int(next(r["epochs"] for r in rows if r["mlflow_run"] == run_id))
        steps = sorted(m.step for m in client.get_metric_history(run_id, "eval/mi"))
        assert steps == list(range(len(steps))) and len(steps) - epochs in (0, 1), (steps, epochs)


def csv_rows(path: Path):
    import csv

    with path.open() as f:
        yield from csv.DictReader(f)


def test_search_is_one_parent_and_a_child_run_per_trial(search):
    client = mlflow.MlflowClient(search["uri"])
    experiment = client.get_experiment_by_name("search-test")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("iid.kind") == "search"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials"] == 3
    assert parent.data.params["space.loss.lamb_b"] == "uniform[1.0, 2.0]"
    assert parent.data.params["loss.lamb_a"] == "1.0"  # unsearched base values
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_config.yaml", "summary.txt", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/mi_vs_loss.lamb_b.png" in plots and "plots/acc_vs_loss.half_window.png" in plots

    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3
    table = {r["trial"]: r for r in csv_rows(search["folder"] / "trials.csv")}
    for child in children:
        row = table[child.data.tags["iid.trial_id"]]
        assert float(child.data.params["loss.lamb_b"]) == pytest.approx(float(row["loss.lamb_b"]))
        assert child.data.tags["iid.stopped_early"] == str(row["status"] == "stopped early").lower()
        epochs = int(row["epochs"])
        assert child.data.tags["iid.epochs_counted"] == row["epochs"]
        history = client.get_metric_history(child.info.run_id, "eval/mi")
        assert sorted(m.step for m in history) == list(range(len(history)))
        # A trial stopped by ASHA may train one more epoch while the stop is on its way; its
        # rank 0 logs it, the search does not count it. Finished trials match exactly.
        stopped = row["status"] == "stopped early"
        assert len(history) in ((epochs, epochs + 1) if stopped else (epochs,)) and epochs >= 1
        acc = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "eval/acc")}
        assert acc[epochs - 1] == pytest.approx(float(row["acc"]))
    best = max(table.values(), key=lambda r: (int(r["epochs"]), float(r["mi"])))
    assert parent.data.tags["iid.best_trial"] == best["trial"]
    assert (
        "chosen by mi among the trials that trained longest: trial " + best["trial"]
        in (search["stdout"])
    )
    assert "rank correlation of mi and acc" in search["stdout"]


def test_exported_best_config_trains_unchanged(search, monkeypatch, capsys):
    best = search["folder"] / "best_config.yaml"
    cfg = load_config(best)
    table = {r["trial"]: r for r in csv_rows(search["folder"] / "trials.csv")}
    chosen = max(table.values(), key=lambda r: (int(r["epochs"]), float(r["mi"])))
    assert cfg.loss.lamb_b == pytest.approx(float(chosen["loss.lamb_b"]))
    assert cfg.loss.half_window == int(chosen["loss.half_window"])
    # `iid train --config best_config.yaml`, in this process (its Ray cluster is already up).
    monkeypatch.chdir(search["tmp"])  # the base config's relative paths, as the user runs it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli_main(["train", "--config", str(best)]) == 0
    out = capsys.readouterr().out
    assert f"run s-best: epoch {EPOCHS} of {EPOCHS}" in out
    report = json.loads((search["tmp"] / "runs" / "s-best" / "report.json").read_text())
    assert report["tracking_uri"] == search["uri"]


@pytest.mark.slow
def test_a_search_killed_before_tune_saved_a_state_resumes_from_search_json(
    shards, tmp_path, monkeypatch, ray_cluster
):
    """Killed between writing search.json and Tune's first state: neither a rerun (the name
    exists) nor Tune's restore could go on; --resume starts it from search.json."""
    from pipeline.tune import search

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    base = base_config(shards)
    base["optim"]["epochs"] = 1
    opts = SearchOptions(name="early", num_samples=1, grace_period=1)

    def killed() -> None:
        raise KeyboardInterrupt

    real = search.start_ray
    monkeypatch.setattr(search, "start_ray", killed)
    with pytest.raises(KeyboardInterrupt):
        run_search(base, SPACE, opts)
    folder = tmp_path / "runs" / "early"
    assert (folder / "search.json").is_file()
    monkeypatch.setattr(search, "start_ray", real)

    outcome = resume_search(folder)
    assert [r.status for r in outcome.rows] == ["done"] and outcome.rows[0].epochs == 1
    client = mlflow.MlflowClient(outcome.tracking_uri)
    assert client.get_run(outcome.parent_run_id).info.status == "FINISHED"
