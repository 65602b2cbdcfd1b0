"""Distributed IID training with Ray Train: the step, the per-worker loop, and its launch.

The loop is a plain function of a ``Job`` (Ray calls stay at its numbered seams: the checkpoint
to resume from, prepare_model, the dataset shards, report with a checkpoint), so the same code
runs under ``TorchTrainer`` with any number of workers. Each epoch: a pass of overclustering
head A with lambda_A, a pass of head B with lambda_B (sub-heads averaged), then every head-B
sub-head scored on the evaluation split (``evaluate.score``, sums over workers), then a
checkpoint. ``launch`` runs one job; ``iid train`` (``fit``) and every trial of a search use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline import checkpoint, storage, tracking
from pipeline.augment import make_pairs
from pipeline.config import Config, ConfigError, Job, PairConfig
from pipeline.data.format import TrainInputs, training_inputs
from pipeline.data.pairs import pair_dataset
from pipeline.data.read import rows, shard_batches
from pipeline.dist import all_reduce, global_sum, outside_ddp, worker_nodes
from pipeline.evaluate import Evaluation, evaluate_model, score
from pipeline.metrics import matched_names
from pipeline.models import build_model
from pipeline.objective import pair_losses
from pipeline.plots import close, overlay_figure, write_plots

# Ray is imported inside the functions that use it, so importing this module does not load it.
if TYPE_CHECKING:
    from ray.train import Checkpoint, Result

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"  # in the run folder, while a driver trains it
THIRD_PARTY_LOGS = "IID_THIRD_PARTY_LOGS"  # "1": Ray's and MLflow's own logs shown (-vv)
PROGRESS_FILE = "progress.json"  # in the run folder: the last epoch's metrics, by rank 0
WAIT_LINE_S = 10.0  # a line if the workers have not started after this many seconds
ALREADY_FINISHED = "already finished"  # the result's return_value when nothing was trained


class NonFiniteLossError(RuntimeError):
    """Training produced NaN or inf; the last checkpoint stays the last good state."""


def _tiles(batch: dict) -> str:
    """The batch's tiles, for an error message (the first few ids)."""
    ids = list(batch.get("tile_id", []))
    if not ids:
        return "tile ids not carried by actor-made pairs"
    more = f" and {len(ids) - 4} more" if len(ids) > 4 else ""
    return f"tiles {', '.join(ids[:4])}{more}"


