"""Tuning: search spaces over config paths (``tune_spaces/*.yaml``) and the Ray Tune search.

A space file maps config paths to one distribution each::

    params:
      loss.lamb_b:      {loguniform: [1.0, 3.0]}
      loss.half_window: {randint: [3, 10]}       # integers, upper bound inclusive
      pairs.strength:   {uniform: [0.5, 1.5]}
      optim.lr:         {choice: [1.0e-4, 3.0e-4, 1.0e-3]}
      loss.lamb_a:      {grid: [1.0, 1.5]}        # every value, crossed with the samples

Everything is checked before a trial starts: the path must name a config field, the
distribution must be known, a range must be non-empty (and positive for ``loguniform``), every
value must have the field's type, and the range's ends and every listed value must pass the
config's own validation on top of the base config (so ``lamb_b: {uniform: [0, 2]}`` fails here,
not in trial 7).

A search (``run_search``) is a ``ray.tune.Tuner`` whose trials each launch a Ray Train run
(``run_trial``: the Train V2 pattern, a TorchTrainer built inside the trial with
``TuneReportCallback``), ASHA stopping weak trials after ``grace_period`` epochs, Optuna (or
random search) proposing configs. Trials are ranked without labels by default: ``mi``, the
lambda=1 mutual information of head B on held-out pairs drawn with the *base* config's pairs
(comparable across lambda, T and strength; the training loss is not). ACC, NMI and ARI are
logged next to it when labels exist, and the summary reports how well the two rankings agree.

On disk, under ``run.storage_path/NAME``: Tune's own state (what ``--resume`` restores),
``search.json`` (everything needed to rebuild the search), ``trials/`` (each trial's Train run
and checkpoints), and at the end ``trials.csv``, ``best_config.yaml`` and ``plots/``. In MLflow:
one parent run for the search and one child run per trial.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.tune
import yaml
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from pipeline import storage
from pipeline.config import Config, ConfigError, _coerce, read_yaml

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


@dataclass(frozen=True)
class Dimension:
    """One searched config path.

    Attributes:
        path: ``section.field`` in the config tree.
        kind: one of DISTRIBUTIONS.
        values: ``(low, high)`` for ranges, the listed values for ``choice`` and ``grid``.
    """

    path: str
    kind: str
    values: tuple


@dataclass(frozen=True)
class SearchSpace:
    dims: tuple[Dimension, ...]

    def to_ray(self) -> dict[str, Any]:
        """``param_space`` for ``ray.tune.Tuner``, keyed by config path."""
        from ray import tune

        make = {
            "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(v[0], v[1] + 1),  # Ray's upper bound is exclusive
            "choice": lambda v: tune.choice(list(v)),
            "grid": lambda v: tune.grid_search(list(v)),
        }
        return {d.path: make[d.kind](d.values) for d in self.dims}

    def apply(self, base: dict, sample: dict[str, Any]) -> Config:
        """The trial's config: ``base`` (a config dict) with the sampled values set."""
        out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
        for path, value in sample.items():
            section, key = path.split(".", 1)
            out.setdefault(section, {})[key] = value
        return Config.from_dict(out)


def _field_type(path: str) -> object:
    parts = path.split(".")
    hints = typing.get_type_hints(Config)
    if len(parts) != 2 or parts[0] not in hints:
        raise ConfigError(
            f"{path}: not a config path (expected section.key, sections: "
            f"{', '.join(f.name for f in dataclasses.fields(Config))})"
        )
    section = hints[parts[0]]
    fields = typing.get_type_hints(section)
    if parts[1] not in fields:
        raise ConfigError(f"{path}: unknown key (known in {parts[0]}: {', '.join(sorted(fields))})")
    return fields[parts[1]]


