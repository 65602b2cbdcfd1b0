"""Hyperparameter search: a Ray Tune search whose trials are Ray Train runs.

A search (``run_search``) is a ``ray.tune.Tuner`` whose trials each launch a Ray Train run
(``run_trial``: the Train V2 pattern, ``train.launch`` inside the trial with
``TuneReportCallback``), ASHA stopping weak trials after ``grace_period`` epochs, Optuna (or
random search) proposing configs. Trials are ranked without labels by default: ``mi``, the
lambda=1 mutual information of head B on held-out pairs drawn with the *base* config's pairs
(comparable across lambda, T and strength; the training loss is not), among the trials that
trained longest (``rank_trials``). ACC, NMI and ARI are
logged next to it when labels exist, and the summary reports how well the two rankings agree.

On disk, under ``run.storage_path/NAME``: Tune's own state (what ``--resume`` restores),
``search.json`` (the ``SearchRecord``: everything needed to rebuild the search), ``trials/``
(each trial's Train run and checkpoints), and at the end ``trials.csv``, ``best_config.yaml``
and ``plots/``. In MLflow: one parent run for the search and one child run per trial.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.tune
import yaml
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from pipeline import checkpoint, storage, tracking
from pipeline.config import Config, ConfigError, PairConfig, Record
from pipeline.data.format import check_data, fit_to_data, training_inputs
from pipeline.plots import plot_trials
from pipeline.train import (
    THIRD_PARTY_LOGS,
    check_cluster,
    launch,
    make_job,
    ray_target,
    start_ray,
)
from pipeline.tune.space import SearchSpace, parse_space

log = logging.getLogger(__name__)

# All maximised. Label-free: mi, and agreement (the chosen sub-head's mean NMI with the other
# sub-heads, so only with 2 or more).
METRICS = ("mi", "agreement", "acc", "miou", "nmi", "ari")
LABELLED = ("acc", "miou", "nmi", "ari")
SEARCH_FILE = "search.json"
ALGORITHMS = ("optuna", "random")


@dataclass(frozen=True)
class SearchOptions:
    """How a search runs (the ``iid tune`` flags).

    Attributes:
        name: the search's folder under ``run.storage_path`` and its MLflow parent run name.
        num_samples: trials to run (with grid dimensions: samples per grid point).
        max_concurrent: trials running at once.
        metric: what ranks trials (and what ASHA compares): one of METRICS.
        algorithm: ``optuna`` (TPE) or ``random``.
        grace_period: epochs every trial gets before ASHA may stop it.
        reduction_factor: ASHA keeps 1/reduction_factor of the trials at each rung.
    """

    name: str = "search"
    num_samples: int = 8
    max_concurrent: int = 1
    metric: str = "mi"
    algorithm: str = "optuna"
    grace_period: int = 1
    reduction_factor: int = 2

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"--name: {self.name!r} is not a folder name")
        for flag, value in (
            ("--num-samples", self.num_samples),
            ("--max-concurrent", self.max_concurrent),
            ("--grace-period", self.grace_period),
        ):
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{flag}: expected an integer >= 1, got {value!r}")
        if not (isinstance(self.reduction_factor, int) and self.reduction_factor >= 2):
            raise ConfigError(
                f"--reduction-factor: expected an integer >= 2, got {self.reduction_factor!r}"
            )
        if self.metric not in METRICS:
            raise ConfigError(f"--metric: {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"--search: {self.algorithm!r} is not one of {', '.join(ALGORITHMS)}")

    @classmethod
    def resolve(
        cls, name: str, sized: dict[str, object], flags: dict[str, object], source: str
    ) -> SearchOptions:
        """The options a space file is sized for (its ``search`` section), then the flags the
        user gave, which win.

        Raises:
            ConfigError: a bad value, naming the file's key or the flag.
        """
        try:
            cls(name=name, **sized)
        except ConfigError as err:
            msg = str(err)
            for key, flag in FLAGS.items():
                if msg.startswith(f"{flag}:"):
                    msg = f"search.{key}{msg[len(flag) :]}"
            raise ConfigError(f"{source}: {msg}") from err
        return cls(name=name, **(sized | flags))


# The flag that sets each option, for errors about a space file's search section.
FLAGS = {
    "num_samples": "--num-samples",
    "max_concurrent": "--max-concurrent",
    "grace_period": "--grace-period",
    "reduction_factor": "--reduction-factor",
    "metric": "--metric",
    "algorithm": "--search",
}


@dataclass(frozen=True)
class TrialRow:
    """One trial in the summary: its sampled values and its last reported metrics."""

    trial_id: str
    params: dict[str, Any]
    epochs: int
    status: str  # "done", "stopped early" (ASHA) or "error: ..."
    metrics: dict[str, float]
    run_id: str = ""


@dataclass(frozen=True)
class SearchOutcome:
    rows: list[TrialRow]
    best: TrialRow | None
    metric: str
    spearman: float  # rank correlation of mi and acc across trials (nan without labels)
    best_config: str | None  # where best_config.yaml was written (a path or a storage URI)
    folder: str
    parent_run_id: str
    tracking_uri: str


@dataclass(frozen=True)
class SearchRecord(Record):
    """Everything needed to rebuild a search: its ``search.json``.

    Attributes:
        options: how it searches.
        base: the user's base config dict (YAML plus overrides), paths as written.
        resolved: ``base`` as a full config dict, local paths absolute and the tracking URI set:
            what every trial starts from (trials run in their own folders).
        space: the search space file's content.
        tracking_uri: the MLflow store of the parent and child runs.
        folder: ``run.storage_path/NAME``, absolute.
        parent_run_id: the search's MLflow run.
    """

    options: SearchOptions
    base: dict
    resolved: dict
    space: dict
    tracking_uri: str
    folder: str
    parent_run_id: str

    def eval_pairs(self, manifest: dict) -> PairConfig:
        """The base config's pairs, fitted to the dataset of ``manifest``: every trial's
        held-out MI is measured on them."""
        return fit_to_data(Config.from_dict(self.resolved), manifest).pairs


def _resolved(base: dict, uri: str) -> dict:
    """The base config with every local path absolute: trials run in their own folders."""
    out = {k: dict(v) for k, v in base.items()}
    for section, key in (("data", "shards"), ("run", "storage_path")):
        value = str(out.get(section, {}).get(key, ""))
        if value:
            out[section][key] = storage.absolute(value)
    out.setdefault("run", {})["tracking_uri"] = uri
    return out


def run_search(
    base: dict, raw_space: dict, opts: SearchOptions, space_source: str = "space"
) -> SearchOutcome:
    """Validate everything, then run a new search to the end.

    Args:
        base: the base config dict (YAML plus overrides); the trials' configs differ from it
            only in the searched paths (and their run names).
        raw_space: the search space file's content.
        opts: how to search.
        space_source: the space file's name, for errors.

    Raises:
        ConfigError: bad config, space or options, missing shards, an existing search of that
            name, or an unreachable tracking store; all before any trial starts.
    """
    cfg = Config.from_dict(base)
    manifest = training_inputs(cfg).manifest  # the shards' checks, before anything starts
    space = parse_space(
        raw_space, cfg.to_dict(), space_source, check=lambda trial: check_data(trial, manifest)
    )
    if opts.algorithm == "optuna" and any(d.kind == "grid" for d in space.dims):
        raise ConfigError(
            f"{space_source}: grid dimensions need --search random (Optuna samples, it does "
            "not enumerate a grid); or use choice"
        )
    if opts.metric in LABELLED and not _has_labels(cfg, manifest):
        raise ConfigError(
            f"--metric {opts.metric}: the eval split {cfg.data.eval_split!r} of "
            f"{cfg.data.shards} has no labels; rank by mi instead"
        )
    if opts.metric == "agreement":
        fewest = min(
            [cfg.model.n_subheads]
            + [int(v) for d in space.dims if d.path == "model.n_subheads" for v in d.values]
        )
        if fewest < 2:
            raise ConfigError(
                f"--metric agreement: needs model.n_subheads >= 2 in every trial (it is a "
                f"sub-head's agreement with the others), got {fewest}"
            )
    uri = tracking.resolve_uri(cfg.run.tracking_uri)
    tracking.check_reachable(uri)
    check_cluster()
    folder = storage.join(storage.absolute(cfg.run.storage_path), opts.name)
    if storage.is_file(storage.join(folder, SEARCH_FILE)):
        raise ConfigError(
            f"--name: a search {opts.name!r} exists in {folder}; continue it with "
            f"`iid tune --resume {folder}` or choose another --name"
        )
    # The parent run's params: options, the space and the base config's unsearched values.
    params = {f"search.{k}": v for k, v in dataclasses.asdict(opts).items()}
    params |= {f"space.{d.path}": f"{d.kind}{list(d.values)}" for d in space.dims}
    params |= {k: v for k, v in cfg.flat().items() if k not in space.paths}
    params["search.folder"] = folder
    record = SearchRecord(
        options=opts,
        base=base,
        resolved=_resolved(cfg.to_dict(), uri),
        space=raw_space,
        tracking_uri=uri,
        folder=folder,
        parent_run_id=tracking.create_search_run(uri, cfg.run.experiment, opts.name, params),
    )
    storage.write_json_atomic(storage.join(folder, SEARCH_FILE), record.to_dict())
    log.info(
        "search %s: %d trial(s), %d at a time, ranked by %s; starting %s",
        opts.name,
        opts.num_samples,
        opts.max_concurrent,
        opts.metric,
        ray_target(),
    )
    start_ray()
    _tune_settings()
    return summarise(record, _new_tuner(record, space).fit())


def _new_tuner(record: SearchRecord, space: SearchSpace):
    """The Tuner of a search that has not started (or was killed before Tune saved a state)."""
    cfg, opts = Config.from_dict(record.base), record.options
    return ray.tune.Tuner(
        _trainable(record),
        param_space=space.to_ray(),
        tune_config=ray.tune.TuneConfig(
            metric=opts.metric,
            mode="max",
            num_samples=opts.num_samples,
            max_concurrent_trials=opts.max_concurrent,
            scheduler=ASHAScheduler(
                time_attr="epochs_done",
                max_t=cfg.optim.epochs,
                grace_period=min(opts.grace_period, cfg.optim.epochs),
                reduction_factor=opts.reduction_factor,
            ),
            search_alg=_search_algorithm(opts.algorithm, cfg.run.seed),
        ),
        run_config=ray.tune.RunConfig(
            name=opts.name,
            storage_path=record.folder.rstrip("/").rsplit("/", 1)[0],  # the folder's parent
            callbacks=[Progress(opts.num_samples)],
            verbose=0,
            failure_config=ray.tune.FailureConfig(max_failures=0),
        ),
    )


def resume_search(path: str | Path) -> SearchOutcome:
    """Continue an interrupted search: finished trials are kept, unfinished ones resume from
    their last Train checkpoint, and trials never started are started.

    Raises:
        ConfigError: ``path`` is not a search folder.
    """
    folder = storage.absolute(str(path).rstrip("/"))
    try:
        record = SearchRecord.from_dict(
            json.loads(storage.read_text(storage.join(folder, SEARCH_FILE)))
        )
    except FileNotFoundError as err:
        raise ConfigError(
            f"--resume {path}: no {SEARCH_FILE}; expected the folder `iid tune` printed "
            "(run.storage_path/NAME)"
        ) from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{folder}/{SEARCH_FILE}: not valid JSON ({err.msg})") from err
    tracking.check_reachable(record.tracking_uri)
    check_cluster()
    log.info("search %s: resuming it; starting %s", record.options.name, ray_target())
    start_ray()
    _tune_settings()
    if ray.tune.Tuner.can_restore(folder):
        tuner = ray.tune.Tuner.restore(folder, _trainable(record), resume_unfinished=True)
    else:
        # Killed after search.json but before Tune saved its first state: nothing of it ran
        # to a record, so it starts from search.json as it would have.
        log.info("search %s: no Tune state yet; starting it from %s", folder, SEARCH_FILE)
        space = parse_space(record.space, Config.from_dict(record.base).to_dict(), SEARCH_FILE)
        tuner = _new_tuner(record, space)
    return summarise(record, tuner.fit())


def _has_labels(cfg: Config, manifest: dict) -> bool:
    split = manifest["splits"].get(cfg.data.eval_split, {})
    return sum(split.get("class_pixels", [])) > 0


def _tune_settings() -> None:
    # Tune saves its state every >= 10 s by default; a driver killed just after a trial ended
    # would then forget it. The state is small: save it every 2 s.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    if os.environ.get(THIRD_PARTY_LOGS) != "1":
        # Tune's new output engine prints its experiment box and TensorBoard hint even at
        # verbose=0; the old one prints nothing there. Our own lines are Progress's.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def _search_algorithm(name: str, seed: int):
    if name == "random":
        return BasicVariantGenerator(random_state=seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # Optuna sets its own logger to INFO with its own handler ("A new study created").
    own = os.environ.get(THIRD_PARTY_LOGS) == "1"
    optuna.logging.set_verbosity(logging.INFO if own else logging.WARNING)
    return OptunaSearch(seed=seed)


def _trainable(record: SearchRecord):
    # The trial's driver function only waits on its TorchTrainer: a sliver of a CPU, so the
    # training workers (scaling.*) get the cores.
    return ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, search=record), {"CPU": 0.05}
    )


def trial_config(record: SearchRecord, sample: dict[str, Any], trial_id: str) -> Config:
    """A trial's config: the resolved base, the sampled values, its own run name and folder."""
    base = {k: dict(v) for k, v in record.resolved.items()}
    base["run"] |= {
        "name": f"{record.options.name}-{trial_id}",
        "storage_path": storage.join(record.folder, "trials"),
    }
    space = parse_space(record.space)
    return space.apply(base, {k: v for k, v in sample.items() if k in space.paths})