# ---------------------------------------------------------------------------------- the step
def train_epoch_head(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterable[dict],
    head: str,
    lamb: float,
    cfg: Config,
    device: torch.device,
    epoch: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """One pass over this worker's batches for one head. Returns the per-sub-head losses, as a
    mean over its steps (comparable across epochs, batch counts and with ``iid evaluate``)."""
    totals = torch.zeros(cfg.model.n_subheads, device=device)
    steps = 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    joint_sum = global_sum if cfg.loss.global_joint else None
    for step, batch in enumerate(batches):
        if "gx" not in batch:  # pairs drawn here, on the worker's device
            x, label, valid = batch["x"], batch["label"], batch.get("valid")
            if cfg.pairs.repeats > 1:  # r pairs of each image, each with its own g
                x = x.repeat(cfg.pairs.repeats, *([1] * (x.ndim - 1)))
                label = label.repeat(cfg.pairs.repeats, *([1] * (label.ndim - 1)))
                valid = None if valid is None else valid.repeat(cfg.pairs.repeats, 1, 1)
            ids = batch.get("tile_id", [])
            batch = make_pairs(x, cfg.pairs, gen, valid) | {"label": label, "tile_id": ids}
        with autocast:
            losses = pair_losses(model, batch, head, lamb, cfg, joint_sum)
        loss = losses.mean()
        # One host read per step (also the progress figure): never step on a non-finite loss.
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"non-finite loss {loss.item()} at epoch {epoch + 1}, head {head}, step {step + 1} "
                f"({_tiles(batch)}); an all-masked batch also gives NaN"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        totals += losses.detach()
        steps += 1
    return totals / max(steps, 1)


# ---------------------------------------------------------------------------- the worker loop
def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point; ``loop_config`` is ``Job.to_dict()``."""
    import ray.train
    import ray.train.torch

    job = Job.from_dict(loop_config)
    cfg = job.config
    ctx, device = ray.train.get_context(), ray.train.torch.get_device()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed + rank)
    # As many intra-op threads as CPUs reserved: more would fight the other workers for cores.
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    # --- model, optimiser, and [1] the checkpoint to resume from -------------------------
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    start_epoch, history = 0, []
    if resumed := ray.train.get_checkpoint():
        with resumed.as_directory() as folder:
            start_epoch, history = checkpoint.resume(folder, model, opt)
    # [2] DDP. Heads A and B train in turns, so each step leaves the other head's weights unused.
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    # [3] this worker's share of the training rows, and the evaluation split
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    lut, nodes = torch.tensor(job.lut, device=device), worker_nodes(world)
    logger = tracking.EpochLogger(job.tracking_uri, job.run_id) if rank == 0 else None
    ready = cfg.data.pairs_on == "actors"  # finished pairs from the actor pool
    gen = torch.Generator(device=device)
    if rank == 0:  # the driver says that training has begun: the first epoch may take a while
        write_progress(job, history, started=start_epoch, workers=world)
    for epoch in range(start_epoch, cfg.optim.epochs):
        seed = cfg.run.seed * 1_000_003 + epoch * 101 + rank
        gen.manual_seed(seed)
        rng = np.random.default_rng(seed)  # shuffles, crops
        # --- train: a head A pass, then a head B pass --------------------------------------
        clock, totals = [time.perf_counter()], {}
        for head, lamb in (("A", cfg.loss.lamb_a), ("B", cfg.loss.lamb_b)):
            batches = shard_batches(train_shard, cfg, device, rng, cfg.pairs.crop, ready, True)
            totals[head] = train_epoch_head(
                model, opt, batches, head, lamb, cfg, device, epoch, gen
            )
            clock.append(time.perf_counter())
        # --- score every head-B sub-head on the evaluation split, sums over workers --------
        batches = shard_batches(eval_shard, cfg, device, rng, crop=0, part=(rank, world))
        net, n_classes = outside_ddp(model), len(job.classes)
        examples = 2 if rank == 0 else 0  # for the epoch's overlay
        tally = score(net, batches, cfg, lut, n_classes, job.eval_pairs, examples)
        tally = tally.summed(all_reduce)
        clock.append(time.perf_counter())
        ev = Evaluation.of(tally)
        # Means over the workers (each worker's is a mean over its steps).
        means = {head: all_reduce(t).cpu() / world for head, t in totals.items()}
        metrics = epoch_metrics(epoch, means, ev) | _seconds(clock)
        metrics |= {"start_epoch": start_epoch, "n_nodes": len(set(nodes))}
        history.append(metrics)
        # --- [4] checkpoint: rank 0 writes, every worker reports (a barrier) ---------------
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                checkpoint.save(tmp, model, opt, history, job, tally.counts.cpu(), nodes)
                publish_epoch(job, logger, history, ev)
            saved = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report(metrics, checkpoint=saved)


def publish_epoch(
    job: Job, logger: tracking.EpochLogger, history: list[dict], ev: Evaluation
) -> None:
    """Rank 0's record of an epoch: MLflow metrics and overlay, and the driver's progress file.

    Args:
        job: the training job (classes, progress file).
        logger: the run's MLflow epoch logger.
        history: every epoch's metrics so far, this one last.
        ev: this epoch's evaluation (for the overlay figure).
    """
    metrics = history[-1]
    epoch = metrics["epoch"]
    logger.log(metrics, epoch)
    if (figure := overlay_figure(ev, job.classes)) is not None:
        logger.log_figure(figure, f"overlays/epoch_{epoch + 1:03d}.png")
        close(figure)
    write_progress(job, history)


def write_progress(job: Job, history: list[dict], **state: int) -> None:
    """Leave what the driver prints (``EpochLines``) in ``job.progress_file``: worker output
    reaches the driver only with -v. Every epoch so far, as the driver polls and epochs may be
    quicker than its poll; ``state`` says more (``started``: the first epoch of this launch).
    """
    if job.progress_file:
        storage.write_json_atomic(job.progress_file, {"epochs": history, **state})


def _seconds(clock: list[float]) -> dict[str, float]:
    """Seconds of each phase of an epoch, from its clock readings."""
    names = ("head_a", "head_b", "eval")
    return {f"seconds_{n}": b - a for n, a, b in zip(names, clock, clock[1:], strict=False)}


def epoch_metrics(epoch: int, losses: dict[str, torch.Tensor], ev: Evaluation) -> dict:
    """Flat metrics of one epoch: the chosen sub-head's scores, every sub-head's, masses.

    ``losses`` maps each head ("A", "B") to its training loss per sub-head, [S] each.

    ``ev.mi`` (per sub-head) is the lambda=1 mutual information of head B on held-out pairs: the
    label-free criterion that chooses ``ev.best`` among the sub-heads and ranks the trials of a
    search. ``heldout_loss`` is the lambda_B loss on those pairs (``iid evaluate``'s loss).
    """
    best = ev.best
    out = {
        "epoch": epoch,
        "epochs_done": epoch + 1,
        "best_subhead": best,
        "loss_b": float(losses["B"][best]),
        "loss_a": float(losses["A"].mean()),  # over head A's sub-heads
        "mi": float(ev.mi[best]),
        "heldout_loss": float(ev.losses[best]),
    }
    out |= {f"mi_sub{i}": float(v) for i, v in enumerate(ev.mi)}
    out |= {f"heldout_loss_sub{i}": float(v) for i, v in enumerate(ev.losses)}
    out |= {f"mass_{k}": float(m) for k, m in enumerate(ev.masses[best])}
    if len(ev.agreement) > 1:  # mean NMI with the other sub-heads (label-free)
        out |= {"agreement": float(ev.agreement[best])}
        out |= {f"agreement_sub{i}": float(v) for i, v in enumerate(ev.agreement)}
    for i, s in enumerate(ev.scores):
        if s is None:  # no labelled pixel: ACC, NMI and ARI have nothing to compare with
            continue
        out |= {f"acc_sub{i}": s.acc, f"nmi_sub{i}": s.nmi, f"ari_sub{i}": s.ari}
        out |= {f"miou_sub{i}": s.miou}
        if i == best:
            out |= {"acc": s.acc, "nmi": s.nmi, "ari": s.ari, "miou": s.miou}
    return out


# ------------------------------------------------------------------------------- the driver
def start_ray(dashboard: bool = True) -> None:
    """Join the cluster ``RAY_ADDRESS`` names, or start a local one on loopback (the default,
    ``pipeline.loopback``); callers check the address first (``check_cluster``), before
    anything else starts.

    Args:
        dashboard: start a local cluster with its dashboard (Ray Train needs its state API;
            batch inference does not, and saves its processes' memory).
    """
    import ray
    import ray.data

    from pipeline.loopback import join_cluster, start_local

    # Ray's own lines (its start-up notice, the token-authentication warning, Ray Data's
    # execution plans) only where the user asked for them (-vv): `import ray` sets its logger
    # to INFO whatever was set before.
    own = os.environ.get(THIRD_PARTY_LOGS) == "1"
    _quiet_ray_logs(own)
    if not own:  # before ray.init starts the listener that prints the raylet's messages
        _drop_worker_count_notice()
    if not ray.is_initialized():
        # Workers' log lines (Ray Data progress bars, controller notices) reach the terminal
        # only with -v; a failure still arrives as the exception fit() raises.
        verbose = logging.getLogger("pipeline").isEnabledFor(logging.INFO)
        options = {"logging_level": logging.INFO if own else logging.WARNING}
        options["log_to_driver"] = verbose
        if os.environ.get("RAY_ADDRESS"):
            join_cluster(os.environ["RAY_ADDRESS"])
            ray.init(**options)
        else:
            # The dashboard serves the state API: without it Ray Train's placement-group
            # cleaner cannot see that a Tune trial's controller died, and the trial's CPUs
            # are never released (the next trial then waits forever on a small machine).
            # More logical CPUs than cores: Ray Data's read tasks must not wait behind workers.
            start_local(dashboard, num_cpus=max(4, os.cpu_count() or 1), **options)
    _quiet_ray_logs(own)  # ray.init may have set up its handlers afresh
    ray.data.DataContext.get_current().enable_progress_bars = False


def _quiet_ray_logs(own: bool) -> None:
    if own:
        return
    for name in ("ray", "ray.data", "ray.train"):
        logger = logging.getLogger(name)
        if name == "ray":
            logger.setLevel(logging.WARNING)
        for handler in logger.handlers:
            if _ray_notices not in handler.filters:
                handler.addFilter(_ray_notices)


# The raylet's notice, printed by every driver of the node, that it has started more worker
# processes than it has cores: a search's trials, Train controllers and Ray Data actors are
# all processes by design.
WORKER_COUNT_NOTICE = "worker processes have been started on node"


def _drop_worker_count_notice() -> None:
    from ray._private import worker

    # The driver's listener prints every message the raylet publishes through this function,
    # straight to stdout (no logger to filter, no switch); other messages (a worker killed
    # for memory) still pass.
    show = worker.print_to_stdstream
    if getattr(show, "iid_filtered", False):
        return

    def filtered(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            lines = [ln for ln in data.get("lines", []) if WORKER_COUNT_NOTICE not in ln]
            if not lines:
                return
            data = {**data, "lines": lines}
        show(data, ignore_prefix)

    filtered.iid_filtered = True
    worker.print_to_stdstream = filtered


def _ray_notices(record: logging.LogRecord) -> bool:
    """False for Ray's INFO lines and for its notices that say nothing a user of this project
    must act on (warnings only by Ray's own standard); all of them are kept with -vv."""
    text = record.getMessage()
    # Tune's "Failed to fetch metrics": a trial's result.json not yet written when the search
    # ends; the summary reads each trial's last result, not those files.
    notices = (
        "Token authentication is enabled",
        "Progress bars disabled",
        "Failed to fetch metrics",
    )
    notice = text.startswith(notices)
    return record.levelno >= logging.WARNING and not notice


def ray_target() -> str:
    """What ``start_ray`` starts or joins, in words for a progress line."""
    return os.environ.get("RAY_ADDRESS") or "a local Ray cluster"


def check_cluster(wait_s: float = 30.0) -> None:
    """The cluster ``RAY_ADDRESS`` names answers (within ``wait_s``: it may be starting) and
    accepts this process's authentication token (``pipeline.loopback.check_token``).

    Ray itself retries an address that nothing listens on for minutes. Addresses that are not
    ``host:port`` (``auto``, unset) are left to Ray.

    Raises:
        ConfigError: one line naming the address.
    """
    address = os.environ.get("RAY_ADDRESS", "")
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not (sep and host and port.isdigit()):
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            break
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"RAY_ADDRESS: no Ray cluster answers at {address} "
                    f"({err.strerror or err}, for {wait_s:.0f} s); start it (`ray start "
                    "--head`) or unset RAY_ADDRESS to train on a local cluster"
                ) from err
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    if not address.startswith("ray://"):  # a Ray Client server is not the GCS
        from pipeline.loopback import check_token, join_cluster

        join_cluster(address)
        check_token(address, timeout_s=min(wait_s, 10.0))


def make_job(
    cfg: Config,
    inputs: TrainInputs,
    uri: str,
    run_id: str,
    eval_pairs: PairConfig | None = None,
    progress_file: str = "",
) -> Job:
    """The job of a run: ``cfg`` and what ``training_inputs`` found, logging to ``run_id``;
    ``eval_pairs`` (default ``cfg.pairs``) draws the held-out pairs of the per-epoch MI, and
    rank 0 leaves each epoch's metrics in ``progress_file`` (if given)."""
    return Job(
        progress_file=progress_file,
        config=cfg,
        classes=tuple(inputs.classes),
        lut=tuple(int(v) for v in inputs.lut),
        tracking_uri=uri,
        run_id=run_id,
        eval_pairs=eval_pairs or cfg.pairs,
    )


def launch(job: Job, inputs: TrainInputs, callbacks: Sequence = ()) -> Result:
    """Train (or resume) one run with a ``TorchTrainer``: its datasets, scaling, storage
    (``run.storage_path/run.name``) and failure handling.

    Args:
        job: what the workers receive.
        inputs: the shards' files (``training_inputs``).
        callbacks: Ray Train callbacks (a Tune trial passes ``TuneReportCallback``).

    Raises:
        NonFiniteLossError, RuntimeError: a worker failed for good; one line.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline import loopback

    cfg = job.config
    if cfg.data.pairs_on == "actors":
        train_ds = pair_dataset(
            inputs.train_files,
            cfg.pairs,
            actors=cfg.scaling.pair_actors,
            batch_size=cfg.data.batch_size,
            num_cpus=cfg.scaling.pair_cpus,
            seed=cfg.run.seed,
            lo=cfg.data.band_lo,
            hi=cfg.data.band_hi,
        ).select_columns(["x", "gx", "inverse", "mask", "label"])
    else:
        train_ds = rows(inputs.train_files, cfg.data.materialize, deal_seed=cfg.run.seed)
    resources = {"CPU": cfg.scaling.cpus_per_worker} | ({"GPU": 1} if cfg.scaling.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        torch_config=loopback.torch_config(),
        train_loop_config=job.to_dict(),
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
        datasets={"train": train_ds, "eval": rows(inputs.eval_files, cfg.data.materialize)},
        # Every worker sees the whole evaluation split and scores its share of the batches
        # (shard_batches' ``part``): a split would drop rows to give the workers equal shares.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    try:
        return trainer.fit()
    except SystemExit as err:
        # Ray Train's own SIGINT handler aborts the run's controller, then exits: a Ctrl-C.
        raise KeyboardInterrupt from err
    except ray.train.TrainingFailedError as err:
        raise _worker_error(err) from err


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


class EpochLines:
    """One line per trained epoch on the driver, while ``fit`` trains: rank 0 leaves the
    metrics of every epoch so far in the run folder (``PROGRESS_FILE``), a thread here prints
    those it has not printed yet. Before that, a line when the workers have started, and one
    after ``WAIT_LINE_S`` seconds if they have not (Ray Train starts processes that import
    torch: tens of seconds on a small machine).

    Args:
        run_dir: the run folder.
        epochs: the run's epoch count.
        say: where the lines go.
    """

    def __init__(self, run_dir: str, epochs: int, say: Callable[[str], None]):
        self.file, self.epochs, self.say = storage.join(run_dir, PROGRESS_FILE), epochs, say
        doc = self._progress()
        self.seen = max((int(m["epoch"]) for m in doc.get("epochs", [])), default=-1)
        self.announced = False
        if "started" in doc:  # a former launch's: this one's workers have not started yet
            storage.write_json_atomic(self.file, {"epochs": doc["epochs"]})
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.trained: list[float] = []
        self.began, self.waited = time.monotonic(), False

    def __enter__(self) -> EpochLines:
        self.began = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._poll()  # the last epoch, if the thread had not seen it yet

    def _progress(self) -> dict:
        try:
            doc = json.loads(storage.read_text(self.file))
            return doc if isinstance(doc, dict) and isinstance(doc.get("epochs"), list) else {}
        except (OSError, ValueError):
            return {}  # not written yet

    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            self._poll()

    def _poll(self) -> None:
        doc = self._progress()
        waited = time.monotonic() - self.began
        if not (self.announced or self.waited or self.trained) and waited >= WAIT_LINE_S:
            self.waited = True
            self.say(f"waiting for Ray Train to start the workers ({waited:.0f} s so far)")
        if "started" in doc and not self.announced:
            self.announced = True
            self.say(
                f"{doc.get('workers', 1)} worker(s) ready: training epoch {doc['started'] + 1}"
                f"/{self.epochs}"
            )
        for m in doc.get("epochs", []):
            if m["epoch"] > self.seen:
                self._say(m)

    def _say(self, m: dict) -> None:
        self.seen = m["epoch"]
        seconds = sum(v for k, v in m.items() if k.startswith("seconds_"))
        self.trained.append(seconds)
        left = (self.epochs - m["epoch"] - 1) * sum(self.trained) / len(self.trained)
        scores = (
            f", ACC {m['acc']:.3f} mIoU {m.get('miou', float('nan')):.3f}" if "acc" in m else ""
        )
        self.say(
            f"epoch {m['epoch'] + 1}/{self.epochs}: loss A {m.get('loss_a', float('nan')):.4f} "
            f"B {m['loss_b']:.4f}, held-out MI {m['mi']:.4f}{scores}, {seconds:.1f} s"
            + (f", about {left:.0f} s left" if left > 0 else "")
        )


def preflight(cfg: Config, extend: bool) -> tuple[TrainInputs, str, str, dict | None]:
    """Every check ``fit`` makes before it starts anything: the shards against the config, the
    tracking store, the run folder's config, the cluster address (unless the run is finished).

    Returns:
        (the shards' inputs, with the fitted config; the tracking URI; the run folder; the
        report of a run that has already finished, else None).

    Raises:
        ConfigError, PrepareError: one line naming the key or file.
    """
    inputs = training_inputs(cfg)
    cfg = inputs.config
    uri = tracking.resolve_uri(cfg.run.tracking_uri)
    tracking.check_reachable(uri)
    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
    check_resumable(cfg, run_dir, extend)
    report = finished(cfg, run_dir)
    if report is None:
        check_cluster()
    return inputs, uri, run_dir, report


def fit(cfg: Config, extend: bool = False, say: Callable[[str], None] | None = None) -> Result:
    """Train (or resume) a run, then report on its final checkpoint; returns the Ray Train
    result. A run that has already trained every epoch and reported is not started again: its
    result is rebuilt from its report, and Ray is not started.

    Args:
        cfg: the run's config.
        extend: a finished run may be trained further (``optim.epochs`` may grow).
        say: where a line per trained epoch goes (none if None).

    Raises:
        ConfigError, PrepareError: bad config or shards, a config that differs from the one the
            run was started with, or an unreachable tracking store, all before Ray starts.
    """
    inputs, uri, run_dir, report = preflight(cfg, extend)
    cfg = inputs.config  # fitted to the shards: band count, input stretch
    with run_lock(cfg, run_dir) as killed:
        # The MLflow run is created here, before any worker starts (SQLite schema races), and
        # reused when the same run name is trained again.
        progress = storage.join(storage.absolute(run_dir), PROGRESS_FILE)
        job = make_job(cfg, inputs, uri, tracking.run_for(uri, cfg, run_dir), None, progress)
        tracking.log_dataset(uri, job.run_id, cfg.data.shards, inputs.manifest)
        if killed:
            tracking.mark_killed_driver(uri, job.run_id, killed)
        if report is not None:
            tracking.set_status(uri, job.run_id, "FINISHED")
            return _finished_result(report, run_dir)
        note = f"resumed after its driver was killed ({killed})" if killed else ""
        tracking.set_status(uri, job.run_id, "RUNNING", note)
        try:
            if say:
                where = ray_target()
                say(f"run {cfg.run.name}: {run_state(cfg, run_dir, None)}; starting {where}")
            start_ray()
            if say:
                say(f"Ray ready; starting {cfg.scaling.num_workers} training worker(s)")
            lines = EpochLines(run_dir, cfg.optim.epochs, say) if say else contextlib.nullcontext()
            with lines:
                result = launch(job, inputs)
            tracking.mark_finished(uri, job.run_id)
            if result.checkpoint is not None:
                finish_run(job, result.checkpoint, run_dir)
        except KeyboardInterrupt:
            tracking.set_status(uri, job.run_id, "KILLED", "interrupted (Ctrl-C)")
            raise
        except BaseException as err:
            tracking.set_status(uri, job.run_id, "FAILED", str(err).splitlines()[0][:250])
            raise
        tracking.set_status(uri, job.run_id, "FINISHED")
    return result


@contextlib.contextmanager
def run_lock(cfg: Config, run_dir: str) -> Iterator[str]:
    """Hold ``run_dir/.lock`` while the run trains: two drivers of one run name would log to
    one MLflow record, both register a model and orphan each other's checkpoints.

    Yields:
        The lock line of a driver that was killed holding it ("" if none): its run resumes.

    Raises:
        ConfigError: a driver that may still run holds it (one line naming it).
    """
    try:
        with storage.lock(storage.join(run_dir, LOCK_FILE)) as killed:
            if killed:
                log.warning(
                    "run %s: its last driver was killed (%s); resuming", cfg.run.name, killed
                )
            yield killed
    except storage.LockedError as err:
        raise ConfigError(
            f"run.name: {cfg.run.name!r} is being trained by {err.holder} "
            f"(lock {storage.join(run_dir, LOCK_FILE)}); wait for it, or pick another run.name"
        ) from err


# Keys a resumed run may change: where it runs, not what it trains.
RESUME_FREE = ("scaling.", "run.tracking_uri", "run.storage_path")


def started_config(run_dir: str) -> Config | None:
    """The config a run folder's training was started with (its newest checkpoint's), or None
    when it has no readable checkpoint."""
    if not storage.list_dirs(run_dir, "checkpoint_"):
        return None
    try:
        return Config.from_dict(checkpoint.load(run_dir)["config"])
    except (ConfigError, KeyError):
        return None  # unreadable checkpoints are skipped (or reported) by the resume itself


def check_resumable(cfg: Config, run_dir: str, extend: bool = False) -> None:
    """A run folder with checkpoints resumes only the config it was started with: a resumed
    run would otherwise train on with the old optimiser state while its record, report and
    model described a mix of both.

    Args:
        cfg: the config asked for (fitted to the data, as the checkpoints keep it).
        run_dir: the run folder.
        extend: allow ``optim.epochs`` to grow (training a finished run further on purpose).

    Raises:
        ConfigError: one line listing every key that differs, and what to do instead.
    """
    saved = started_config(run_dir)
    if saved is None:
        return
    old, new = saved.flat(), cfg.flat()
    differ = [k for k in new if old.get(k) != new[k] and not k.startswith(RESUME_FREE)]
    if old.get("data.dtype") == "" and "data.dtype" in differ:  # recorded since: not a change
        differ.remove("data.dtype")
    if extend and "optim.epochs" in differ and new["optim.epochs"] > old["optim.epochs"]:
        differ.remove("optim.epochs")
    if differ:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in differ)
        grow = " (with --extend, optim.epochs may grow)" if not extend else ""
        raise ConfigError(
            f"run.name: run {cfg.run.name!r} in {run_dir} was started with another config "
            f"({changes}); start a new run with --set run.name=NEW, or resume it with the "
            f"config it was started with{grow}"
        )


def finished(cfg: Config, run_dir: str) -> dict | None:
    """The report of a run that has trained every epoch ``cfg`` asks for and reported on its
    final checkpoint (``report.json``), or None."""
    report_file = storage.join(run_dir, "report.json")
    if not storage.is_file(report_file):
        return None
    state = checkpoint.load(run_dir)
    report = json.loads(storage.read_text(report_file))
    done = state["epoch"] + 1 >= cfg.optim.epochs
    return report if done and report.get("epoch") == state["epoch"] else None


def dry_run(cfg: Config, extend: bool = False) -> list[str]:
    """Check everything ``fit`` checks before it starts (config, shards, tracking store, the
    run folder, the cluster address) and say what it would do; starts nothing.

    Raises:
        ConfigError, PrepareError: as ``fit`` would, before starting anything.
    """
    inputs, uri, run_dir, report = preflight(cfg, extend)
    cfg, manifest = inputs.config, inputs.manifest
    tiles = manifest["splits"]
    train = sum(tiles.get(s, {}).get("tiles", 0) for s in cfg.data.train_splits)
    state = run_state(cfg, run_dir, report)
    address = os.environ.get("RAY_ADDRESS", "")
    sc = cfg.scaling
    side = cfg.model.input_size
    rescaled = f" rescaled to {side} px" if side else ""  # clustering: the network's own input
    return [
        f"config: run {cfg.run.name!r}, {cfg.model.task}, {cfg.model.in_channels} bands "
        f"({cfg.data.dtype or 'unknown'} pixels){rescaled}, {cfg.optim.epochs} epochs, "
        f"lr {cfg.optim.lr:g}",
        f"data: {cfg.data.shards}: {train} training tiles ({', '.join(cfg.data.train_splits)}), "
        f"{tiles.get(cfg.data.eval_split, {}).get('tiles', 0)} held out "
        f"({cfg.data.eval_split}), {len(inputs.classes)} classes",
        f"tracking: {uri} (reachable), experiment {cfg.run.experiment!r}",
        f"run folder: {run_dir}: {state}",
        f"cluster: {'RAY_ADDRESS ' + address + ' (answers)' if address else 'a local Ray cluster'}"
        f", {sc.num_workers} workers x {sc.cpus_per_worker:g} CPUs"
        + (" + 1 GPU" if sc.use_gpu else ""),
    ]


def run_state(cfg: Config, run_dir: str, report: dict | None) -> str:
    """What training the run folder would do: new, resume from an epoch, or nothing."""
    if report is not None:
        return f"finished (epoch {report['epoch'] + 1} of {cfg.optim.epochs}): nothing to train"
    if started_config(run_dir) is None:
        return f"new: epochs 1 to {cfg.optim.epochs}"
    first = checkpoint.load(run_dir)["epoch"] + 2
    if first <= cfg.optim.epochs:
        return f"resumes: epochs {first} to {cfg.optim.epochs}"
    return "every epoch trained: reports on its final checkpoint"


def _finished_result(report: dict, run_dir: str) -> Result:
    """The Ray Train result of a finished run, from its report (no Ray started)."""
    from ray.train import Checkpoint, Result

    return Result(
        metrics=report["metrics"],
        checkpoint=Checkpoint(report["checkpoint"]),
        error=None,
        path=run_dir,
        return_value=ALREADY_FINISHED,
    )


def finish_run(job: Job, final: Checkpoint, run_dir: str) -> dict:
    """Evaluate the final checkpoint on the driver and log plots and the registered model,
    once per run; the outcome is kept in ``run_dir/report.json`` for the CLI and for users."""
    cfg, uri = job.config, job.tracking_uri
    report_file = storage.join(run_dir, "report.json")
    # as_directory: the checkpoint itself when local, a download from s3:// or gs://.
    with final.as_directory() as local:
        state = checkpoint.load(local)
    if tracking.report_logged(uri, job.run_id) and storage.is_file(report_file):
        report = json.loads(storage.read_text(report_file))
        if report.get("epoch") == state["epoch"]:  # else: the run was extended since
            return report
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lut, classes = np.asarray(job.lut), list(job.classes)
    ev = evaluate_model(
        model, cfg, cfg.data.shards, [cfg.data.eval_split], lut, len(classes), device=device
    )
    plots = storage.join(run_dir, "plots")
    with storage.staged_dir(plots) as drawn:
        paths = write_plots(ev, classes, state["history"], drawn)
        model_uri = tracking.log_report(
            uri,
            job.run_id,
            cfg,
            model,
            ev.summary(),
            paths,
            info={"subhead": ev.best, "names": matched_names(ev.counts[ev.best], classes)},
        )
    # Where the checkpoint is kept (``final`` may be a temporary download of it).
    name = os.path.basename(final.path.rstrip("/"))
    kept = storage.join(run_dir, name) if storage.is_uri(run_dir) else final.path
    report = {"plots": plots, "model_uri": model_uri, "run_id": job.run_id}
    report |= {"epoch": state["epoch"], "metrics": state["history"][-1]}
    report |= ev.summary() | {"checkpoint": kept, "tracking_uri": uri}
    storage.write_json_atomic(report_file, report)
    return report
