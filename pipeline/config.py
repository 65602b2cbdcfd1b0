"""One typed configuration for a training run: a frozen dataclass tree, at the bottom of the
package (it imports nothing of it).

Loaded from YAML, overridden with ``--set section.key=value``, sent to Ray workers as a plain
dict and rebuilt there with the same validation: an unknown key, a missing required key, a wrong
type or an out-of-range value fails loudly, naming the dotted key and the bad value. ``Job`` is
what a training worker receives: the config plus what the driver derived from the shards and the
tracking store, typed too.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, phrased as one line naming the key."""


@dataclass(frozen=True)
class PairConfig:
    """How g is drawn. Ranges are at ``strength`` 1; each is multiplied by ``strength``.

    Attributes:
        crop: side of the random square crop taken from each tile (0: the whole tile).
        strength: scales all jitter and affine ranges.
        brightness, contrast, saturation: factors drawn from [1 - v, 1 + v].
        hue: hue shift drawn from [-v, v] (in turns).
        flip: horizontal flip with probability 0.5 (ignored with ``dihedral``, which holds it).
        dihedral: after the affine, a symmetry of the square instead of ``flip``: the 8
            elements of the dihedral group D4 (a rotation by 0, 90, 180 or 270 degrees, with
            or without a flip) equally likely, as imagery seen from above has no up. Needs
            square images (the crop or the tiles); without the affine, pixels move exactly.
        affine: random rotation / shear / scale / shift.
        rotation, shear: degrees, drawn from [-v, v].
        scale: zoom drawn from [1 - v, 1 + v].
        shift: translation along each axis drawn from [-v, v], as a fraction of half the tile
            side (``affine_grid`` units: 0.1 moves a 200 px tile by up to 10 px).
        stroke: whole-image clustering only: each view's strokes thickened or thinned, as pens
            and scanners differ: t drawn from [-v, v] blends the image toward its 3x3 grey
            dilation (t > 0) or erosion (t < 0) by |t|, on every band, before the colour
            jitter (v times ``strength``, at most 1: a full dilation or erosion). 0: off.
        noise: standard deviation of Gaussian noise added to every band of the second view
            (values in [0, 1]; not clamped), which stops a clustering net from matching the
            two views on exact pixel values.
        rgb_bands: indices of the bands to colour-jitter; () jitters nothing. Brightness and
            contrast apply to every named band (one factor per image for all of them);
            saturation and hue need a colour triple, so apply only when exactly 3 bands (R, G,
            B) are named: (1, 2) jitters the R and G of IR-R-G imagery in brightness and
            contrast only. Bands not named (infrared) stay untouched. Indices must be distinct
            and >= 0; an index the images lack fails (naming this key) when g first runs.
        repeats: pairs drawn from each image per step, each with its own g (the reference's
            ``num_dataloaders``, 5 for its clustering runs); drawn on the worker only.
        augment_first: whole-image clustering only: the first view gets its own independent
            draw of g too, so neither view is the clean image (the reference augments both
            views of its clustering pairs). Segmentation needs the first view untouched, as g*
            maps the second view's prediction back into its frame.
    """

    crop: int = 0
    strength: float = 1.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.125
    flip: bool = True
    dihedral: bool = False
    affine: bool = False
    rotation: float = 30.0
    shear: float = 10.0
    scale: float = 0.2
    shift: float = 0.0
    stroke: float = 0.0
    noise: float = 0.0
    rgb_bands: tuple[int, ...] = (0, 1, 2)
    repeats: int = 1
    augment_first: bool = False

    @property
    def jitters(self) -> bool:
        """Whether g changes any band's colour (some band named, some range above 0)."""
        ranges = (self.brightness, self.contrast, self.saturation, self.hue)
        return bool(self.rgb_bands) and self.strength > 0 and any(ranges)

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"pairs.repeats must be >= 1, got {self.repeats!r}")
        if self.strength < 0:
            raise ValueError(f"pairs.strength must be >= 0, got {self.strength!r}")
        if self.shift < 0 or self.noise < 0:
            raise ValueError(
                f"pairs.shift and pairs.noise must be >= 0, got {self.shift!r}, {self.noise!r}"
            )
        if not 0 <= self.stroke <= 1:
            raise ValueError(f"pairs.stroke must be in [0, 1], got {self.stroke!r}")
        if self.crop < 0:
            raise ValueError(f"pairs.crop must be >= 0, got {self.crop!r}")
        for i, band in enumerate(self.rgb_bands):
            if band < 0:
                raise ValueError(f"pairs.rgb_bands must be band indices >= 0, got {band!r}")
            if band in self.rgb_bands[:i]:
                raise ValueError(
                    f"pairs.rgb_bands names band {band!r} twice, got {self.rgb_bands!r}"
                )
        if self.strength * self.scale >= 1:
            raise ValueError(
                f"pairs.scale * strength must be < 1, got {self.scale * self.strength}"
            )


