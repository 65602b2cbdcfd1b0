"""Distributed IID training with Ray Train: the per-worker loop and the driver around it.

The loop is a plain function of a config dict (Ray calls stay at the seams: dataset shard,
prepare_model, report with a checkpoint), so the same code runs under ``TorchTrainer`` with any
number of workers. Each epoch: a pass of overclustering head A with lambda_A, a pass of head B
with lambda_B (sub-heads averaged), then evaluation of every head-B sub-head on the labelled split
with confusion counts summed across workers, then a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline import storage
from pipeline.config import Config, ConfigError
from pipeline.evaluate import (
    CHECKPOINT_FILE,
    batch_counts,
    choose_subhead,
    class_targets,
    load_checkpoint,
    paired_views,
    zero_shift_joint,
)
from pipeline.losses import iid_clustering_loss, iid_segmentation_loss, mutual_information
from pipeline.metrics import cluster_scores
from pipeline.models import ClusterNet, SegmentationNet
from pipeline.pairs import (
    PairConfig,
    decode_batch,
    from_wire,
    make_pairs,
    pair_dataset,
    random_crops,
    undo,
)

# Ray is imported inside the functions that use it, so importing this module does not load it.
if TYPE_CHECKING:
    from ray.data import RandomSeedConfig

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced NaN or inf; the last checkpoint stays the last good state."""


def build_model(cfg: Config) -> torch.nn.Module:
    m = cfg.model
    if m.task == "segmentation":
        return SegmentationNet(
            m.in_channels, m.n_clusters_a, m.n_clusters_b, m.n_subheads, m.sobel, m.width
        )
    return ClusterNet(m.in_channels, m.n_clusters_a, m.n_clusters_b, m.n_subheads, m.trunk, m.sobel)


def label_lut(manifest: dict, merge: str) -> tuple[np.ndarray, list[str]]:
    """256-entry lookup from stored label ids to evaluated classes, and the class names."""
    lut = np.full(256, 255, dtype=np.int64)
    classes = manifest["classes"]
    if merge:
        merges = manifest.get("merges", {})
        if merge not in merges:
            raise ConfigError(
                f"data.merge: {merge!r} is not in the manifest (known: {sorted(merges)})"
            )
        lut[: len(merges[merge]["map"])] = merges[merge]["map"]
        return lut, merges[merge]["classes"]
    lut[: len(classes)] = np.arange(len(classes))
    return lut, list(classes)