def _dimension(path: str, spec: object) -> Dimension:
    tp = _field_type(path)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"{path}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}"
        )
    kind, values = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise ConfigError(
            f"{path}: unknown distribution {kind!r} (known: {', '.join(DISTRIBUTIONS)})"
        )
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{path}: {kind} needs a non-empty list, got {values!r}")
    values = [_coerce(tp, v, path) for v in values]
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2:
            raise ConfigError(f"{path}: {kind} needs [low, high], got {values!r}")
        if kind == "randint" and tp is not int:
            raise ConfigError(f"{path}: randint needs an integer key, {path} is {tp}")
        if kind != "randint" and tp is not float:
            raise ConfigError(f"{path}: {kind} needs a number key, {path} is {tp}")
        low, high = values
        if not low < high:
            raise ConfigError(f"{path}: empty range [{low}, {high}] (need low < high)")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{path}: loguniform needs low > 0, got {low}")
    return Dimension(path, kind, tuple(values))


def parse_space(raw: object, base: dict | None = None, source: str = "space") -> SearchSpace:
    """Validate a space (the YAML's content) and, given the base config dict, every extreme.

    Raises:
        ConfigError: one line naming the file and the path.
    """
    try:
        if not isinstance(raw, dict) or set(raw) != {"params"} or not raw["params"]:
            raise ConfigError(
                "expected a mapping with one key, params: {config.path: {dist: [...]}}"
            )
        if not isinstance(raw["params"], dict):
            raise ConfigError(f"params: expected a mapping, got {raw['params']!r}")
        space = SearchSpace(tuple(_dimension(p, s) for p, s in raw["params"].items()))
        if base is not None:
            for dim in space.dims:
                for value in dim.values:  # a range's ends, every listed value
                    space.apply(base, {dim.path: value})
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    return space


def load_space(path: str | Path, base: dict | None = None) -> SearchSpace:
    """Read and validate ``tune_spaces/NAME.yaml``."""
    path = Path(path)
    raw = read_yaml(path, "search space")
    return parse_space(raw, base, str(path))


# ------------------------------------------------------------------------- running a search
METRICS = ("mi", "acc", "nmi", "ari")  # all maximised; only "mi" needs no labels
LABELLED = ("acc", "nmi", "ari")
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
    from pipeline.prepare.shards import write_json_atomic
    from pipeline.train import check_tracking, default_tracking_uri, start_ray, training_inputs

    cfg = Config.from_dict(base)
    space = parse_space(raw_space, cfg.to_dict(), space_source)
    if opts.algorithm == "optuna" and any(d.kind == "grid" for d in space.dims):
        raise ConfigError(
            f"{space_source}: grid dimensions need --search random (Optuna samples, it does "
            "not enumerate a grid); or use choice"
        )
    training_inputs(cfg)  # the shards' checks, before anything starts
    if opts.metric in LABELLED and not _has_labels(cfg):
        raise ConfigError(
            f"--metric {opts.metric}: the eval split {cfg.data.eval_split!r} of "
            f"{cfg.data.shards} has no labels; rank by mi instead"
        )
    uri = cfg.run.tracking_uri or default_tracking_uri()
    check_tracking(uri)
    folder = storage.join(storage.absolute(cfg.run.storage_path), opts.name)
    if storage.is_file(storage.join(folder, SEARCH_FILE)):
        raise ConfigError(
            f"--name: a search {opts.name!r} exists in {folder}; continue it with "
            f"`iid tune --resume {folder}` or choose another --name"
        )
    record = {
        "options": dataclasses.asdict(opts),
        "base": base,
        "resolved": _resolved(Config.from_dict(base).to_dict(), uri),
        "space": raw_space,
        "tracking_uri": uri,
        "folder": folder,
    }
    record["parent_run_id"] = _parent_run(uri, cfg, opts, space, folder, base)
    write_json_atomic(storage.join(folder, SEARCH_FILE), record)
    start_ray()
    _checkpoint_often()
    tuner = ray.tune.Tuner(
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
            storage_path=storage.absolute(cfg.run.storage_path),
            callbacks=[Progress()],
            verbose=0,
            failure_config=ray.tune.FailureConfig(max_failures=0),
        ),
    )
    return summarise(record, tuner.fit())