# Pixel types GDAL and the shards hold ("" : not recorded).
PIXEL_TYPES = ("", "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


@dataclass(frozen=True)
class DataConfig:
    shards: str  # prepared dataset folder (manifest.json + split folders); any pyarrow URI
    train_splits: tuple[str, ...] = ("train", "unlabelled")  # IID trains without labels
    eval_split: str = "test"
    merge: str = ""  # a merge recorded in the manifest, e.g. "potsdam3"; "" keeps the classes
    batch_size: int = 8  # pairs per worker per step
    # Where g is drawn: "actors" (the Ray Data actor pool; frees the trainer) or "worker"
    # (make_pairs on the training worker's device: the GPU path, and no pool start-up per pass).
    pairs_on: Literal["actors", "worker"] = "actors"
    # Hold the raw shard rows in Ray's object store for the run (read once) instead of reading
    # and decoding them again every pass; turn off when the shards exceed the object store.
    materialize: bool = True
    # Rows each worker shuffles in every training pass (Ray Data's local shuffle buffer), so
    # that batches are not the same every epoch; 0 keeps the stored order.
    shuffle_buffer: int = 512
    # How pixel values become the model's input: "unit" divides integers by their dtype's
    # maximum (8-bit imagery), "stats" stretches each band to [0, 1] from the dataset's band
    # statistics (the manifest's), "auto" is "stats" for anything but 8-bit imagery. The
    # stretch itself (band_lo, band_hi) is filled in from the manifest when training starts
    # and then travels with the model; give it to fix the stretch by hand.
    normalise: Literal["auto", "unit", "stats"] = "auto"
    band_lo: tuple[float, ...] = ()
    band_hi: tuple[float, ...] = ()
    # The pixel type of the imagery the model was trained on (the manifest's; filled in when
    # training starts): new imagery must share it, or the stretch above would not fit it.
    # "" (models trained before it was recorded): not checked.
    dtype: str = ""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, ">= 1")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer, ">= 0")
        _check(self.dtype in PIXEL_TYPES, "data.dtype", self.dtype, f"one of {list(PIXEL_TYPES)}")
        _check(
            len(self.band_hi) == len(self.band_lo),
            "data.band_hi",
            self.band_hi,
            f"as many values as data.band_lo ({len(self.band_lo)})",
        )
        for lo, hi in zip(self.band_lo, self.band_hi, strict=True):
            _check(hi > lo, "data.band_hi", self.band_hi, "each above its data.band_lo")


@dataclass(frozen=True)
class ModelConfig:
    task: Literal["segmentation", "clustering"] = "segmentation"
    in_channels: int = 0  # 0: the dataset's band count (the manifest's), set when training starts
    n_clusters_a: int = 24
    n_clusters_b: int = 3
    n_subheads: int = 1
    sobel: Literal["none", "append", "replace"] = "none"
    trunk: Literal["small", "resnet34"] = "small"  # clustering only
    width: float = 1.0  # segmentation trunk channel multiplier (1: the reference)
    # Clustering only: the side every image is rescaled to inside the network. 0: chosen from
    # the dataset's image size when training starts (``clustering_input_size``), then fixed.
    input_size: int = 0

    def __post_init__(self) -> None:
        _check(self.in_channels >= 0, "model.in_channels", self.in_channels, ">= 0")
        _check(self.input_size >= 0, "model.input_size", self.input_size, ">= 0")
        _check(
            self.input_size == 0 or self.task == "clustering",
            "model.input_size",
            self.input_size,
            "0 for segmentation (the network sees tiles as they are)",
        )
        _check(self.n_clusters_b >= 2, "model.n_clusters_b", self.n_clusters_b, ">= 2")
        _check(self.n_clusters_a >= 2, "model.n_clusters_a", self.n_clusters_a, ">= 2")
        _check(self.n_subheads >= 1, "model.n_subheads", self.n_subheads, ">= 1")
        _check(0 < self.width <= 4, "model.width", self.width, "in (0, 4]")