def run_trial(config: dict, search: SearchRecord) -> None:
    """One trial (runs inside a Tune trial actor): a Ray Train run of the sampled config whose
    per-epoch reports reach Tune (and ASHA) through ``TuneReportCallback``."""
    import ray.data
    from ray.tune.integration.ray_train import TuneReportCallback

    ray.data.DataContext.get_current().enable_progress_bars = False  # per process
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(search, config, trial_id)
    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
    done = _finished_history(run_dir, cfg.optim.epochs)
    if done:
        # Trained to the end before the search was interrupted: report again, never retrain.
        ray.tune.report(done[-1])
        return
    tags = {
        "mlflow.parentRunId": search.parent_run_id,
        "iid.search": search.options.name,
        "iid.trial_id": trial_id,
    }
    inputs = training_inputs(cfg)
    cfg = inputs.config  # fitted to the shards: band count, input stretch
    run_id = tracking.run_for(search.tracking_uri, cfg, run_dir, tags)
    pairs = search.eval_pairs(inputs.manifest)
    job = make_job(cfg, inputs, search.tracking_uri, run_id, pairs)
    # Tune ends this actor as soon as the last epoch is reported (or ASHA stops the trial), so
    # nothing after launch() is sure to run: the driver closes the child runs in summarise().
    launch(job, inputs, callbacks=[TuneReportCallback()])