def resume_search(path: str | Path) -> SearchOutcome:
    """Continue an interrupted search: finished trials are kept, unfinished ones resume from
    their last Train checkpoint, and trials never started are started.

    Raises:
        ConfigError: ``path`` is not a search folder.
    """
    from pipeline.train import check_tracking, start_ray

    folder = storage.absolute(str(path).rstrip("/"))
    try:
        record = json.loads(storage.read_text(storage.join(folder, SEARCH_FILE)))
    except FileNotFoundError as err:
        raise ConfigError(
            f"--resume {path}: no {SEARCH_FILE}; expected the folder `iid tune` printed "
            "(run.storage_path/NAME)"
        ) from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{folder}/{SEARCH_FILE}: not valid JSON ({err.msg})") from err
    check_tracking(record["tracking_uri"])
    if not ray.tune.Tuner.can_restore(folder):
        raise ConfigError(f"--resume {path}: no Tune state to restore (did the search start?)")
    start_ray()
    _checkpoint_often()
    tuner = ray.tune.Tuner.restore(folder, _trainable(record), resume_unfinished=True)
    return summarise(record, tuner.fit())


def _has_labels(cfg: Config) -> bool:
    from pipeline.prepare.shards import read_manifest

    split = read_manifest(cfg.data.shards)["splits"].get(cfg.data.eval_split, {})
    return sum(split.get("class_pixels", [])) > 0


def _checkpoint_often() -> None:
    # Tune saves its state every >= 10 s by default; a driver killed just after a trial ended
    # would then forget it. The state is small: save it every 2 s.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")


def _search_algorithm(name: str, seed: int):
    if name == "random":
        return BasicVariantGenerator(random_state=seed)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=seed)


def _trainable(record: dict):
    # The trial's driver function only waits on its TorchTrainer: a sliver of a CPU, so the
    # training workers (scaling.*) get the cores.
    return ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, search=record), {"CPU": 0.05}
    )


def trial_config(record: dict, sample: dict[str, Any], trial_id: str) -> Config:
    """A trial's config: the resolved base, the sampled values, its own run name and folder."""
    base = {k: dict(v) for k, v in record["resolved"].items()}
    base["run"] |= {
        "name": f"{record['options']['name']}-{trial_id}",
        "storage_path": storage.join(record["folder"], "trials"),
    }
    space = parse_space(record["space"])
    return space.apply(base, {k: v for k, v in sample.items() if k in base_paths(space)})


def base_paths(space: SearchSpace) -> set[str]:
    return {d.path for d in space.dims}


def run_trial(config: dict, search: dict) -> None:
    """One trial (runs inside a Tune trial actor): a Ray Train run of the sampled config whose
    per-epoch reports reach Tune (and ASHA) through ``TuneReportCallback``."""
    import ray.data
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train import _worker_error, make_trainer, mlflow_run, training_inputs

    ray.data.DataContext.get_current().enable_progress_bars = False  # per process
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(search, config, trial_id)
    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
    done = _finished_history(run_dir, cfg.optim.epochs)
    if done:
        # Trained to the end before the search was interrupted: report again, never retrain.
        ray.tune.report(done[-1])
        return
    uri = search["tracking_uri"]
    tags = {
        "mlflow.parentRunId": search["parent_run_id"],
        "iid.search": search["options"]["name"],
        "iid.trial_id": trial_id,
    }
    run_id = mlflow_run(uri, cfg, run_dir, tags)
    trainer = make_trainer(
        cfg,
        training_inputs(cfg),
        {"uri": uri, "run_id": run_id},
        callbacks=[TuneReportCallback()],
        eval_pairs=Config.from_dict(search["resolved"]).pairs,
    )
    # Tune ends this actor as soon as the last epoch is reported (or ASHA stops the trial), so
    # nothing after fit() is sure to run: the driver closes the child runs in summarise().
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise _worker_error(err) from err


def _finished_history(run_dir: str, epochs: int) -> list[dict]:
    """The epoch history of a trial's newest checkpoint if it reached the last epoch, else []."""
    from pipeline.evaluate import load_checkpoint

    checkpoints = storage.list_dirs(run_dir, "checkpoint_")  # names sort by time
    if not checkpoints:
        return []
    try:
        state = load_checkpoint(checkpoints[-1])
    except Exception:  # noqa: BLE001 - a half-written newest checkpoint: let Train resume
        return []
    return state["history"] if state["epoch"] + 1 >= epochs else []