@dataclass(frozen=True)
class LossConfig:
    lamb_a: float = 1.0
    lamb_b: float = 1.0
    half_window: int = 10
    collapsed: bool = False
    # P over the global batch (joints summed over data-parallel workers) rather than over each
    # worker's share: the objective then does not change with the number of workers.
    global_joint: bool = True

    def __post_init__(self) -> None:
        _check(self.lamb_a > 0, "loss.lamb_a", self.lamb_a, "> 0")
        _check(self.lamb_b > 0, "loss.lamb_b", self.lamb_b, "> 0")
        _check(self.half_window >= 0, "loss.half_window", self.half_window, ">= 0")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    epochs: int = 10

    def __post_init__(self) -> None:
        _check(0 < self.lr < 1, "optim.lr", self.lr, "in (0, 1)")
        _check(self.epochs >= 1, "optim.epochs", self.epochs, ">= 1")


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional: leave CPUs to Ray Data on small machines
    pair_actors: int = 1
    pair_cpus: float = 0.5
    # Ray's placement of the workers: PACK (fewest nodes), SPREAD, STRICT_SPREAD (one per node).
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "scaling.num_workers", self.num_workers, ">= 1")
        _check(self.pair_actors >= 1, "scaling.pair_actors", self.pair_actors, ">= 1")


# A run's folder name under run.storage_path: never a path of its own (no "/", no "..").
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class RunConfig:
    name: str = "iid"  # stable: re-running the same name resumes
    storage_path: str = "runs"  # checkpoints; shared storage (s3://, NFS) on a cluster
    tracking_uri: str = ""  # "" -> sqlite:///<cwd>/mlflow.db
    experiment: str = "iid"
    max_failures: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        _check(
            bool(RUN_NAME.fullmatch(self.name)),
            "run.name",
            self.name,
            "letters, digits, '-', '_' and '.', not starting with '.'",
        )
        _check(self.max_failures >= 0, "run.max_failures", self.max_failures, ">= 0")
        _check(self.seed >= 0, "run.seed", self.seed, ">= 0")


