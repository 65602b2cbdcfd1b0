"""Training: bad runs fail before any work; a real 2-worker Ray Train run on CPU logs to a real
MLflow SQLite store, checkpoints every epoch, and resumes instead of retraining."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

import pipeline.train as train_module
from pipeline.checkpoint import CHECKPOINT_FILE, load_model
from pipeline.checkpoint import load as load_checkpoint
from pipeline.config import Config, ConfigError
from pipeline.data.format import PrepareError, training_inputs
from pipeline.data.read import iter_tiles, shard_batches
from pipeline.data.read import rows as dataset_rows
from pipeline.evaluate import evaluate_uri
from pipeline.losses import iid_segmentation_loss
from pipeline.models import build_model
from pipeline.train import (
    ALREADY_FINISHED,
    EpochLines,
    NonFiniteLossError,
    _worker_error,
    check_resumable,
    fit,
    train_epoch_head,
)
from tests.conftest import small_synthetic, split_files

IID = shutil.which("iid", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return small_synthetic(tmp_path_factory.mktemp("train"), seed=1)


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


def test_jittering_a_band_the_shards_lack_fails_before_training(shards, tmp_path):
    d = config(shards, tmp_path).to_dict()
    d["pairs"]["rgb_bands"] = [1, 3]
    with pytest.raises(ConfigError, match=r"pairs.rgb_bands: \[1, 3\] names band 3, but the"):
        fit(Config.from_dict(d))
    assert not (tmp_path / "runs").exists()


def test_half_window_larger_than_tiles(shards, tmp_path):
    d = config(shards, tmp_path).to_dict()
    d["loss"]["half_window"] = 30
    with pytest.raises(ConfigError, match="loss.half_window: 30 does not fit 24-pixel tiles"):
        fit(Config.from_dict(d))


def test_crop_larger_than_tiles(shards, tmp_path):
    d = config(shards, tmp_path).to_dict()
    d["pairs"]["crop"] = 64
    with pytest.raises(ConfigError, match="pairs.crop: 64 is larger than the 32-pixel tiles"):
        fit(Config.from_dict(d))
    assert not (tmp_path / "runs").exists()


def test_missing_shards(tmp_path):
    with pytest.raises(PrepareError, match="no manifest"):
        fit(config(tmp_path / "nowhere", tmp_path))


def test_unreachable_tracking_server_fails_first(shards, tmp_path):
    cfg = config(shards, tmp_path, tracking_uri="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"cannot reach MLflow at http://127.0.0.1:9"):
        fit(cfg)
    assert not (tmp_path / "runs").exists()


def _train_worker_pids() -> list[int]:
    # Ray titles its worker processes "ray::<actor class>..."; the state API would need the
    # dashboard, which the test cluster does not start.
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ray::RayTrainWorker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _kill_one_worker_after_first_checkpoint(run_dir: Path, timeout: float = 300) -> int:
    # Wait until the controller has registered a checkpoint (its snapshot lists it): a
    # checkpoint folder that exists but was not yet registered is not restored after a failure.
    deadline = time.monotonic() + timeout
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while True:
        assert time.monotonic() < deadline, "no checkpoint was registered"
        try:
            if json.loads(snapshot.read_text())["checkpoint_results"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    pids = _train_worker_pids()
    assert pids, "no live training worker to kill"
    os.kill(pids[-1], signal.SIGKILL)
    return pids[-1]


def _must_not_start_ray(*args, **kwargs):
    raise AssertionError("a finished run was started again")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_two_workers_survive_a_killed_worker_log_evaluate_and_resume(shards, tmp_path, ray_cluster):
    """One 2-worker run serves the training acceptance (a run costs a minute of process start-up
    on 2 cores): a worker SIGKILLed after the first checkpoint, Ray restarts the group from it;
    then the MLflow record, the report, `iid evaluate`, and a resume of the finished run."""
    d = config(shards, tmp_path, max_failures=2).to_dict()
    d["optim"]["epochs"] = 3
    cfg = Config.from_dict(d)
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = fit(cfg)
        except BaseException as err:  # noqa: BLE001 - re-raised on the test thread
            outcome["error"] = err

    thread = threading.Thread(target=train)
    thread.start()
    _kill_one_worker_after_first_checkpoint(tmp_path / "runs" / "t")
    # A second driver of the same run name while the first trains: refused, naming the holder.
    with pytest.raises(ConfigError, match=rf"run.name: 't' is being trained by pid {os.getpid()}"):
        fit(cfg)
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.metrics["epoch"] == 2
    assert 0 <= result.metrics["acc"] <= 1 and "mass_0" in result.metrics
    # Plain data only: loads without unpickling any object.
    state = torch.load(Path(result.checkpoint.path) / CHECKPOINT_FILE, weights_only=True)
    assert {"model", "optimizer", "torch_rng", "config"} <= set(state)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # Every epoch exactly once, and the epochs after the kill came from a resumed attempt.
    history = state["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[0]["start_epoch"] == 0 and history[-1]["start_epoch"] >= 1
    # The label-free answer of every epoch: the sub-head with the highest MI on held-out pairs.
    for h in history:
        mis = [h[f"mi_sub{i}"] for i in range(cfg.model.n_subheads)]
        assert h["best_subhead"] == mis.index(max(mis)) and h["mi"] == max(mis)

    client = mlflow.MlflowClient(cfg.run.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1  # the restarted attempt logged to the same run
    run = runs[0]
    assert run.data.params["loss.lamb_b"] == "1.5" and run.data.tags["status"] == "finished"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/acc")]
    assert sorted(set(steps)) == [0, 1, 2]
    # A record that reads well: charts grouped by prefix, bookkeeping as tags, the experiment
    # opening on its runs (not MLflow 3's GenAI page), where the run came from.
    logged = client.get_run(run.info.run_id).data
    assert {"train/loss_a", "train/loss_b", "eval/mi", "eval/miou", "masses/mass_0"} <= set(
        logged.metrics
    )
    assert "time/head_a" in logged.metrics and "epochs_done" not in logged.metrics
    assert logged.tags["iid.epochs_done"] == "3" and "mlflow.source.name" in logged.tags
    (trained_on,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert trained_on.dataset.source_type == "local" and str(shards) in trained_on.dataset.source
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # The final report: plots as artifacts, eval metrics, a registered pickled model.
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {f"plots/{n}" for n in ("overlays.png", "joint.png", "masses.png")} <= artifacts
    assert "plots/confusion.png" in artifacts and "plots/confusion.json" in artifacts
    assert 0 <= client.get_run(run.info.run_id).data.metrics["eval_acc"] <= 1
    assert [int(v.version) for v in client.search_model_versions("name='t'")] == [1]

    # `iid evaluate` on the checkpoint and on the registered model: the same counts.
    mlflow.set_tracking_uri(cfg.run.tracking_uri)
    from_ckpt, classes, _ = evaluate_uri(str(tmp_path / "runs" / "t"), shards)
    from_registry, _, _ = evaluate_uri("models:/t/1", shards)
    assert classes == ["roads_and_cars", "buildings_and_clutter", "vegetation"]
    assert (from_ckpt.counts == from_registry.counts).all() and from_ckpt.counts.sum() > 0
    # One scoring loop: the last epoch's counts, summed over the 2 workers' shares of the
    # evaluation split, are what `iid evaluate` counts on the same checkpoint and split.
    assert np.array_equal(state["counts"].numpy(), from_ckpt.counts)
    assert from_ckpt.summary()["eval_acc"] == pytest.approx(
        client.get_run(run.info.run_id).data.metrics["eval_acc"]
    )

    assert run.info.status == "FINISHED" and not (tmp_path / "runs" / "t" / ".lock").exists()

    # Same run name again, after a driver was killed holding the lock (a dead pid): the lock is
    # taken over and the finished run is not trained again, nor re-logged; Ray is not started.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "runs" / "t" / ".lock").write_text(f"{os.uname().nodename} {dead.pid} x 2026\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "start_ray", _must_not_start_ray)
        again = fit(cfg)
    assert again.return_value == ALREADY_FINISHED
    assert again.metrics == result.metrics
    assert again.checkpoint.path == result.checkpoint.path
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/acc")] == steps
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert len(client.search_model_versions("name='t'")) == 1
    rerun = client.get_run(run.info.run_id)
    assert rerun.info.status == "FINISHED"
    assert rerun.data.tags["iid.killed_driver"] == f"{os.uname().nodename} {dead.pid} x 2026"
    assert rerun.data.tags["iid.status_note"] == "finished"

    # Rerun with a model of another shape, or against a store that does not hold the run: one
    # line each, before Ray is asked for anything.
    other = Config.from_dict(d | {"model": d["model"] | {"n_clusters_b": 5}})
    with pytest.raises(
        ConfigError, match=r"run 't' .* another config \(model.n_clusters_b: 3 -> 5\)"
    ):
        fit(other)
    # Any other change too (it would train on with the old optimiser state), every key named.
    changed = Config.from_dict(
        d | {"optim": d["optim"] | {"lr": 0.01}, "loss": d["loss"] | {"lamb_b": 2.0}}
    )
    with pytest.raises(
        ConfigError, match=r"\(loss.lamb_b: 1.5 -> 2.0, optim.lr: 0.002 -> 0.01\); start a new"
    ):
        fit(changed)
    # Where it runs may change; what it trains may not, but --extend lets the epochs grow.
    # (fitted to the shards, as fit() checks them)
    moved = training_inputs(Config.from_dict(d | {"scaling": d["scaling"] | {"num_workers": 1}}))
    check_resumable(moved.config, str(tmp_path / "runs" / "t"))
    longer = training_inputs(Config.from_dict(d | {"optim": d["optim"] | {"epochs": 5}})).config
    with pytest.raises(ConfigError, match=r"optim.epochs: 3 -> 5\).*with --extend"):
        check_resumable(longer, str(tmp_path / "runs" / "t"))
    check_resumable(longer, str(tmp_path / "runs" / "t"), extend=True)
    elsewhere = Config.from_dict(
        d | {"run": d["run"] | {"tracking_uri": f"sqlite:///{tmp_path / 'other.db'}"}}
    )
    with pytest.raises(ConfigError, match=r"run.tracking_uri: .* logs to MLflow run \w+, which"):
        fit(elsewhere)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_training_and_iid_evaluate_report_the_same_collapsed_held_out_loss(
    shards, tmp_path, ray_cluster
):
    """The held-out loss of every epoch and `iid evaluate`'s come from one loop, which honours
    loss.collapsed. The 9 test tiles are one batch, so worker 0 scores it with the generator
    `iid evaluate` uses, on pairs without randomness (no flip, strength 0), and worker 1 scores
    nothing (which hung in DDP's forward, a collective worker 1 never joined)."""
    d = config(shards, tmp_path).to_dict()
    d["loss"]["collapsed"] = True
    d["optim"]["epochs"] = 1
    d["pairs"] |= {"strength": 0.0, "flip": False}
    d["data"]["batch_size"] = 16
    cfg = Config.from_dict(d)
    fit(cfg)
    history = load_checkpoint(tmp_path / "runs" / "t")["history"]
    logged = [history[-1][f"heldout_loss_sub{i}"] for i in range(cfg.model.n_subheads)]
    ev, _, _ = evaluate_uri(str(tmp_path / "runs" / "t"), shards, ["test"])
    np.testing.assert_allclose(logged, ev.losses, rtol=1e-5)
    assert history[-1]["heldout_loss"] == pytest.approx(ev.losses[ev.best], rel=1e-5)

    # ... and it is the collapsed loss: with g the identity both views are the tile itself.
    model, _ = load_model(str(tmp_path / "runs" / "t"))
    losses = {True: [], False: []}
    with torch.no_grad():
        for images, _, _ in iter_tiles(shards, ["test"], cfg.data.batch_size):
            for collapsed in losses:
                losses[collapsed].append(
                    [
                        iid_segmentation_loss(p, p, None, 1.5, 3, collapsed=collapsed).loss
                        for p in model(torch.from_numpy(images), "B")
                    ]
                )
    collapsed, uncollapsed = (np.mean(losses[c], axis=0) for c in (True, False))
    np.testing.assert_allclose(ev.losses, collapsed, rtol=1e-5)
    assert np.all(np.abs(ev.losses - collapsed) < np.abs(ev.losses - uncollapsed))
    assert not np.allclose(ev.losses, uncollapsed, rtol=1e-5, atol=0)


def test_training_passes_shuffle_rows_differently_each_time_and_eval_keeps_the_order(
    shards, tmp_path, ray_cluster
):
    cfg = config(shards, tmp_path)
    rows = dataset_rows(split_files(shards, "train"), materialize=True).iterator()

    def one_pass(seed: int, shuffle: bool) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        batches = list(shard_batches(rows, cfg, torch.device("cpu"), rng, 0, shuffle=shuffle))
        assert all(len(b["tile_id"]) == len(b["x"]) for b in batches)  # for error messages
        return torch.cat([b["x"] for b in batches])

    stored, again = one_pass(0, False), one_pass(1, False)
    assert torch.equal(stored, again)
    first, second = one_pass(0, True), one_pass(1, True)
    assert len(first) == len(stored) > cfg.data.batch_size
    assert not torch.equal(first, stored) and not torch.equal(first, second)

    def as_set(x: torch.Tensor) -> list:
        return sorted(map(tuple, x.flatten(1)[:, :64].tolist()))

    assert as_set(first) == as_set(second) == as_set(stored)  # every row once per pass


def _worker_rows(ds, passes: int) -> list[list[set]]:
    """The tile ids each of 2 workers gets in each pass of a ``streaming_split`` (what Ray
    Train hands the workers), consumed concurrently as the workers do."""
    from concurrent.futures import ThreadPoolExecutor

    splits = ds.streaming_split(2, equal=True)

    def ids(it) -> set:
        return {
            t for b in it.iter_batches(batch_size=8, batch_format="numpy") for t in b["tile_id"]
        }

    with ThreadPoolExecutor(2) as pool:
        return [list(pool.map(ids, splits)) for _ in range(passes)]


def test_each_pass_deals_the_training_rows_to_the_workers_afresh(shards, ray_cluster):
    n = dataset_rows(split_files(shards, "train"), materialize=True).count()
    dealt = _worker_rows(dataset_rows(split_files(shards, "train"), True, deal_seed=0), passes=4)
    for first, second in dealt:
        assert not first & second and len(first) == len(second) == n // 2
    # A worker's rows change from pass to pass: not a fixed part of the scene.
    assert len({frozenset(first) for first, _ in dealt}) > 1
    # Unseeded (evaluation) rows keep their order: the same contiguous half every pass.
    kept = _worker_rows(dataset_rows(split_files(shards, "train"), materialize=True), passes=2)
    assert kept[0][0] == kept[1][0]


def test_the_deal_is_new_each_pass_and_repeats_with_the_seed(shards, ray_cluster):
    def orders(seed: int) -> list[tuple]:
        """The row order of 3 passes over a freshly built training dataset."""
        ds = dataset_rows(split_files(shards, "train"), True, deal_seed=seed)
        passes = [ds.iter_batches(batch_size=64, batch_format="numpy") for _ in range(3)]
        return [tuple(t for b in it for t in b["tile_id"]) for it in passes]

    first = orders(0)
    assert len(set(first)) == 3  # every pass its own order
    assert orders(0) == first  # the same run.seed: the same orders, pass by pass
    assert orders(1) != first


def test_non_finite_loss_stops_before_the_step(shards, tmp_path):
    cfg = config(shards, tmp_path)
    model = build_model(cfg.model)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    batch = {"x": torch.rand(2, 3, 24, 24), "label": torch.zeros(2, 24, 24, dtype=torch.uint8)}
    batch["tile_id"] = ["a_r0_c0", "a_r0_c32"]
    gen = torch.Generator().manual_seed(0)
    # Counted from 1, as the per-epoch lines count (epoch index 3 is the 4th).
    stopped = r"non-finite loss nan at epoch 4, head A, step 1 \(tiles a_r0_c0, a_r0_c32\)"
    with pytest.raises(NonFiniteLossError, match=stopped):
        train_epoch_head(model, opt, [batch], "A", 1.0, cfg, torch.device("cpu"), 3, gen)
    after = list(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(after[1:], before[1:], strict=True))


def test_repeats_draw_several_pairs_of_each_image_per_step(shards, tmp_path):
    d = config(shards, tmp_path).to_dict()
    d["pairs"]["repeats"] = 3
    cfg = Config.from_dict(d)
    model = build_model(cfg.model)
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = {"x": torch.rand(2, 3, 24, 24), "label": torch.zeros(2, 24, 24, dtype=torch.uint8)}
    gen = torch.Generator().manual_seed(0)
    train_epoch_head(model, opt, [batch], "B", 1.0, cfg, torch.device("cpu"), 0, gen)
    x, gx = seen  # one forward for the views, one for their transforms
    assert x.shape[0] == gx.shape[0] == 6
    assert torch.equal(x[0], x[2]) and torch.equal(x[0], x[4])  # the same image three times ...
    assert not torch.equal(gx[0], gx[2])  # ... each with its own g


def test_worker_failure_becomes_one_line():
    from ray.train import WorkerGroupError

    inner = RuntimeError(
        "Traceback (most recent call last):\n  File x\n"
        "pipeline.train.NonFiniteLossError: non-finite loss nan at epoch 0, head B, step 7"
    )
    err = _worker_error(WorkerGroupError("worker 0 failed", {0: inner}))
    assert isinstance(err, NonFiniteLossError)
    assert str(err) == "non-finite loss nan at epoch 0, head B, step 7"


@pytest.mark.skipif(IID is None, reason="console script `iid` not installed")
def test_cli_train_bad_config_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {shards: x}\nloss: {lamb_b: -1}\n")
    run = subprocess.run([IID, "train", "--config", str(path)], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].endswith("loss.lamb_b: expected > 0, got -1.0")


@pytest.mark.parametrize(
    "stop, code, status, line",
    [
        (KeyboardInterrupt, 130, "KILLED", "interrupted; the same command resumes run 't' from"),
        (RuntimeError("training failed: worker lost"), 2, "FAILED", "training failed: worker"),
        # Ray Train's own SIGINT handler aborts the controller and exits from inside fit().
        (SystemExit(0), 130, "KILLED", "interrupted; the same command resumes run 't' from"),
    ],
    ids=["ctrl-c", "failure", "ray-sigint"],
)
def test_an_interrupted_or_failed_run_ends_killed_or_failed_and_frees_its_name(
    stop, code, status, line, shards, tmp_path, ray_cluster, monkeypatch, capsys
):
    """Training stopped where the driver waits on it (``launch``, or Ray's ``fit`` inside it,
    where Ray Train's SIGINT handler exits): the MLflow run is ended with
    the matching status, the CLI says one line, and the run name is free for the rerun."""
    import yaml

    from pipeline import train
    from pipeline.cli import main as cli_main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(shards, tmp_path).to_dict()))

    def stopped(*args, **kwargs):
        raise stop

    if isinstance(stop, SystemExit):  # where Ray's handler raises it: the real launch() around
        from ray.train.torch import TorchTrainer

        monkeypatch.setattr(TorchTrainer, "fit", stopped)
    else:
        monkeypatch.setattr(train, "launch", stopped)
    assert cli_main(["train", "--config", str(path)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0], err
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == status
    assert not (tmp_path / "runs" / "t" / ".lock").exists()


def test_a_ray_address_where_nothing_answers_is_one_line_after_the_wait(monkeypatch):
    import socket

    from pipeline.train import check_cluster

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{listening.getsockname()[1]}")
        check_cluster(wait_s=1)  # something answers: go on
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: refused
        monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
        start = time.monotonic()
        with pytest.raises(
            ConfigError,
            match=rf"RAY_ADDRESS: no Ray cluster answers at ray://127.0.0.1:{port} \(.*for 1 s\)",
        ) as err:
            check_cluster(wait_s=1)
        assert time.monotonic() - start < 5 and "\n" not in str(err.value)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    check_cluster(wait_s=1)  # left to Ray


def test_the_driver_says_when_workers_are_slow_to_start_then_started_then_each_epoch(
    tmp_path, monkeypatch
):
    from pipeline import storage, train

    monkeypatch.setattr(train, "WAIT_LINE_S", 0.0)
    said: list[str] = []
    progress = tmp_path / train.PROGRESS_FILE
    # A former launch's state: its epoch 0 was printed then, and its "started" is stale.
    epoch0 = {"epoch": 0, "loss_a": -1.0, "loss_b": -2.0, "mi": 0.5, "seconds_head_a": 1.0}
    storage.write_json_atomic(str(progress), {"epochs": [epoch0], "started": 0, "workers": 2})
    lines = EpochLines(str(tmp_path), 3, said.append)
    lines._poll()
    assert said == ["waiting for Ray Train to start the workers (0 s so far)"]
    lines._poll()  # said once
    storage.write_json_atomic(str(progress), {"epochs": [epoch0], "started": 1, "workers": 2})
    lines._poll()
    assert said[1:] == ["2 worker(s) ready: training epoch 2/3"]
    epoch1 = epoch0 | {"epoch": 1}
    storage.write_json_atomic(str(progress), {"epochs": [epoch0, epoch1]})
    lines._poll()
    assert len(said) == 3 and said[2].startswith("epoch 2/3: loss A -1.0000 B -2.0000")