# --------------------------------------------------------------------------- the worker loop
def global_sum(joint: torch.Tensor) -> torch.Tensor:
    """Sum of ``joint`` over the data-parallel workers, differentiable.

    Every worker then computes the same loss from the same global P. The backward pass sums
    dL/dP over the workers (W times the common value) and DDP divides the parameter gradients
    by W again, so the result is the gradient of the global-batch loss.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return joint
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(joint)


def pair_loss(model, batch: dict, head: str, lamb: float, cfg: Config) -> torch.Tensor:
    """Mean over sub-heads of the IID loss of one batch of pairs (g* applied for dense maps)."""
    outs = zip(model(batch["x"], head), model(batch["gx"], head), strict=True)
    joint_sum = global_sum if cfg.loss.global_joint else None
    losses = []
    for p, q in outs:
        if cfg.model.task == "segmentation":
            q, _ = undo(q, batch["inverse"])
            losses.append(
                iid_segmentation_loss(
                    p,
                    q,
                    batch["mask"],
                    lamb=lamb,
                    half_window=cfg.loss.half_window,
                    collapsed=cfg.loss.collapsed,
                    joint_sum=joint_sum,
                ).loss
            )
        else:
            losses.append(iid_clustering_loss(p, q, lamb, joint_sum).loss)
    return torch.stack(losses)


def shard_batches(
    shard,
    cfg: Config,
    device,
    rng: np.random.Generator,
    crop: int,
    pairs_ready: bool = False,
    shuffle: bool = False,
):
    """Batches of this worker's shard on ``device``.

    With ``pairs_ready`` (``data.pairs_on: actors``) they are finished pairs from the actor pool.
    Otherwise the shard holds raw shard rows (usually materialised in the object store: read
    once, not re-read and re-decoded every pass), decoded and randomly cropped here; the pairs
    are then drawn on the device by the caller. ``shuffle`` mixes rows in a buffer of
    ``data.shuffle_buffer`` rows, seeded from ``rng``.
    """
    order = {}
    if shuffle and cfg.data.shuffle_buffer > 0:
        order = {
            "local_shuffle_buffer_size": cfg.data.shuffle_buffer,
            "local_shuffle_seed": int(rng.integers(2**31)),
        }
    if pairs_ready:
        for batch in shard.iter_torch_batches(
            batch_size=cfg.data.batch_size, device=device, **order
        ):
            # compact views from the actors (see pairs.from_wire): cast on the device
            yield batch | {"x": from_wire(batch["x"]), "gx": from_wire(batch["gx"])}
        return
    for rows in shard.iter_batches(batch_size=cfg.data.batch_size, batch_format="numpy", **order):
        images, labels = decode_batch(rows)
        images, labels = random_crops(images, labels, crop, rng)
        yield {
            "x": torch.from_numpy(np.ascontiguousarray(images)).to(device),
            "label": torch.from_numpy(labels).to(device),
        }


def train_epoch_head(
    model,
    opt,
    batches: Iterable[dict],
    head: str,
    lamb: float,
    cfg: Config,
    device,
    epoch: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """One pass over this worker's batches for one head. Returns summed per-sub-head losses."""
    totals = torch.zeros(cfg.model.n_subheads, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for step, batch in enumerate(batches):
        if "gx" not in batch:  # pairs drawn here, on the worker's device
            x, label = batch["x"], batch["label"]
            if cfg.pairs.repeats > 1:  # r pairs of each image, each with its own g
                x = x.repeat(cfg.pairs.repeats, *([1] * (x.ndim - 1)))
                label = label.repeat(cfg.pairs.repeats, *([1] * (label.ndim - 1)))
            batch = make_pairs(x, cfg.pairs, gen) | {"label": label}
        with autocast:
            losses = pair_loss(model, batch, head, lamb, cfg)
        loss = losses.mean()
        # One host read per step (also the progress figure): never step on a non-finite loss.
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"non-finite loss {loss.item()} at epoch {epoch}, head {head}, step {step} "
                f"(tiles {batch.get('tile_id', '?')}); an all-masked batch also gives NaN"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        totals += losses.detach()
    return totals


def evaluate(
    model,
    batches: Iterable[dict],
    cfg: Config,
    lut: torch.Tensor,
    n_classes: int,
    device,
    pairs: PairConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head B on this worker's share of the eval split.

    Returns:
        (sub-heads, K, M) confusion counts against the classes, and (sub-heads, K, K)
        unnormalised P(z, z') on pairs drawn with ``pairs``. The pairs come from a fixed seed,
        so every epoch, and every trial of a search, is scored on the same pairs.
    """
    s, k = cfg.model.n_subheads, cfg.model.n_clusters_b
    counts = torch.zeros(s, k * n_classes, dtype=torch.int64, device=device)
    joints = torch.zeros(s, k, k, dtype=torch.float64, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.run.seed)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            target = class_targets(lut, batch["label"], cfg.model.task)
            probs = model(batch["x"], "B")
            counts += batch_counts(probs, target, n_classes)
            views = paired_views(model, batch["x"], probs, pairs, cfg.model.task, gen)
            joints += torch.stack([zero_shift_joint(*v) for v in views]).double()
    model.train()
    return counts.view(s, k, n_classes), joints


def _worker_nodes(world_size: int) -> list[str]:
    """The Ray node id of every worker, by rank (where the run actually ran)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [node]
    nodes: list = [None] * world_size
    torch.distributed.all_gather_object(nodes, node)
    return nodes


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; ``config`` is ``Config.to_dict()`` plus ``_lut``, ``_classes``,
    ``_mlflow`` (tracking URI and run id) added by the driver."""
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed + rank)
    # As many intra-op threads as CPUs reserved: more would fight the other workers for cores.
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    # --- model, optimiser, resume -----------------------------------------------------------
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        torch.set_rng_state(state["torch_rng"])
    # Heads A and B are trained in turns, so each step leaves the other head's weights unused.
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    lut = torch.tensor(config["_lut"], device=device)
    n_classes = len(config["_classes"])
    nodes = _worker_nodes(ctx.get_world_size())
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    tracking = _MlflowLogger(config["_mlflow"]) if rank == 0 else None
    # A search scores every trial on pairs of the base config's strength, not the trial's own.
    eval_pairs = PairConfig(**config["_eval_pairs"]) if "_eval_pairs" in config else cfg.pairs

    gen = torch.Generator(device=device)
    for epoch in range(start_epoch, cfg.optim.epochs):
        seed = cfg.run.seed * 1_000_003 + epoch * 101 + rank
        gen.manual_seed(seed)
        rng = np.random.default_rng(seed)  # crops
        # --- train: head A pass, then head B pass ---------------------------------------------
        args = (cfg, device, epoch, gen)
        clock = [time.perf_counter()]
        ready = cfg.data.pairs_on == "actors"
        train_a = shard_batches(train_shard, cfg, device, rng, cfg.pairs.crop, ready, True)
        train_epoch_head(model, opt, train_a, "A", cfg.loss.lamb_a, *args)
        clock.append(time.perf_counter())
        train_b = shard_batches(train_shard, cfg, device, rng, cfg.pairs.crop, ready, True)
        head_b = _all_reduce(train_epoch_head(model, opt, train_b, "B", cfg.loss.lamb_b, *args))
        clock.append(time.perf_counter())
        # --- evaluate every head-B sub-head, counts summed over workers --------------------------
        eval_batches = shard_batches(eval_shard, cfg, device, rng, crop=0)
        counts, joints = evaluate(model, eval_batches, cfg, lut, n_classes, device, eval_pairs)
        counts, joints = _all_reduce(counts).cpu(), _all_reduce(joints).cpu()
        clock.append(time.perf_counter())
        mi = mutual_information(joints)
        metrics = epoch_metrics(epoch, head_b.cpu(), counts, mi, choose_subhead(mi))
        metrics["start_epoch"] = start_epoch  # > 0 in epochs trained after a resume
        metrics["n_nodes"] = len(set(nodes))
        metrics |= {
            f"seconds_{name}": b - a
            for name, a, b in zip(("head_a", "head_b", "eval"), clock, clock[1:], strict=False)
        }
        history.append(metrics)
        # --- checkpoint: rank 0 writes, every worker reports (a barrier) ---------------------
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                raw = model.module if hasattr(model, "module") else model
                torch.save(
                    {
                        "model": raw.state_dict(),
                        "optimizer": opt.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "config": cfg.to_dict(),
                        "classes": config["_classes"],
                        "torch_rng": torch.get_rng_state(),
                        "counts": counts,
                        "nodes": nodes,  # Ray node id of each worker, by rank
                    },
                    Path(tmp) / CHECKPOINT_FILE,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                tracking.log(metrics, epoch)
            ray.train.report(metrics, checkpoint=ckpt)


def epoch_metrics(
    epoch: int, head_b_losses: torch.Tensor, counts: torch.Tensor, mi: torch.Tensor, best: int
) -> dict:
    """Flat metrics of one epoch: the chosen sub-head's scores, every sub-head's, masses.

    ``mi`` (per sub-head) is the lambda=1 mutual information of head B on held-out pairs: the
    label-free criterion that chooses ``best`` among the sub-heads and ranks the trials of a
    search.
    """
    out = {
        "epoch": epoch,
        "epochs_done": epoch + 1,
        "best_subhead": best,
        "loss_b": float(head_b_losses[best]),
        "mi": float(mi[best]),
    }
    out |= {f"mi_sub{i}": float(v) for i, v in enumerate(mi)}
    for i, c in enumerate(counts):
        if int(c.sum()) == 0:
            continue
        s = cluster_scores(c.numpy())
        out |= {f"acc_sub{i}": s.acc, f"nmi_sub{i}": s.nmi, f"ari_sub{i}": s.ari}
        if i == best:
            masses = c.sum(1).double() / int(c.sum())
            out |= {"acc": s.acc, "nmi": s.nmi, "ari": s.ari}
            out |= {f"mass_{k}": float(m) for k, m in enumerate(masses)}
    return out


class _MlflowLogger:
    """Plain MLflow calls on world rank 0 (the reliable pattern in Ray Train V2)."""

    def __init__(self, info: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(info["uri"])
        self.run_id = info["run_id"]

    def log(self, metrics: dict, epoch: int) -> None:
        client = self.mlflow.MlflowClient()
        for key, value in metrics.items():
            if key != "epoch":
                client.log_metric(self.run_id, key, float(value), step=epoch)


# ------------------------------------------------------------------------------- the driver
def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_tracking(uri: str) -> None:
    """Fail before training when the tracking store cannot be reached."""
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


def check_data(cfg: Config, manifest: dict, require_eval: bool = True) -> None:
    bands = manifest.get("bands")
    if bands is not None and bands != cfg.model.in_channels:
        raise ConfigError(
            f"model.in_channels: {cfg.model.in_channels} bands configured but the "
            f"shards in {cfg.data.shards} have {bands}"
        )
    tile = cfg.pairs.crop or manifest.get("tiling", {}).get("tile")
    if cfg.model.task == "segmentation" and tile and cfg.loss.half_window >= tile:
        raise ConfigError(
            f"loss.half_window: {cfg.loss.half_window} does not fit "
            f"{tile}-pixel tiles (must be < {tile})"
        )
    if require_eval and manifest["splits"].get(cfg.data.eval_split, {}).get("tiles", 0) == 0:
        raise ConfigError(
            f"data.eval_split: no tiles in split {cfg.data.eval_split!r} of {cfg.data.shards}"
        )


@dataclass(frozen=True)
class TrainInputs:
    """What the driver derives from the shards before any worker starts."""

    lut: np.ndarray  # stored label id -> evaluated class
    classes: list[str]
    train_dirs: list[str]


def training_inputs(cfg: Config) -> TrainInputs:
    """Check the shards against the config and find the training splits.

    Raises:
        ConfigError: one line naming the config key and the shards.
    """
    from pipeline.prepare.shards import read_manifest

    shards = cfg.data.shards
    manifest = read_manifest(shards)
    check_data(cfg, manifest)
    lut, classes = label_lut(manifest, cfg.data.merge)
    train_dirs = [
        storage.absolute(storage.join(shards, s))
        for s in cfg.data.train_splits
        if manifest["splits"].get(s, {}).get("tiles", 0)
    ]
    if not train_dirs:
        raise ConfigError(
            f"data.train_splits: no tiles in {list(cfg.data.train_splits)} of {shards}"
        )
    return TrainInputs(lut, classes, train_dirs)


def start_ray() -> None:
    """Join the cluster ``RAY_ADDRESS`` names, or start a local one (the default)."""
    import ray
    import ray.data

    if not ray.is_initialized():
        # Workers' log lines (Ray Data progress bars, controller notices) reach the terminal
        # only with -v; a failure still arrives as the exception fit() raises.
        verbose = logging.getLogger("pipeline").isEnabledFor(logging.INFO)
        local = not os.environ.get("RAY_ADDRESS")
        ray.init(
            # More logical CPUs than cores: Ray Data's read tasks must not wait behind workers.
            num_cpus=max(4, os.cpu_count() or 1) if local else None,
            # The dashboard serves the state API: without it Ray Train's placement-group
            # cleaner cannot see that a Tune trial's controller died, and the trial's CPUs
            # are never released (the next trial then waits forever on a small machine).
            include_dashboard=True if local else None,
            log_to_driver=verbose,
        )
    ray.data.DataContext.get_current().enable_progress_bars = False


def make_trainer(
    cfg: Config,
    inputs: TrainInputs,
    mlflow_run: dict,
    callbacks: Sequence = (),
    eval_pairs: PairConfig | None = None,
):
    """The ``TorchTrainer`` of one run: datasets, scaling, storage and failure handling.

    Args:
        cfg: the run's config (``run.name`` and ``run.storage_path`` locate its checkpoints).
        inputs: from ``training_inputs``.
        mlflow_run: ``{"uri": ..., "run_id": ...}`` that rank 0 logs epochs to.
        callbacks: Ray Train callbacks (a Tune trial passes ``TuneReportCallback``).
        eval_pairs: pairs for the per-epoch MI; default ``cfg.pairs``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if cfg.data.pairs_on == "actors":
        train_ds = pair_dataset(
            inputs.train_dirs,
            cfg.pairs,
            actors=cfg.scaling.pair_actors,
            batch_size=cfg.data.batch_size,
            num_cpus=cfg.scaling.pair_cpus,
            seed=cfg.run.seed,
        ).select_columns(["x", "gx", "inverse", "mask", "label"])
    else:
        train_ds = _rows(inputs.train_dirs, cfg.data.materialize, deal_seed=cfg.run.seed)
    eval_dir = storage.absolute(storage.join(cfg.data.shards, cfg.data.eval_split))
    eval_ds = _rows(eval_dir, cfg.data.materialize)
    loop_config = cfg.to_dict() | {
        "_lut": inputs.lut.tolist(),
        "_classes": inputs.classes,
        "_mlflow": mlflow_run,
    }
    if eval_pairs is not None:
        loop_config["_eval_pairs"] = dataclasses.asdict(eval_pairs)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.scaling.placement,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage.absolute(cfg.run.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
        datasets={"train": train_ds, "eval": eval_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train", "eval"]),
    )


def fit(cfg: Config):
    """Train (or resume) a run; returns the Ray Train result."""
    import mlflow
    import ray.train

    inputs = training_inputs(cfg)
    uri = cfg.run.tracking_uri or default_tracking_uri()
    check_tracking(uri)
    start_ray()
    # The MLflow run is created here, before any worker starts (SQLite schema races), and
    # reused when the same run name is trained again.
    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
    run_id = mlflow_run(uri, cfg, run_dir)
    trainer = make_trainer(cfg, inputs, {"uri": uri, "run_id": run_id})
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise _worker_error(err) from err
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tag("status", "finished")
    if result.checkpoint is not None:
        finish_run(cfg, result.checkpoint, uri, run_id, inputs.lut, inputs.classes, run_dir)
    return result


# Shards up to this size are read by the driver itself when they are to be materialised anyway.
SMALL_SHARDS_BYTES = 256 * 2**20


# Rows per block of a training table held in the object store: the unit that is dealt out to
# the workers anew each pass.
DEAL_ROWS = 16


def _rows(path: str | list[str], materialize: bool, deal_seed: int | None = None):
    """Raw shard rows as a Ray Dataset; materialised, every pass after the first costs a
    fraction of a second instead of a new read-and-decode pipeline (~5 s on 2 cores).

    With ``deal_seed`` (training), every pass deals the rows out to the workers afresh: the
    rows are put in a random order once (seeded), cut into blocks of ``DEAL_ROWS``, and the
    block order is drawn anew per pass from ``deal_seed``. Otherwise a split hands each worker
    the same contiguous part of the shards every pass: a fixed spatial half of the scene per
    worker, whose batch norm statistics then differ by region. On potsdam-mini P3 (2 workers,
    one seed, 3 epochs) that cost 0.06-0.22 ACC per sub-head (measured).
    A stream too large to materialise keeps the shards' order.
    """
    import ray.data

    if materialize:
        table = _small_table([path] if isinstance(path, str) else path)
        if table is not None:
            # Straight into the object store: no list/footer/read tasks, whose processes cost
            # ~10 s of start-up per run on a small machine for a few MB of tiles.
            if deal_seed is None:
                return ray.data.from_arrow(table)
            table = table.take(np.random.default_rng(deal_seed).permutation(len(table)))
            blocks = [table.slice(i, DEAL_ROWS) for i in range(0, len(table), DEAL_ROWS)]
            return ray.data.from_arrow(blocks).randomize_block_order(seed=_pass_seed(deal_seed))
    # A quarter CPU per read task: with the workers' reservations (and a stopped Tune trial's
    # not yet released) a whole CPU may never come free on a small machine, and the read waits.
    ds = ray.data.read_parquet(path, num_cpus=0.25)
    if not materialize:
        return ds
    ds = ds.materialize()
    return ds if deal_seed is None else ds.randomize_block_order(seed=_pass_seed(deal_seed))


def _pass_seed(seed: int) -> RandomSeedConfig:
    """A block order seeded from ``seed`` and new on every pass (Ray Data counts the passes,
    its ``execution_idx``), so a run repeats exactly with the same ``run.seed``. A bare
    int would give every pass the same order; no seed, a new order every run."""
    from ray.data import RandomSeedConfig

    return RandomSeedConfig(seed=seed, reseed_after_execution=True)


def _small_table(dirs: list[str]):
    """The rows of every shard under ``dirs`` as one Arrow table, or None above the size limit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [f for d in dirs for f in storage.list_files(d, ".parquet")]
    if not files or sum(storage.size(f) for f in files) > SMALL_SHARDS_BYTES:
        return None
    tables = []
    for f in files:
        with storage.open_input(f) as src:
            tables.append(pq.read_table(src))
    return pa.concat_tables(tables)


def _worker_error(err: Exception) -> RuntimeError:
    """One line for the user out of Ray's multi-line worker failure report."""
    failures = getattr(err, "worker_failures", {}) or {}
    text = "\n".join(str(e) for e in failures.values()) or str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "NonFiniteLossError" in ln:
            return NonFiniteLossError(ln.split("NonFiniteLossError:", 1)[-1].strip())
    errors = [ln for ln in lines if "Error" in ln.split(":")[0]]
    return RuntimeError(f"training failed: {(errors or lines or ['unknown error'])[-1][:300]}")


def finish_run(
    cfg: Config,
    checkpoint,
    uri: str,
    run_id: str,
    lut: np.ndarray,
    classes: list[str],
    run_dir: str,
) -> dict:
    """Evaluate the final checkpoint on the driver and log plots and the registered model,
    once per run; the outcome is kept in ``run_dir/report.json`` for the CLI and for users."""
    import mlflow

    from pipeline.evaluate import evaluate_model
    from pipeline.prepare.shards import write_json_atomic
    from pipeline.track import REPORT_TAG, log_report

    report_file = storage.join(run_dir, "report.json")
    run = mlflow.MlflowClient(uri).get_run(run_id)
    if run.data.tags.get(REPORT_TAG) == "done" and storage.is_file(report_file):
        return json.loads(storage.read_text(report_file))
    # as_directory: the checkpoint itself when local, a download from s3:// or gs://.
    with checkpoint.as_directory() as local:
        state = load_checkpoint(local)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ev = evaluate_model(
        model, cfg, cfg.data.shards, [cfg.data.eval_split], lut, len(classes), device=device
    )
    plots = storage.join(run_dir, "plots")
    with storage.staged_dir(plots) as drawn:
        report = log_report(uri, run_id, cfg, model, ev, classes, state["history"], drawn)
    # Where the checkpoint is kept (``checkpoint`` may be a temporary download of it).
    name = os.path.basename(checkpoint.path.rstrip("/"))
    kept = storage.join(run_dir, name) if storage.is_uri(run_dir) else checkpoint.path
    report |= ev.summary() | {"plots": plots, "checkpoint": kept, "tracking_uri": uri}
    write_json_atomic(report_file, report)
    return report


def mlflow_run(uri: str, cfg: Config, run_dir: str | Path, tags: dict | None = None) -> str:
    """The MLflow run of ``run_dir``: created once (params = the flat config), then reused.

    The id is kept in ``run_dir/mlflow_run_id``, so resuming a run logs to the same record.
    """
    import mlflow

    marker = storage.join(run_dir, "mlflow_run_id")
    mlflow.set_tracking_uri(uri)
    if storage.is_file(marker):
        return storage.read_text(marker).strip()
    experiment = mlflow.set_experiment(cfg.run.experiment)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(experiment.experiment_id, run_name=cfg.run.name, tags=tags or {})
    client.log_batch(
        run.info.run_id,
        params=[mlflow.entities.Param(k, str(v)) for k, v in cfg.flat().items()],
    )
    storage.write_text_atomic(marker, run.info.run_id)
    return run.info.run_id