class Record:
    """A dataclass that crosses process and file boundaries as plain values: ``to_dict`` gives
    them, ``from_dict`` rebuilds the object with every field checked (``build``)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return build(cls, d)


# What ``model.task: clustering`` starts from instead of the segmentation defaults: the paper's
# whole-image recipe (random crops and rescales as g's zoom and shift, small rotations, colour
# changes of up to 40%, both views drawn, an overclustering head of 5x the classes, 5 sub-heads),
# sized by the image through ``model.input_size``, plus a stroke-width jitter (without it, 28 px
# digits clustered by pen width). One pair per image and step at a larger lr rather than the
# reference's 5: more images per minute on CPU. Any key a config sets wins.
CLUSTERING_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"batch_size": 100, "pairs_on": "worker"},
    "model": {"n_subheads": 5},
    "loss": {"lamb_a": 1.0, "lamb_b": 2.0},
    "optim": {"lr": 3e-3},
    "pairs": {
        "flip": False,
        "affine": True,
        "rotation": 15.0,
        "shear": 0.0,
        "scale": 0.1,
        "shift": 0.12,
        "stroke": 1.0,
        "noise": 0.1,
        "brightness": 0.4,
        "contrast": 0.4,
        "augment_first": True,
    },
}
OVERCLUSTERING = 5  # clustering's head A: this many times head B's clusters, unless set


def with_task_defaults(d: object) -> object:
    """``d`` with ``CLUSTERING_DEFAULTS`` under every key it leaves out, when its
    ``model.task`` is clustering (anything else, malformed sections too, as it is)."""
    if not (isinstance(d, dict) and isinstance(d.get("model"), dict)):
        return d
    if d["model"].get("task") != "clustering":
        return d
    out = dict(d)
    for section, defaults in CLUSTERING_DEFAULTS.items():
        given = out.get(section, {})
        if isinstance(given, dict):
            out[section] = defaults | given
    model = out["model"]
    k = model.get("n_clusters_b", ModelConfig.n_clusters_b)
    if "n_clusters_a" not in model and isinstance(k, int):
        out["model"] = model | {"n_clusters_a": OVERCLUSTERING * k}
    return out


@dataclass(frozen=True)
class Config(Record):
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pairs: PairConfig = field(default_factory=PairConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.pairs.repeats > 1 and self.data.pairs_on != "worker":
            raise ConfigError(
                f"pairs.repeats: {self.pairs.repeats} needs data.pairs_on: worker "
                f"(the actor pool makes one pair per image), got {self.data.pairs_on!r}"
            )
        if self.pairs.stroke and self.model.task != "clustering":
            raise ConfigError(
                f"pairs.stroke: {self.pairs.stroke} needs model.task: clustering, got "
                f"{self.model.task!r} (it moves region edges, which g* cannot undo)"
            )
        if self.pairs.augment_first and self.model.task != "clustering":
            raise ConfigError(
                f"pairs.augment_first: true needs model.task: clustering, got "
                f"{self.model.task!r} (segmentation maps g(x)'s prediction back into x's "
                f"frame, so x must stay untouched)"
            )

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """The config ``d`` describes, every field checked; a clustering config starts from
        ``CLUSTERING_DEFAULTS``."""
        return build(cls, with_task_defaults(d))

    def flat(self) -> dict[str, Any]:
        """``{"loss.lamb_b": 1.5, ...}``: MLflow params."""
        return {
            f"{section}.{key}": value
            for section, values in self.to_dict().items()
            for key, value in values.items()
        }


@dataclass(frozen=True)
class Job(Record):
    """One training run as its workers receive it: the config and what the driver derived.

    Attributes:
        config: the run's config.
        classes: names of the evaluated classes (after ``data.merge``).
        lut: 256 entries: stored label id -> evaluated class (255: ignored).
        tracking_uri, run_id: the MLflow run rank 0 logs every epoch to.
        eval_pairs: how the held-out pairs of the per-epoch MI are drawn (a search scores every
            trial on its base config's pairs, so that trials compare).
        progress_file: where rank 0 leaves each epoch's metrics for the driver's epoch lines
            (an absolute path or URI: workers do not share the driver's working directory);
            "" for none.
    """

    config: Config
    classes: tuple[str, ...]
    lut: tuple[int, ...]
    tracking_uri: str
    run_id: str
    eval_pairs: PairConfig
    progress_file: str = ""


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def build(cls: type, d: object, prefix: str = ""):
    """An instance of the config dataclass ``cls`` from a plain dict, every field checked.

    Raises:
        ConfigError: one line naming the dotted key (``prefix`` + field) and the bad value.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: missing required key")
            continue
        kwargs[f.name] = coerce(hints[f.name], d[f.name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # range checks of nested configs (PairConfig)
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def coerce(tp: object, value: object, key: str):
    """``value`` as the field type ``tp`` (nested dataclasses built), or a ConfigError naming
    ``key``."""
    if dataclasses.is_dataclass(tp):
        return build(tp, value, f"{key}.")
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = typing.get_args(tp)[0]
        return tuple(coerce(inner, v, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(number)
    if tp is int:
        number = _number(value)
        if number is None or not float(number).is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _number(value: object) -> int | float | None:
    """A finite number as people write it, or None. YAML 1.1 (PyYAML) reads ``1e-3`` and
    ``1E5`` as strings (it wants ``1.0e-3``); ``8.0`` is a float where an integer may be meant."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip().replace("_", ""))
        except ValueError:
            return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a config dict."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        path, raw = item.split("=", 1)
        parts = path.split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({first})") from err
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path, what: str) -> object:
    """A YAML file's content; an unreadable file or bad YAML is one ConfigError naming it."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err


def read_mapping(path: str | Path, what: str) -> dict:
    """A YAML file that holds a mapping (an empty file: {}); anything else is one ConfigError."""
    raw = read_yaml(path, what)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top, got {type(raw).__name__}")
    return raw


def to_yaml(cfg: Config) -> str:
    """``cfg`` as YAML that ``load_config`` reads back into the same config."""

    def plain(value: object) -> object:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply overrides, validate.

    Raises:
        ConfigError: unreadable file, bad YAML, or an invalid value (one line, naming the key).
    """
    path = Path(path)
    raw = read_mapping(path, "config")
    try:
        return Config.from_dict(apply_overrides(raw, list(overrides)))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
