"""The checkpoint: one flat dict in one file per Ray Train checkpoint folder, written and read
only here.

Checkpoints are data, never code: they hold tensors, numbers, strings, lists, tuples and dicts
only, and are read with ``torch.load(weights_only=True)``, which refuses anything else (a
checkpoint on shared storage could otherwise run code on every node that resumes or evaluates).

Keys: ``model`` and ``optimizer`` (state dicts), ``epoch`` (the last one trained, from 0),
``history`` (one metrics dict per epoch), ``config`` (``Config.to_dict()``), ``classes``,
``torch_rng`` (the CPU generator's state), ``counts`` (the last epoch's (sub-heads, K, M)
confusion counts) and ``nodes`` (the Ray node id of each worker, by rank).

A trained model (``load_trained``) comes from a checkpoint or from the MLflow registry, with its
answer: head B's chosen sub-head and the class each of its clusters was matched to.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import storage
from pipeline.config import Config, ConfigError, Job
from pipeline.dist import unwrapped
from pipeline.metrics import matched_names
from pipeline.models import build_model
from pipeline.tracking import CONFIG_FILE, WEIGHTS_FILE, ModelFiles, download_model, model_files

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"


def save(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    history: list[dict],
    job: Job,
    counts: torch.Tensor,
    nodes: list[str],
) -> None:
    """Write the checkpoint of the end of the epoch ``history[-1]`` describes into ``folder``
    (of a DDP model, its own module's weights)."""
    torch.save(
        {
            "model": unwrapped(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": history[-1]["epoch"],
            "history": history,
            "config": job.config.to_dict(),
            "classes": list(job.classes),
            "torch_rng": torch.get_rng_state(),
            "counts": counts,
            "nodes": nodes,
        },
        Path(folder) / CHECKPOINT_FILE,
    )


class UnreadableCheckpoint(ConfigError):
    """A checkpoint file that cannot be read (empty, truncated, not a checkpoint)."""


def candidates(path: str | Path) -> list[str]:
    """The checkpoint files that ``path`` names, newest first: the file itself, the file of a
    checkpoint folder, or those of every ``checkpoint_*`` of a run folder (local, or a storage
    URI).

    Raises:
        ConfigError: when no checkpoint is found there.
    """
    path = str(path)
    if not storage.is_dir(path):
        return [path]
    if storage.is_file(storage.join(path, CHECKPOINT_FILE)):
        return [storage.join(path, CHECKPOINT_FILE)]
    # Ray Train numbers checkpoints in order: checkpoint_000009 is the newest.
    found = [
        storage.join(d, CHECKPOINT_FILE)
        for d in storage.list_dirs(path, "checkpoint_")
        if storage.is_file(storage.join(d, CHECKPOINT_FILE))
    ]
    if not found:
        raise ConfigError(f"--model: no {CHECKPOINT_FILE} in {path} or its checkpoint_* dirs")
    return found[::-1]


def load(path: str | Path) -> dict:
    """The checkpoint dict of a checkpoint file, a checkpoint folder, or a run folder (its newest
    readable ``checkpoint_*``: one that a failed write left empty or truncated is skipped with
    a warning naming it); local, or a storage URI (``s3://bucket/runs/NAME``).

    Raises:
        ConfigError: when no readable checkpoint is found there, or the newest one holds
            anything but plain data (refused unread, never skipped).
    """
    skipped: list[UnreadableCheckpoint] = []
    for file in candidates(path):
        try:
            state = _read(file)
        except UnreadableCheckpoint as err:
            skipped.append(err)
            continue
        for err in skipped:
            log.warning("%s: skipped, loaded %s", err, file)
        return state
    raise skipped[0]


def _read(path: str) -> dict:
    try:
        with storage.open_input(path) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only's refusal is a paragraph; the line naming the global says why. Without
        # one the file is not a pickle at all (garbage, an unknown opcode): unreadable.
        why = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln.upper()]
        if not why:
            raise UnreadableCheckpoint(
                f"--model: {path} is not a readable checkpoint (not a torch.save file)"
            ) from err
        raise ConfigError(
            f"--model: {path} is not a plain checkpoint, refused unread ({why[0][:200]})"
        ) from err
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise UnreadableCheckpoint(f"--model: {path} is not a readable checkpoint ({err})") from err


def resume(
    folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, list[dict]]:
    """Restore model, optimiser and the CPU generator from a checkpoint folder.

    Returns:
        (the first epoch still to train, the history so far).
    """
    state = load(folder)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state["epoch"] + 1, state["history"]


@dataclass(frozen=True)
class Trained:
    """A trained model and its answer.

    Attributes:
        model: the network, in eval mode.
        config: its training config.
        subhead: head B's chosen sub-head (the label-free choice; 0 where none was recorded).
        names: per cluster of head B, the class Hungarian matching on the run's held-out labels
            gave it, or "" (no labels, an unmatched cluster, or nothing recorded).
    """

    model: torch.nn.Module
    config: Config
    subhead: int
    names: tuple[str, ...]


def load_trained(uri: str) -> Trained:
    """A trained model from a checkpoint path (as ``load`` takes it) or an MLflow model URI
    (``models:/name/3``, ``models:/name/latest``, ``runs:/<id>/model``; the tracking URI comes
    from the environment). Only plain data is read (``weights_only=True``, JSON): nothing of
    the checkpoint or the registry runs.

    Of a checkpoint, the answer is its last epoch's: ``best_subhead`` of its history, names
    matched on its confusion counts. Of a registered model, its ``info.json``.

    Raises:
        ConfigError: when the URI names neither, or what it names is not a model of this
            pipeline (no config, weights that do not fit it, an invalid ``info.json``).
    """
    if storage.is_uri(uri) or Path(uri).exists():
        state = load(uri)
        if not (isinstance(state, dict) and {"model", "config"} <= set(state)):
            raise ConfigError(
                f"--model: {uri} is not a checkpoint of this pipeline (no 'model' and 'config')"
            )
        model, cfg = _rebuild(state["config"], state["model"], uri)
        subhead, names = _checkpoint_answer(state, cfg)
        return Trained(model, cfg, subhead, names)
    if ":/" not in uri:
        raise ConfigError(f"--model: {uri!r} is neither a checkpoint path nor an MLflow model URI")
    files = model_files(download_model(uri))
    if files is None:
        raise ConfigError(
            f"--model: {uri} was not logged by this pipeline (no {WEIGHTS_FILE} and "
            f"{CONFIG_FILE}; models logged as pickles are not loaded)"
        )
    return load_files(files, uri)


def load_files(files: ModelFiles, uri: str) -> Trained:
    """A trained model from the files of a logged model (as ``tracking.model_files`` finds
    them in a downloaded folder, or a pyfunc model's artifacts).

    Args:
        files: weights, config and (optionally) info.
        uri: what the files came from, for errors.

    Raises:
        ConfigError: a file is not what it should be (one line naming it).
    """
    model, cfg = _rebuild(_read_json(files.config), load(files.weights), uri)
    if files.info is None:  # logged before the answer travelled with the model
        return Trained(model, cfg, 0, ("",) * cfg.model.n_clusters_b)
    subhead, names = _checked_answer(_read_json(files.info), cfg, files.info)
    return Trained(model, cfg, subhead, names)


def load_model(uri: str) -> tuple[torch.nn.Module, Config]:
    """A model (in eval mode) and its training config, as ``load_trained`` loads them.

    Raises:
        ConfigError: as ``load_trained``.
    """
    trained = load_trained(uri)
    return trained.model, trained.config


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--model: {path} is not valid JSON ({err})") from err


def _checkpoint_answer(state: Mapping[str, object], cfg: Config) -> tuple[int, tuple[str, ...]]:
    """Head B's chosen sub-head and the matched class names of a checkpoint's last epoch."""
    history, counts, classes = state.get("history"), state.get("counts"), state.get("classes")
    last = history[-1] if isinstance(history, list) and history else {}
    best = last.get("best_subhead", 0) if isinstance(last, dict) else 0
    subhead = int(best) if isinstance(best, int | float) and 0 <= best < cfg.model.n_subheads else 0
    unnamed = ("",) * cfg.model.n_clusters_b
    if not (isinstance(counts, torch.Tensor) and isinstance(classes, Sequence)):
        return subhead, unnamed  # a checkpoint from before the counts were kept
    if counts.shape != (cfg.model.n_subheads, cfg.model.n_clusters_b, len(classes)):
        return subhead, unnamed
    return subhead, tuple(matched_names(counts[subhead], [str(c) for c in classes]))


def _checked_answer(info: object, cfg: Config, path: Path) -> tuple[int, tuple[str, ...]]:
    """``info.json``'s sub-head and names, checked against the config's heads.

    Raises:
        ConfigError: one line naming the file and what it should hold.
    """
    k, n = cfg.model.n_clusters_b, cfg.model.n_subheads
    subhead = info.get("subhead") if isinstance(info, dict) else None
    names = info.get("names") if isinstance(info, dict) else None
    if not (
        isinstance(subhead, int)
        and not isinstance(subhead, bool)
        and 0 <= subhead < n
        and isinstance(names, list)
        and len(names) == k
        and all(isinstance(name, str) for name in names)
    ):
        raise ConfigError(
            f'--model: {path}: expected {{"subhead": an integer in [0, {n}), "names": {k} strings}}'
        )
    return subhead, tuple(names)


def _rebuild(config: object, weights: object, uri: str) -> tuple[torch.nn.Module, Config]:
    """The network ``config`` describes, with ``weights``, in eval mode.

    Raises:
        ConfigError: the config is not valid, or the weights do not fit its network.
    """
    try:
        cfg = Config.from_dict(config)
    except ConfigError as err:
        raise ConfigError(f"--model: {uri} carries no valid config ({err})") from err
    model = build_model(cfg.model)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        detail = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise ConfigError(
            f"--model: {uri}: the weights do not fit the network its config describes "
            f"({detail[1] if len(detail) > 1 else detail[0]})"[:300]
        ) from err
    return model.eval(), cfg
