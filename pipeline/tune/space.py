"""Search spaces over config paths (``tune_spaces/*.yaml``): parsed and checked without Ray.

A space file maps config paths to one distribution each::

    params:
      loss.lamb_b:      {loguniform: [1.0, 3.0]}
      loss.half_window: {randint: [3, 10]}       # integers, upper bound inclusive
      pairs.strength:   {uniform: [0.5, 1.5]}
      optim.lr:         {choice: [1.0e-4, 3.0e-4, 1.0e-3]}
      loss.lamb_a:      {grid: [1.0, 1.5]}        # every value, crossed with the samples

Beside ``params`` a space file may say what it is sized for: ``search`` holds ``iid tune``
options (``num_samples``, ``max_concurrent``, ``grace_period``, ``reduction_factor``, ``metric``,
``algorithm``) and ``config`` holds base config values (``optim.epochs``, ``scaling.*``), so one
file is a search for 2 cores and another the same search for a GPU cluster. Flags and ``--set``
given on the command line win over both.

Everything is checked before a trial starts: the path must name a config field, the
distribution must be known, a range must be non-empty (and positive for ``loguniform``), every
value must have the field's type, and the range's ends and every listed value must pass the
config's own validation on top of the base config (so ``lamb_b: {uniform: [0, 2]}`` fails here,
not in trial 7).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, coerce, read_yaml

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

    @property
    def paths(self) -> set[str]:
        """The searched config paths."""
        return {d.path for d in self.dims}

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
        return Config.from_dict(with_paths(base, sample))


def with_paths(base: dict, values: dict[str, Any]) -> dict:
    """A copy of ``base`` (a config dict) with ``section.key`` values set; ``base`` is kept."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for path, value in values.items():
        section, key = path.split(".", 1)
        out.setdefault(section, {})[key] = value
    return out


# Where data and runs live, not how to train: a trial must not change them.
NOT_SEARCHABLE = ("data.shards", "run.name", "run.storage_path", "run.tracking_uri")


def _field_type(path: str) -> object:
    if path in NOT_SEARCHABLE:
        raise ConfigError(f"{path}: not searchable (it says where data and runs live)")
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
    values = [coerce(tp, v, path) for v in values]
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


def parse_space(
    raw: object,
    base: dict | None = None,
    source: str = "space",
    check: Callable[[Config], None] | None = None,
) -> SearchSpace:
    """Validate a space (the YAML's content) and, given the base config dict, every extreme:
    a range's ends and every listed value, each applied on its own to ``base``, must make a
    valid config, which ``check`` (say, against the shards) is then given.

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
                    cfg = space.apply(base, {dim.path: value})
                    if check is not None:
                        check(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    return space


# The options a space file's ``search`` section may set: the SearchOptions fields a file can
# size (the search's name is the user's).
SEARCH_KEYS: dict[str, type] = {
    "num_samples": int,
    "max_concurrent": int,
    "grace_period": int,
    "reduction_factor": int,
    "metric": str,
    "algorithm": str,
}


@dataclass(frozen=True)
class SpaceFile:
    """A space file: what it searches and what it is sized for.

    Attributes:
        raw: ``{"params": ...}``, what ``parse_space`` takes (and a search record keeps).
        search: SearchOptions fields the file sets.
        config: base config values the file assumes, dotted path -> value.
    """

    raw: dict
    search: dict[str, object]
    config: dict[str, object]

    def sized(self, base: dict) -> dict:
        """``base`` (a config dict) with the file's config values set."""
        return with_paths(base, self.config)


def read_space_file(path: str | Path) -> SpaceFile:
    """Read ``tune_spaces/NAME.yaml`` and check its ``search`` and ``config`` sections; the
    params are checked by ``parse_space`` against the base config.

    Raises:
        ConfigError: one line naming the file and the key.
    """
    raw = read_yaml(path, "search space")
    try:
        if (
            not isinstance(raw, dict)
            or "params" not in raw
            or set(raw) - {"params", "search", "config"}
        ):
            raise ConfigError(
                "expected a mapping with params: {config.path: {dist: [...]}} and optionally "
                "search: {option: value} and config: {config.path: value}"
            )
        search, config = raw.get("search") or {}, raw.get("config") or {}
        for section, value in (("search", search), ("config", config)):
            if not isinstance(value, dict):
                raise ConfigError(f"{section}: expected a mapping, got {value!r}")
        for key, value in search.items():
            if key not in SEARCH_KEYS:
                raise ConfigError(f"search.{key}: unknown option (known: {', '.join(SEARCH_KEYS)})")
            tp = SEARCH_KEYS[key]
            if not isinstance(value, tp) or isinstance(value, bool):
                raise ConfigError(f"search.{key}: expected {tp.__name__}, got {value!r}")
        checked = {}
        for key, value in config.items():
            if key in NOT_SEARCHABLE:
                raise ConfigError(
                    f"config.{key}: not set by a space file (it says where data and runs live)"
                )
            try:
                tp = _field_type(key)
            except ConfigError as err:
                raise ConfigError(f"config.{err}") from err
            checked[key] = coerce(tp, value, f"config.{key}")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return SpaceFile({"params": raw["params"]}, dict(search), checked)


def load_space(path: str | Path, base: dict | None = None) -> SearchSpace:
    """Read and validate ``tune_spaces/NAME.yaml``, its params against ``base`` sized as the
    file says."""
    file = read_space_file(path)
    return parse_space(file.raw, None if base is None else file.sized(base), str(path))
