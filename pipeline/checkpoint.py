"""The checkpoint: one flat dict in one file per Ray Train checkpoint folder, written and read
only here.

Checkpoints are data, never code: they hold tensors, numbers, strings, lists, tuples and dicts
only, and are read with ``torch.load(weights_only=True)``, which refuses anything else (a
checkpoint on shared storage could otherwise run code on every node that resumes or evaluates).

Keys: ``model`` and ``optimizer`` (state dicts), ``epoch`` (the last one trained, from 0),
``history`` (one metrics dict per epoch), ``config`` (``Config.to_dict()``), ``classes``,
``torch_rng`` (the CPU generator's state), ``counts`` (the last epoch's (sub-heads, K, M)
confusion counts) and ``nodes`` (the Ray node id of each worker, by rank).
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch

from pipeline import storage
from pipeline.config import Config, ConfigError, Job
from pipeline.dist import unwrapped
from pipeline.models import build_model
from pipeline.tracking import CONFIG_FILE, WEIGHTS_FILE, download_model

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


def load_model(uri: str) -> tuple[torch.nn.Module, Config]:
    """A model (in eval mode) and its training config from a checkpoint path (as ``load``
    takes it) or an MLflow model URI (``models:/name/3``, ``runs:/<id>/model``; the tracking
    URI comes from the environment).

    Raises:
        ConfigError: when the URI names neither, or the model carries no config.
    """
    if storage.is_uri(uri) or Path(uri).exists():
        state = load(uri)
        if not (isinstance(state, dict) and {"model", "config"} <= set(state)):
            raise ConfigError(
                f"--model: {uri} is not a checkpoint of this pipeline (no 'model' and 'config')"
            )
        return _rebuild(state["config"], state["model"], uri)
    if ":/" not in uri:
        raise ConfigError(f"--model: {uri!r} is neither a checkpoint path nor an MLflow model URI")
    folder = download_model(uri)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not (weights.is_file() and config.is_file()):
        raise ConfigError(
            f"--model: {uri} was not logged by this pipeline (no {WEIGHTS_FILE} and "
            f"{CONFIG_FILE}; models logged as pickles are not loaded)"
        )
    try:
        raw = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--model: {config} is not valid JSON ({err.msg})") from err
    return _rebuild(raw, load(weights), uri)


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