def _finished_history(run_dir: str, epochs: int) -> list[dict]:
    """The epoch history of a trial's newest checkpoint if it reached the last epoch, else []."""
    checkpoints = storage.list_dirs(run_dir, "checkpoint_")  # names sort by time
    if not checkpoints:
        return []
    try:
        state = checkpoint.load(checkpoints[-1])
    except Exception:  # noqa: BLE001 - a half-written newest checkpoint: let Train resume
        return []
    return state["history"] if state["epoch"] + 1 >= epochs else []


class Progress(ray.tune.Callback):
    """One log line per trial epoch and per ended trial, with how many of ``total`` have ended
    (``iid tune`` shows them)."""

    def __init__(self, total: int = 0):
        self.total = total

    def _ended(self, trials, trial) -> str:
        # Counted from Tune's own list, so a resumed search counts the trials it restored.
        ended = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        return f"{ended} of {self.total} trials ended" if self.total else f"{ended} ended"

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        log.info(
            "trial %s epoch %s: %s",
            trial.trial_id,
            result.get("epochs_done", "?"),
            _fmt_metrics(result),
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        log.info("trial %s finished (%s)", trial.trial_id, self._ended(trials, trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        log.warning(
            "trial %s failed (see its error.txt under %s; %s)",
            trial.trial_id,
            trial.path,
            self._ended(trials, trial),
        )


def _fmt_metrics(m: dict) -> str:
    return " ".join(f"{k} {m[k]:.4f}" for k in METRICS if isinstance(m.get(k), (int, float)))


# -------------------------------------------------------------------------- summarising
def summarise(record: SearchRecord, grid) -> SearchOutcome:
    """Rows of every trial, the best by the search metric, and the outputs: ``trials.csv``,
    ``best_config.yaml``, plots, the child runs' final tags and the parent run's summary."""
    opts, uri, folder = record.options, record.tracking_uri, record.folder
    epochs = int(record.resolved["optim"]["epochs"])
    children = tracking.trial_runs(uri, record.parent_run_id)
    space = parse_space(record.space)
    rows = [_row(r, space, epochs, children) for r in grid]
    rows = rank_trials(rows, opts.metric)
    ranked = [r for r in rows if math.isfinite(r.metrics.get(opts.metric, math.nan))]
    best = ranked[0] if ranked else None
    spearman = rank_correlation(rows, "mi", "acc")
    best_config = None
    if best is not None:
        best_config = write_best_config(record, best, storage.join(folder, "best_config.yaml"))
    _write_csv(rows, space, storage.join(folder, "trials.csv"))
    for row in rows:
        if row.run_id:
            tracking.close_trial_run(uri, row.run_id, row.epochs, row.status)
    outcome = SearchOutcome(
        rows, best, opts.metric, spearman, best_config, folder, record.parent_run_id, uri
    )
    trials = [(r.params, r.metrics, r.status == "stopped early") for r in rows]
    with storage.staged_dir(storage.join(folder, "plots")) as out:
        _log_parent(outcome, plot_trials(trials, space.dims, out))
    return outcome


def rank_trials(rows: list[TrialRow], metric: str) -> list[TrialRow]:
    """Best first: the trials that trained the most epochs, each group by ``metric``; trials
    without the metric last.

    Trials are compared at equal budgets: a trial ASHA stopped at an earlier rung lost there
    to the ones it promoted, and its metric at that budget does not compare with theirs at a
    later one (a label-free criterion can favour a trial that has not taken off yet).
    """

    def key(row: TrialRow) -> tuple[int, float]:
        value = row.metrics.get(metric, math.nan)
        return (row.epochs, value) if math.isfinite(value) else (-1, -math.inf)

    return sorted(rows, key=key, reverse=True)


def _row(result, space: SearchSpace, epochs: int, children: dict[str, str]) -> TrialRow:
    m = result.metrics or {}
    trial_id = str(m.get("trial_id") or Path(result.path).name)
    done = int(m.get("epochs_done", 0))
    if result.error is not None:
        status = "error: " + str(result.error).strip().splitlines()[-1][:120]
    elif done < epochs:
        status = "stopped early"
    else:
        status = "done"
    metrics = {k: float(m[k]) for k in METRICS if isinstance(m.get(k), (int, float))}
    params = {d.path: result.config.get(d.path) for d in space.dims}
    return TrialRow(trial_id, params, done, status, metrics, children.get(trial_id, ""))


def rank_correlation(rows: list[TrialRow], a: str, b: str) -> float:
    """Spearman's rho of two metrics across trials (nan with fewer than 3 trials having both)."""
    from scipy.stats import spearmanr

    pairs = [(r.metrics[a], r.metrics[b]) for r in rows if a in r.metrics and b in r.metrics]
    pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    xs, ys = zip(*pairs, strict=True)
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return math.nan
    return float(spearmanr(xs, ys).statistic)


def write_best_config(record: SearchRecord, best: TrialRow, path: str | Path) -> str:
    """The user's base config with the best trial's values, as YAML for ``iid train --config``.

    Paths stay as the user wrote them; the run gets its own name, so training it does not
    collide with the trials.
    """
    base = {k: dict(v) for k, v in record.base.items()}
    base.setdefault("run", {})["name"] = f"{record.options.name}-best"
    cfg = parse_space(record.space).apply(base, best.params)
    plain = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists for YAML
    scores = _fmt_metrics(best.metrics)
    header = (
        f"# Best trial {best.trial_id} of search {record.options.name} by "
        f"{record.options.metric} ({scores}, {best.epochs} epochs).\n"
        f"# Train it: iid train --config {path}\n"
    )
    storage.write_text_atomic(path, header + yaml.safe_dump(plain, sort_keys=False))
    return str(path)


def _write_csv(rows: list[TrialRow], space: SearchSpace, path: str) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    paths = [d.path for d in space.dims]
    writer.writerow(["trial", *paths, "epochs", "status", *METRICS, "mlflow_run"])
    for r in rows:
        writer.writerow(
            [r.trial_id, *(r.params[p] for p in paths), r.epochs, r.status]
            + [r.metrics.get(k, "") for k in METRICS]
            + [r.run_id]
        )
    storage.write_text_atomic(path, buf.getvalue())


def format_table(outcome: SearchOutcome) -> str:
    """The trials as an aligned text table, best first, and the chosen trial."""
    rows = outcome.rows
    paths = list(rows[0].params) if rows else []
    head = ["trial", *paths, "epochs", "status", *METRICS]
    body = [
        [r.trial_id, *(_fmt(r.params[p]) for p in paths), str(r.epochs), r.status[:40]]
        + [_fmt(r.metrics.get(k)) for k in METRICS]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True))
        for line in [head, *body]
    ]
    if outcome.best is not None:
        lines.append(
            f"chosen by {outcome.metric} among the trials that trained longest: trial "
            f"{outcome.best.trial_id} ({outcome.best.epochs} epochs; "
            f"{_fmt_metrics(outcome.best.metrics)})"
        )
    lines.append(
        f"rank correlation of mi and acc across trials (Spearman): {_fmt(outcome.spearman)}"
    )
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _log_parent(outcome: SearchOutcome, plots: list[Path]) -> None:
    """The search's outcome in its MLflow parent run."""
    folder = outcome.folder
    texts = {
        name: storage.read_text(storage.join(folder, name))
        for name in ("trials.csv", "best_config.yaml")
        if storage.is_file(storage.join(folder, name))
    }
    texts["summary.txt"] = format_table(outcome)
    metrics = {
        "trials": len(outcome.rows),
        "trials_stopped_early": sum(r.status == "stopped early" for r in outcome.rows),
        "trials_failed": sum(r.status.startswith("error") for r in outcome.rows),
    }
    if math.isfinite(outcome.spearman):
        metrics["spearman_mi_acc"] = outcome.spearman
    tags = {}
    if outcome.best is not None:
        metrics |= {f"best_{k}": v for k, v in outcome.best.metrics.items()}
        tags["iid.best_trial"] = outcome.best.trial_id
        if outcome.best.run_id:
            tags["iid.best_run"] = outcome.best.run_id
    tracking.finish_search_run(
        outcome.tracking_uri, outcome.parent_run_id, texts, plots, metrics, tags
    )