class Progress(ray.tune.Callback):
    """One log line per trial epoch and per finished trial (``iid tune`` shows them)."""

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        log.info(
            "trial %s epoch %s: %s",
            trial.trial_id,
            result.get("epochs_done", "?"),
            _fmt_metrics(result),
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        log.info("trial %s finished", trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        log.warning("trial %s failed (see its error.txt under %s)", trial.trial_id, trial.path)


def _fmt_metrics(m: dict) -> str:
    return " ".join(f"{k} {m[k]:.4f}" for k in METRICS if isinstance(m.get(k), (int, float)))


# -------------------------------------------------------------------------- summarising
def summarise(record: dict, grid) -> SearchOutcome:
    """Rows of every trial, the best by the search metric, and the outputs: ``trials.csv``,
    ``best_config.yaml``, plots, the child runs' final tags and the parent run's summary."""
    import mlflow

    opts = SearchOptions(**record["options"])
    epochs = int(record["resolved"]["optim"]["epochs"])
    uri, folder = record["tracking_uri"], record["folder"]
    client = mlflow.MlflowClient(uri)
    children = _child_runs(client, record["parent_run_id"])
    space = parse_space(record["space"])
    rows = [_row(r, space, epochs, children) for r in grid]
    rows.sort(key=lambda r: _key(r, opts.metric), reverse=True)
    ranked = [r for r in rows if math.isfinite(r.metrics.get(opts.metric, math.nan))]
    best = ranked[0] if ranked else None
    spearman = rank_correlation(rows, "mi", "acc")
    best_config = None
    if best is not None:
        best_config = write_best_config(record, best, storage.join(folder, "best_config.yaml"))
    _write_csv(rows, space, storage.join(folder, "trials.csv"))
    for row in rows:
        if row.run_id:
            _close_child(client, row)
    outcome = SearchOutcome(
        rows, best, opts.metric, spearman, best_config, folder, record["parent_run_id"], uri
    )
    with storage.staged_dir(storage.join(folder, "plots")) as out:
        _log_parent(client, outcome, space, plot_trials(rows, space, out))
    return outcome


def _key(row: TrialRow, metric: str) -> float:
    value = row.metrics.get(metric, math.nan)
    return value if math.isfinite(value) else -math.inf


def _child_runs(client, parent_run_id: str) -> dict[str, str]:
    """trial id -> MLflow run id of the search's child runs."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=10_000,
    )
    return {
        r.data.tags["iid.trial_id"]: r.info.run_id for r in runs if "iid.trial_id" in r.data.tags
    }


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


def write_best_config(record: dict, best: TrialRow, path: str | Path) -> str:
    """The user's base config with the best trial's values, as YAML for ``iid train --config``.

    Paths stay as the user wrote them; the run gets its own name, so training it does not
    collide with the trials.
    """
    from pipeline.prepare.shards import write_text_atomic

    base = {k: dict(v) for k, v in record["base"].items()}
    base.setdefault("run", {})["name"] = f"{record['options']['name']}-best"
    cfg = parse_space(record["space"]).apply(base, best.params)
    plain = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists for YAML
    scores = _fmt_metrics(best.metrics)
    header = (
        f"# Best trial {best.trial_id} of search {record['options']['name']} by "
        f"{record['options']['metric']} ({scores}, {best.epochs} epochs).\n"
        f"# Train it: iid train --config {path}\n"
    )
    write_text_atomic(path, header + yaml.safe_dump(plain, sort_keys=False))
    return str(path)


def _write_csv(rows: list[TrialRow], space: SearchSpace, path: str) -> None:
    from pipeline.prepare.shards import write_text_atomic

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
    write_text_atomic(path, buf.getvalue())


def plot_trials(rows: list[TrialRow], space: SearchSpace, out: Path) -> list[Path]:
    """One PNG per (metric, searched parameter): the final metric of each trial against the
    parameter's value, trials stopped early drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in ("mi", "acc"):
        if not any(metric in r.metrics for r in rows):
            continue
        for dim in space.dims:
            fig, ax = plt.subplots(figsize=(4.5, 3.2))
            for stopped in (False, True):
                pts = [
                    (r.params[dim.path], r.metrics[metric])
                    for r in rows
                    if metric in r.metrics and (r.status == "stopped early") == stopped
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.scatter(
                        [str(x) if dim.kind in ("choice", "grid") else x for x in xs],
                        ys,
                        facecolors="none" if stopped else "C0",
                        edgecolors="C0",
                        label="stopped early" if stopped else "full run",
                    )
            if dim.kind == "loguniform":
                ax.set_xscale("log")
            ax.set_xlabel(dim.path)
            ax.set_ylabel(metric)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"{metric}_vs_{dim.path}.png"
            tmp = out / f".{path.name}.tmp.png"
            fig.savefig(tmp, dpi=100)
            plt.close(fig)
            tmp.replace(path)
            paths.append(path)
    return paths


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
            f"chosen by {outcome.metric}: trial {outcome.best.trial_id} "
            f"({_fmt_metrics(outcome.best.metrics)})"
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


# ------------------------------------------------------------------------------ MLflow
def _parent_run(
    uri: str, cfg: Config, opts: SearchOptions, space: SearchSpace, folder: str, base: dict
) -> str:
    """The search's MLflow run: options, the space and the base config's unsearched values."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(cfg.run.experiment)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(
        experiment.experiment_id, run_name=opts.name, tags={"iid.kind": "search"}
    )
    searched = base_paths(space)
    params = {f"search.{k}": v for k, v in dataclasses.asdict(opts).items()}
    params |= {f"space.{d.path}": f"{d.kind}{list(d.values)}" for d in space.dims}
    params |= {k: v for k, v in cfg.flat().items() if k not in searched}
    params["search.folder"] = folder
    client.log_batch(
        run.info.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()]
    )
    return run.info.run_id


def _close_child(client, row: TrialRow) -> None:
    # The trial's rank 0 logs every epoch it trains. A trial that ASHA stops may finish (and
    # log) one more epoch while the stop is on its way, which the search does not count: the
    # tag says which epochs the search ranked the trial on.
    client.set_tag(row.run_id, "iid.epochs_counted", str(row.epochs))
    client.set_tag(row.run_id, "iid.stopped_early", str(row.status == "stopped early").lower())
    client.set_tag(row.run_id, "iid.status", row.status)
    client.set_terminated(row.run_id, "FAILED" if row.status.startswith("error") else "FINISHED")


def _log_parent(client, outcome: SearchOutcome, space: SearchSpace, plots: list[Path]) -> None:
    run_id, folder = outcome.parent_run_id, outcome.folder
    for name in ("trials.csv", "best_config.yaml"):
        if storage.is_file(storage.join(folder, name)):
            client.log_text(run_id, storage.read_text(storage.join(folder, name)), name)
    for p in plots:
        client.log_artifact(run_id, str(p), artifact_path="plots")
    client.log_text(run_id, format_table(outcome), "summary.txt")
    metrics = {
        "trials": len(outcome.rows),
        "trials_stopped_early": sum(r.status == "stopped early" for r in outcome.rows),
        "trials_failed": sum(r.status.startswith("error") for r in outcome.rows),
    }
    if math.isfinite(outcome.spearman):
        metrics["spearman_mi_acc"] = outcome.spearman
    if outcome.best is not None:
        metrics |= {f"best_{k}": v for k, v in outcome.best.metrics.items()}
        client.set_tag(run_id, "iid.best_trial", outcome.best.trial_id)
        if outcome.best.run_id:
            client.set_tag(run_id, "iid.best_run", outcome.best.run_id)
    for k, v in metrics.items():
        client.log_metric(run_id, k, float(v))
    client.set_terminated(run_id, "FINISHED")
