"""``iid segment`` as Ray Data batch inference: read windows, score them on a pool of model
actors, write each raster's map on the driver.

1. **Read** (Ray tasks): each row names a core of a raster (``layout``); ``read_windows`` reads
   its window with the margin, padded past the border, and the valid mask (torch-free, so a
   read worker costs no more than GDAL and numpy).
2. **Score** (``Scorer``, an ``ActorPoolStrategy`` pool; one GPU per actor with ``gpu``): the
   model's probabilities of the chosen head and sub-head on the window, of which the core is
   kept as cluster ids (nodata 255 where the input has none) and, if asked, probabilities.
3. **Write** (the driver, streaming ``iter_batches``): a GeoTIFF cannot be written by several
   processes at once, and one writer keeps up easily because a core comes back as one byte per
   pixel; so windows of any raster are written as they arrive into its open map
   (``MapWriter``), which is finished (COG, preview, final name) when its last core is in.
   Neither a datasink (its write tasks would each hold a different part of a raster) nor a
   group-by per raster (one task would hold a whole raster) keeps memory flat.

``Scorer`` and ``read_windows`` are plain Python: they run without a cluster too (the tests
compare them with direct forward passes).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import rasterio
import torch

from pipeline import storage
from pipeline.checkpoint import load_trained
from pipeline.config import Config, ConfigError
from pipeline.data.format import PrepareError, to_unit
from pipeline.models import build_model
from pipeline.prepare.raster import GDAL_CACHE_MB
from pipeline.segment.layout import Layout
from pipeline.segment.rasters import (
    NODATA,
    PROBABILITY_SCALE,
    MapWriter,
    Outputs,
    Source,
    find_rasters,
    inspect,
    read_windows,
    remove_parts,
)

log = logging.getLogger(__name__)
PROGRESS_EVERY = 10.0  # seconds between progress lines when no terminal shows the bar


@dataclass(frozen=True)
class SegmentOptions:
    """How ``segment`` runs (the CLI's options).

    Attributes:
        head: "B" (the class-count head) or "A" (overclustering).
        subhead: which sub-head; -1 takes the model's label-free choice.
        core, margin: the window layout (``Layout``); margin 0 turns blending off.
        batch_size: windows per batch an actor scores.
        actors: model actors in the pool.
        readers: read tasks at once (0: one per actor; a read is far quicker than scoring,
            and every concurrent task is a worker process's memory).
        cpus_per_actor: CPUs (and torch threads) of each CPU actor.
        gpu: one GPU per actor.
        probabilities: also write per-cluster probabilities.
        names: cluster names for the legend and band description (default: the classes the
            model's clusters were matched to on its held-out labels, if it had any).
        overwrite: segment rasters whose map exists instead of skipping them.
        preview_size: longest side of the preview PNG in pixels.
        progress: show a progress bar (without a terminal, a line every ``PROGRESS_EVERY`` s).
    """

    head: Literal["A", "B"] = "B"
    subhead: int = -1
    core: int = 256
    margin: int = 32
    batch_size: int = 8
    actors: int = 1
    readers: int = 0
    cpus_per_actor: float = 2.0
    gpu: bool = False
    probabilities: bool = False
    names: tuple[str, ...] = ()
    overwrite: bool = False
    preview_size: int = 1024
    progress: bool = True

    def __post_init__(self) -> None:
        Layout(1, 1, self.core, self.margin)  # checks --core and --margin
        for key, value in (("--batch-size", self.batch_size), ("--actors", self.actors)):
            if value < 1:
                raise ConfigError(f"{key}: expected >= 1, got {value}")
        if self.readers < 0:
            raise ConfigError(f"--readers: expected >= 0, got {self.readers}")
        if self.head not in ("A", "B"):
            raise ConfigError(f"--head: expected A or B, got {self.head!r}")


def read_names(path: str) -> tuple[str, ...]:
    """Cluster names from a YAML file: a list (cluster 0 first) or a mapping of cluster id to
    name (clusters left out stay unnamed).

    Raises:
        ConfigError: the file is missing, not YAML, or not such a list or mapping (one line).
    """
    import yaml

    try:
        raw = yaml.safe_load(storage.read_text(path))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--names: cannot read {path} ({str(err).splitlines()[0]})") from err
    if isinstance(raw, list) and all(isinstance(n, str | int | float) for n in raw):
        return tuple(str(n) for n in raw)
    if isinstance(raw, dict) and all(isinstance(k, int) and k >= 0 for k in raw):
        names = [""] * (max(raw, default=-1) + 1)
        for k, name in raw.items():
            names[k] = str(name)
        return tuple(names)
    raise ConfigError(
        f"--names: {path} must hold a list of names or a mapping of cluster id (0, 1, ...) "
        f"to name, got {type(raw).__name__}"
    )


@dataclass
class SegmentReport:
    """What ``segment`` did, raster by raster."""

    # with the seconds from the start of scoring to the map's completion
    done: list[tuple[Source, Outputs, float]] = field(default_factory=list)
    skipped: list[tuple[str, Outputs]] = field(default_factory=list)  # already segmented
    failed: list[str] = field(default_factory=list)  # one line each
    windows: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Plan:
    """The model's side of a run, as the actors need it."""

    config: Config
    weights: dict
    head: Literal["A", "B"]
    subhead: int
    names: tuple[str, ...]


def plan(model_uri: str, opts: SegmentOptions) -> Plan:
    """Load the model and settle head, sub-head and cluster names.

    Raises:
        ConfigError: the model cannot segment, or an option does not fit it (one line).
    """
    trained = load_trained(model_uri)
    cfg = trained.config
    if cfg.model.task != "segmentation":
        raise ConfigError(
            f"--model: {model_uri} clusters whole images (model.task: {cfg.model.task}); "
            "iid segment needs a segmentation model"
        )
    subhead = trained.subhead if opts.subhead < 0 else opts.subhead
    if subhead >= cfg.model.n_subheads:
        raise ConfigError(
            f"--subhead: {subhead}, but the model has {cfg.model.n_subheads} sub-heads"
        )
    k = cfg.model.n_clusters_b if opts.head == "B" else cfg.model.n_clusters_a
    if len(opts.names) > k:
        raise ConfigError(
            f"--names: {len(opts.names)} names for the {k} clusters of head {opts.head}"
        )
    names = opts.names or (trained.names if opts.head == "B" else ())
    names = tuple(names) + ("",) * (k - len(names))
    weights = {key: v.cpu() for key, v in trained.model.state_dict().items()}
    return Plan(cfg, weights, opts.head, subhead, names)


class Scorer:
    """Score stage: one model per actor; a batch of windows in, their cores' cluster ids (and
    probabilities) out.

    Args:
        plan: the model, head, sub-head.
        core, margin: the layout of the windows.
        probabilities: also return probabilities (K, core, core) in PROBABILITY_SCALE units.
        device: "cpu" or "cuda".
        threads: torch threads (CPU actors).
    """

    def __init__(
        self,
        plan: Plan,
        core: int,
        margin: int,
        probabilities: bool = False,
        device: str = "cpu",
        threads: int = 0,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.model = build_model(plan.config.model)
        self.model.load_state_dict(plan.weights)
        self.model.eval().to(device)
        self.plan, self.core, self.margin = plan, core, margin
        self.probabilities, self.device = probabilities, device

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = self.plan.config.data
        x = torch.from_numpy(to_unit(batch["image"], data.band_lo, data.band_hi))
        probs = self.model(x.to(self.device), self.plan.head)[self.plan.subhead]
        m, c = self.margin, self.core
        probs = probs[:, :, m : m + c, m : m + c]
        invalid = torch.from_numpy(~batch["valid"][:, m : m + c, m : m + c]).to(self.device)
        ids = probs.argmax(1).to(torch.uint8).masked_fill_(invalid, NODATA)
        out = {k: batch[k] for k in ("raster", "row", "col", "error")}
        out["ids"] = ids.cpu().numpy()
        if self.probabilities:
            scaled = (probs * PROBABILITY_SCALE).round_().to(torch.uint8)
            out["probs"] = scaled.masked_fill_(invalid.unsqueeze(1), NODATA).cpu().numpy()
        return out


def check_sources(
    src: str, cfg: Config, say: Callable[[str], None]
) -> tuple[list[Source], list[str]]:
    """Find and check the rasters ``src`` names, before any work. Returns (the good ones, one
    line per bad one)."""
    good, bad = [], []
    for path, name in find_rasters(src):
        try:
            source = inspect(path, name, cfg)
        except PrepareError as err:
            bad.append(str(err))
            continue
        if good and source.dtype != good[0].dtype:  # models that recorded no data.dtype
            bad.append(f"{path}: holds {source.dtype} pixels, {good[0].path} {good[0].dtype}")
            continue
        if not source.georeferenced:
            say(f"{path}: no CRS; its map is written without one")
        good.append(source)
    return good, bad


def segment(
    model_uri: str,
    src: str,
    out: str,
    opts: SegmentOptions = SegmentOptions(),
    say: Callable[[str], None] = log.info,
) -> SegmentReport:
    """Segment every raster ``src`` names into ``out`` (``iid segment``).

    Args:
        model_uri: a run folder, checkpoint, or MLflow model URI.
        src: a raster, a folder of rasters, or a glob (local, or URIs GDAL opens).
        out: output folder (local or a storage URI).
        opts: how.
        say: where the per-raster lines go.

    Returns:
        What was done, skipped and failed.

    Raises:
        ConfigError: the model or an option is unfit (before anything starts).
    """
    started = time.monotonic()
    the_plan = plan(model_uri, opts)
    sources, report = [], SegmentReport()
    good, report.failed = check_sources(src, the_plan.config, say)
    for line in report.failed:
        say(f"skipped: {line}")
    for source in good:
        outputs = Outputs.of(out, source.name)
        if outputs.done(opts.probabilities) and not opts.overwrite:
            report.skipped.append((source.path, outputs))
            say(f"{source.path}: already segmented ({outputs.clusters}), skipped")
            continue
        remove_parts(out, source.name)
        sources.append(source)
    if sources:
        pixels = sum(s.height * s.width for s in sources) / 1e6
        where = os.environ.get("RAY_ADDRESS") or "a local Ray cluster"
        say(f"segmenting {len(sources)} raster(s), {pixels:.1f} megapixels, on {where}")
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20):
            _run(the_plan, sources, out, opts, report, say)
    report.seconds = time.monotonic() - started
    return report


def _run(
    the_plan: Plan,
    sources: list[Source],
    out: str,
    opts: SegmentOptions,
    report: SegmentReport,
    say: Callable[[str], None],
) -> None:
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy
    from tqdm import tqdm

    from pipeline.train import check_cluster, start_ray

    check_cluster()
    start_ray(dashboard=False)
    layouts = [Layout(s.height, s.width, opts.core, opts.margin) for s in sources]
    items = [
        {"raster": i, "row": r, "col": c}
        for i, layout in enumerate(layouts)
        for r, c in layout.cores()
    ]
    # A block per batch: windows reach the writer (and the progress line) as they are scored,
    # not in a few bursts; Ray's cost per block is small beside a batch's forward pass.
    blocks = max(1, min(len(items) // opts.batch_size, 4096))
    scorer_args = {
        "plan": the_plan,
        "core": opts.core,
        "margin": opts.margin,
        "probabilities": opts.probabilities,
        "device": "cuda" if opts.gpu else "cpu",
        "threads": 0 if opts.gpu else max(1, int(opts.cpus_per_actor)),
    }
    windows = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        read_windows,
        batch_size=opts.batch_size,
        compute=TaskPoolStrategy(size=opts.readers or opts.actors),
        fn_kwargs={
            "run": uuid.uuid4().hex,
            "paths": [s.path for s in sources],
            "core": opts.core,
            "margin": opts.margin,
            "bands": sources[0].bands,
            "dtype": sources[0].dtype,
        },
    )
    with warnings.catch_warnings():
        # max_restarts has no named parameter in Ray 2.60: ray_remote_args, which warns that it
        # goes in 2.64, is its only way in.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        ds = windows.map_batches(
            Scorer,
            batch_size=opts.batch_size,
            compute=ActorPoolStrategy(size=opts.actors),
            fn_constructor_kwargs=scorer_args,
            num_gpus=1 if opts.gpu else 0,
            num_cpus=1 if opts.gpu else opts.cpus_per_actor,
            # Ray Data keeps each actor's arguments (the weights) in the object store, where an
            # actor restart cannot count on them (ray-project/ray#53727; Ray says so in an
            # error line per pool): a lost actor fails the run, and the rerun skips the maps
            # already written (a raster is the unit of recovery).
            max_restarts=0,
        )
    tags = {
        "IID_MODEL_CONFIG": the_plan.config.run.name,
        "IID_HEAD": the_plan.head,
        "IID_SUBHEAD": str(the_plan.subhead),
    }
    writers: dict[int, MapWriter] = {}
    failed: set[int] = set()
    began = time.monotonic()
    bar = tqdm(
        total=len(items), unit="window", desc="segment", disable=None if opts.progress else True
    )
    # Without a terminal the bar is off: a line every PROGRESS_EVERY seconds instead.
    lines = opts.progress and bar.disable
    said = began
    if lines:
        say(f"scoring {len(items)} windows with {opts.actors} model actor(s)")
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for j, i in enumerate(batch["raster"]):
                i = int(i)
                bar.update(1)
                report.windows += 1
                if lines and time.monotonic() - said >= PROGRESS_EVERY:
                    said = time.monotonic()
                    say(f"{report.windows}/{len(items)} windows scored ({said - began:.0f} s)")
                if i in failed:
                    continue
                if batch["error"][j]:
                    failed.add(i)
                    report.failed.append(batch["error"][j])
                    say(f"failed: {batch['error'][j]}")
                    if i in writers:
                        writers.pop(i).abort()
                    continue
                if i not in writers:
                    writers[i] = MapWriter(
                        sources[i], layouts[i], out, the_plan.names, opts.probabilities, tags
                    )
                probs = batch["probs"][j] if opts.probabilities else None
                writers[i].write(int(batch["row"][j]), int(batch["col"][j]), batch["ids"][j], probs)
                if writers[i].remaining == 0:
                    data = the_plan.config.data
                    outputs = writers.pop(i).finish(opts.preview_size, data.band_lo, data.band_hi)
                    seconds = time.monotonic() - began
                    report.done.append((sources[i], outputs, seconds))
                    say(f"{sources[i].path} -> {outputs.clusters} (after {seconds:.1f} s)")
    finally:
        bar.close()
        for writer in writers.values():  # interrupted: nothing half-written keeps a final name
            writer.abort()
