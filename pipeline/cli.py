"""The ``iid`` command line.

Each stage of the pipeline gets a sub-command as it lands; errors reach the user as one line
on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import sys
from pathlib import Path

from pipeline import storage
from pipeline.data.format import PrepareError
from pipeline.prepare.shards import BadFilesError

log = logging.getLogger("pipeline")


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import DigitsDemoConfig, format_summary, run_digits_demo

    cfg = DigitsDemoConfig(epochs=args.epochs, seed=args.seed)
    summary = run_digits_demo(Path(args.out), cfg)
    print(format_summary(summary))
    print(f"metrics written to {Path(args.out) / 'demo_metrics.json'}")
    return 0


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, then ``--tracking-uri`` (``tracking.resolve_uri`` falls back on
    $MLFLOW_TRACKING_URI, then ./mlflow.db)."""
    overrides = list(args.set or [])
    if args.tracking_uri:
        overrides.append(f"run.tracking_uri={args.tracking_uri}")
    return overrides


def _train(args: argparse.Namespace) -> int:
    from pipeline import tracking
    from pipeline.config import load_config, to_yaml
    from pipeline.train import ALREADY_FINISHED, dry_run, fit

    cfg = load_config(args.config, _overrides(args))
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if args.dry_run:
        for line in dry_run(cfg, args.extend):
            print(line)
        print("dry run: nothing started")
        return 0
    try:
        result = fit(cfg, extend=args.extend, say=_say)
    except KeyboardInterrupt:
        print(
            f"iid train: interrupted; the same command resumes run {cfg.run.name!r} from its "
            "last checkpoint",
            file=sys.stderr,
        )
        return 130
    m = result.metrics or {}
    epoch = m.get("epoch")  # counted from 0 in the metrics, from 1 wherever the user reads it
    if result.return_value == ALREADY_FINISHED:
        print(
            f"run {cfg.run.name}: already finished, nothing trained (--extend with more "
            "optim.epochs trains it further); its record:"
        )
    print(
        f"run {cfg.run.name}: epoch {'?' if epoch is None else int(epoch) + 1} of "
        f"{cfg.optim.epochs}, "
        f"sub-head {m.get('best_subhead')} (highest MI): ACC {m.get('acc', float('nan')):.3f} "
        f"NMI {m.get('nmi', float('nan')):.3f} ARI {m.get('ari', float('nan')):.3f}"
    )
    _print_baselines(cfg)
    report_file = storage.join(cfg.run.storage_path, cfg.run.name, "report.json")
    if storage.is_file(report_file):
        report = json.loads(storage.read_text(report_file))
        print(f"checkpoint: {report['checkpoint']}")
        print(f"plots: {report['plots']}")
        print(f"model: {report['model_uri']}")
        print(
            f"mlflow: run {report['run_id']} in {report['tracking_uri']}\n"
            f"  browse: {tracking.browse(report['tracking_uri'], report['run_id'])}"
        )
    return 0


def _tune(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, apply_overrides
    from pipeline.tune.search import SearchOptions, format_table, resume_search, run_search
    from pipeline.tune.space import read_space_file

    # Trial progress lines are the point of a long search: shown without -v too, plain as
    # iid train's epoch lines (with -v, the log's timestamps and names show them as logs).
    progress = logging.getLogger("pipeline.tune.search")
    progress.setLevel(logging.INFO)
    quiet = not logging.getLogger("pipeline").isEnabledFor(logging.INFO)
    if quiet and not any(h.get_name() == "iid-progress" for h in progress.handlers):
        plain = logging.StreamHandler(sys.stdout)
        plain.set_name("iid-progress")
        plain.setFormatter(logging.Formatter("%(message)s"))
        progress.addHandler(plain)
        progress.propagate = False
    if args.resume:
        if args.config or args.space:
            raise ConfigError("--resume PATH takes no --config or --space (the search keeps them)")
        outcome = resume_search(args.resume)
    else:
        if not (args.config and args.space):
            raise ConfigError("expected --config FILE and --space FILE, or --resume PATH")
        overrides = _overrides(args)
        for key, value in (
            ("scaling.num_workers", args.workers),
            ("scaling.cpus_per_worker", args.cpus_per_worker),
        ):
            if value is not None:
                overrides.append(f"{key}={value}")
        if args.gpu:
            overrides.append("scaling.use_gpu=true")
        space = read_space_file(args.space)
        # The space's sizing (epochs, workers per trial, GPU), then what the user set.
        base = space.sized(_read_yaml(args.config))
        try:
            base = apply_overrides(base, overrides)
        except ConfigError as err:
            raise ConfigError(f"{args.config}: {err}") from err
        flags = {
            "num_samples": args.num_samples,
            "max_concurrent": args.max_concurrent,
            "metric": args.metric,
            "algorithm": args.search,
            "grace_period": args.grace_period,
            "reduction_factor": args.reduction_factor,
        }
        opts = SearchOptions.resolve(
            args.name or f"tune-{Path(args.space).stem}",
            space.search,
            {k: v for k, v in flags.items() if v is not None},
            args.space,
        )
        outcome = run_search(base, space.raw, opts, args.space)
    from pipeline import tracking

    print(format_table(outcome))
    if outcome.best_config is not None:
        print(
            f"best config: {outcome.best_config}\n"
            f"  train it: iid train --config {outcome.best_config}"
        )
    trials, plots = (
        storage.join(outcome.folder, "trials.csv"),
        storage.join(outcome.folder, "plots"),
    )
    print(f"trials: {trials}; plots: {plots}")
    print(
        f"mlflow: parent run {outcome.parent_run_id} in {outcome.tracking_uri}\n"
        f"  browse: {tracking.browse(outcome.tracking_uri, outcome.parent_run_id)}"
    )
    return 0


def _read_yaml(path: str) -> dict:
    from pipeline.config import read_mapping

    return read_mapping(path, "file")


def _print_baselines(cfg) -> None:
    """Baselines recorded in the manifest for this class merge (the generated scene has them)."""
    from pipeline.data.format import read_manifest

    recorded = read_manifest(cfg.data.shards).get(f"baselines_{cfg.data.merge}", {})
    for name, acc in recorded.items():
        print(f"baseline {name.removesuffix('_acc').replace('_', ' ')}: ACC {acc:.3f}")


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline import tracking
    from pipeline.evaluate import evaluate_uri, format_evaluation
    from pipeline.plots import write_plots

    tracking.use(tracking.resolve_uri(args.tracking_uri))
    ev, classes, _ = evaluate_uri(args.model, args.data, args.split, args.merge)
    print(format_evaluation(ev, classes))
    if args.plots:
        write_plots(ev, classes, [], Path(args.plots))
        print(f"plots: {args.plots}")
    return 0


def _segment(args: argparse.Namespace) -> int:
    from pipeline import tracking
    from pipeline.segment.run import SegmentOptions, read_names, segment

    tracking.use(tracking.resolve_uri(args.tracking_uri))
    opts = SegmentOptions(
        head=args.head,
        subhead=args.subhead,
        core=args.core,
        margin=args.margin,
        batch_size=args.batch_size,
        actors=args.actors,
        readers=args.readers,
        cpus_per_actor=args.cpus_per_actor,
        gpu=args.gpu,
        probabilities=args.probabilities,
        names=read_names(args.names) if args.names else (),
        overwrite=args.overwrite,
        preview_size=args.preview_size,
        progress=not args.no_progress,
    )
    report = segment(args.model, args.src, args.out, opts, say=_say)
    for _source, outputs, _ in report.done:
        print(f"map: {outputs.clusters}")
        if opts.probabilities:
            print(f"probabilities: {outputs.probabilities}")
        print(f"preview: {outputs.preview}")
    pixels = sum(s.height * s.width for s, _, _ in report.done)
    print(
        f"segmented {len(report.done)} raster(s), {pixels / 1e6:.1f} megapixels in "
        f"{report.seconds:.1f} s; {len(report.skipped)} already done, "
        f"{len(report.failed)} failed"
    )
    if report.failed:
        print(f"iid segment: {len(report.failed)} raster(s) not segmented:", file=sys.stderr)
        for line in report.failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def _say(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)  # above the progress bar, when there is one


# TilingOptions field <- argparse destination, for the options a `prepare` kind takes.
_TILING_FLAGS = {
    "tile": "tile",
    "stride": "stride",
    "scale": "downscale",
    "test_fraction": "test_fraction",
    "seed": "seed",
    "rows_per_shard": "rows_per_shard",
    "compression": "compression",
    "skip_bad": "skip_bad",
    "overwrite": "overwrite",
    "max_nodata": "max_nodata",
}


def _tiling(args: argparse.Namespace):
    """TilingOptions from the flags this kind of data accepts; the others keep their defaults."""
    from pipeline.prepare.run import TilingOptions

    given = {f: getattr(args, a) for f, a in _TILING_FLAGS.items() if hasattr(args, a)}
    if "stride" in given:
        given["stride"] = given["stride"] or given["tile"]
    if hasattr(args, "no_progress"):
        given["progress"] = not args.no_progress
    opts = TilingOptions(**given)
    _check_output(args, opts)
    return opts


def _check_output(args: argparse.Namespace, opts) -> None:
    """OUT can take the dataset, checked before any input is read or scene generated."""
    from pipeline.prepare.shards import check_output

    out = Path(args.out) / ("shards" if args.kind == "synthetic" else "")
    check_output(out, opts.overwrite)


def _report(manifest: dict, out: Path) -> int:
    splits = ", ".join(f"{k} {v['tiles']}" for k, v in manifest["splits"].items())
    print(f"wrote {len(manifest['shards'])} shard(s) to {out}: tiles {splits}")
    for bad in manifest["bad_files"]:
        print(f"skipped: {bad['error']}", file=sys.stderr)
    skipped = manifest.get("nodata", {}).get("skipped_tiles", 0)
    if skipped:
        limit = manifest.get("tiling", {}).get("max_nodata", 0.5)
        print(
            f"skipped {skipped} tile(s) more than {limit:.0%} nodata (per file in the manifest)",
            file=sys.stderr,
        )
    return 0


def _prepare_potsdam(args: argparse.Namespace) -> int:
    from pipeline.prepare.potsdam import prepare_potsdam

    out = Path(args.out)
    return _report(
        prepare_potsdam(Path(args.src), out, _tiling(args), args.variant, args.labels), out
    )


def _prepare_folder(args: argparse.Namespace) -> int:
    from pipeline.prepare.folder import prepare_folder

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    out = Path(args.out)
    manifest = prepare_folder(
        Path(args.src),
        out,
        _tiling(args),
        args.bands,
        labels=path(args.labels),
        classes=path(args.classes),
        num_classes=args.num_classes,
        palette=path(args.palette),
        ignore_index=args.ignore_index,
        merges=args.merge or (),
    )
    status = _report(manifest, out)
    unpaired = manifest.get("unpaired_masks", [])
    if unpaired:
        print(
            f"warning: {len(unpaired)} mask(s) pair with no image (listed in the manifest's "
            f"unpaired_masks), first: {unpaired[0]}",
            file=sys.stderr,
        )
    return status


def _prepare_synthetic(args: argparse.Namespace) -> int:
    from pipeline.prepare.synthetic import SceneSpec, prepare_synthetic

    out = Path(args.out)
    spec = SceneSpec(
        size=args.size,
        seed=args.scene_seed,
        roads=args.roads,
        buildings=args.buildings,
        trees=args.trees,
    )
    manifest = prepare_synthetic(
        out, _tiling(args), spec, baselines=not args.no_baselines, say=_say
    )
    for name, value in manifest.get("baselines_potsdam3", {}).items():
        print(f"baseline {name}: {value}")
    return _report(manifest, out / "shards")


def _prepare_cocostuff(args: argparse.Namespace) -> int:
    from pipeline.prepare.cocostuff import prepare_cocostuff

    out = Path(args.out)
    manifest = prepare_cocostuff(
        Path(args.src),
        out,
        _tiling(args),
        args.subset,
        args.prescale,
        args.min_target,
        args.min_side,
        Path(args.ids) if args.ids else None,
    )
    print("curation: " + ", ".join(f"{k} {v}" for k, v in manifest["curation"].items()))
    return _report(manifest, out)


def _prepare_clustering(args: argparse.Namespace) -> int:
    from pipeline.prepare import clustering

    out, opts = Path(args.out), _tiling(args)
    if args.kind == "digits":
        manifest = clustering.prepare_digits(out, opts)
    elif args.kind == "mnist":
        manifest = clustering.prepare_mnist(Path(args.src), out, opts)
    elif args.kind == "stl10":
        manifest = clustering.prepare_stl10(Path(args.src), out, opts)
    else:
        manifest = clustering.prepare_class_folders(Path(args.src), out, opts, args.size)
    return _report(manifest, out)


# ------------------------------------------------------------------------------ the parser
def _tracking_option() -> argparse.ArgumentParser:
    """--tracking-uri, as train, tune and evaluate take it."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)",
    )
    return p


def _config_options(tracking: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--set and --tracking-uri, as train and tune take them."""
    p = argparse.ArgumentParser(add_help=False, parents=[tracking])
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set loss.lamb_b=2 (repeatable)",
    )
    return p


def _tiling_options(tile: int = 200) -> argparse.ArgumentParser:
    """How rasters are cut into tiles (the raster kinds of `prepare`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--tile",
        type=int,
        default=tile,
        help="tile side in output pixels (default %(default)s); tiles at the right and bottom "
        "edges reach past the raster, padded and masked, so every pixel is in a tile",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="step between tiles in output pixels (default: the tile side, no overlap)",
    )
    p.add_argument(
        "--downscale",
        type=float,
        default=1.0,
        help="output pixels per source pixel, "
        "in (0, 1]; the reference uses 0.5 for Potsdam (images bilinear, labels nearest)",
    )
    p.add_argument(
        "--max-nodata",
        type=float,
        default=0.5,
        help="skip tiles whose pixels inside the raster are more than this share nodata "
        "(the raster's nodata value or mask, NaN); default %(default)s, 1 keeps every tile "
        "with data",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _split_options() -> argparse.ArgumentParser:
    """The deterministic hold-out of labelled data (kinds whose files do not name the split)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="share of labelled tiles held out as the test split (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the deterministic train/test split")
    return p


def _output_options(skip_bad: bool = True) -> argparse.ArgumentParser:
    """How shards are written (every kind of `prepare`); ``skip_bad``: offer --skip-bad (only
    kinds that can skip a bad file and go on)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--rows-per-shard", type=int, default=256, help="tiles per Parquet file")
    p.add_argument(
        "--compression",
        choices=["lz4", "zstd", "snappy", "none"],
        default="lz4",
        help="Parquet codec: lz4 (default) is fastest to write and read, zstd smallest",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset already in OUT (the old one stays until the new one is "
        "complete; without it, a non-empty OUT is refused)",
    )
    if skip_bad:
        p.add_argument(
            "--skip-bad",
            action="store_true",
            help="exit 0 even if some files were "
            "skipped as unreadable (they are listed in the manifest either way)",
        )
    return p


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the main job end to end on embedded data",
        description="Train IID on embedded data, evaluate (ACC/NMI/ARI) and compare with k-means.",
    )
    demo.add_argument("--out", default="demo-output", help="folder for the results")
    demo.add_argument(
        "--epochs", type=int, default=40, help="training epochs (each: head A, B); ~1.3 s each"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(func=_demo)


def _add_train(sub, run: argparse.ArgumentParser) -> None:
    train = sub.add_parser(
        "train",
        parents=[run],
        help="train IID with Ray Train (DDP) and log to MLflow",
        description="Train IID on prepared shards: Ray Train workers (gloo on CPU, NCCL on GPU), "
        "a checkpoint every epoch, evaluation every epoch, MLflow tracking. Re-running the same "
        "run.name resumes from its last checkpoint.",
    )
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument(
        "--extend",
        action="store_true",
        help="train a finished run further: only optim.epochs may differ from its config",
    )
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the config after --set overrides (YAML) and exit",
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="check config, data, tracking store, run folder and cluster address, say what "
        "would run, start nothing",
    )
    train.set_defaults(func=_train)


def _add_tune(sub, run: argparse.ArgumentParser) -> None:
    tune = sub.add_parser(
        "tune",
        parents=[run],
        help="search hyperparameters with Ray Tune (ASHA, Optuna), tracked in MLflow",
        description="Search a space of config values (tune_spaces/*.yaml): every trial is a Ray "
        "Train run of the config with sampled values; ASHA stops weak trials early. Trials are "
        "ranked without labels by default (mi: head B's lambda=1 mutual information on held-out "
        "pairs); ACC/NMI/ARI are logged beside it. Writes trials.csv, plots and "
        "best_config.yaml under run.storage_path/NAME, and one MLflow parent run with a child "
        "run per trial. An interrupted search continues with --resume.",
    )
    tune.add_argument("--config", help="base YAML config (see configs/)")
    tune.add_argument("--space", help="search space YAML (see tune_spaces/)")
    tune.add_argument(
        "--resume",
        metavar="PATH",
        help="continue the interrupted search in PATH (run.storage_path/NAME); finished trials "
        "are kept, unfinished ones resume from their last checkpoint",
    )
    tune.add_argument(
        "--name", help="search name: its folder and MLflow run (default: tune-<space name>)"
    )
    # Each of these defaults to the space file's search section, then to SearchOptions'.
    tune.add_argument("--num-samples", type=int, help="trials (default: the space's, else 8)")
    tune.add_argument(
        "--max-concurrent", type=int, help="trials at once (default: the space's, else 1)"
    )
    tune.add_argument(
        "--metric",
        help="ranking: mi (label-free, default), agreement (label-free, sub-heads' mean NMI "
        "with each other; 2+ sub-heads), or acc/miou/nmi/ari when the eval split has labels",
    )
    tune.add_argument("--search", help="optuna (TPE, default) or random (needed for grid)")
    tune.add_argument(
        "--grace-period",
        type=int,
        help="epochs before ASHA may stop a trial (default: the space's, else 1)",
    )
    tune.add_argument(
        "--reduction-factor",
        type=int,
        help="ASHA keeps 1/N of the trials at each rung (default: the space's, else 2)",
    )
    tune.add_argument("--workers", type=int, help="training workers per trial (scaling)")
    tune.add_argument("--cpus-per-worker", type=float, help="CPUs per training worker")
    tune.add_argument("--gpu", action="store_true", help="one GPU per training worker")
    tune.set_defaults(func=_tune)


def _add_evaluate(sub, tracking: argparse.ArgumentParser) -> None:
    ev = sub.add_parser(
        "evaluate",
        parents=[tracking],
        help="score a trained model on prepared shards (ACC, NMI, ARI per sub-head)",
        description="Evaluate head B of a model with Hungarian-matched ACC, NMI and ARI from "
        "streamed confusion counts; the sub-head with the lowest lambda=1 IID loss (the highest "
        "mutual information I(z, z')) on evaluation pairs is the model's (label-free) answer.",
    )
    ev.add_argument(
        "--model",
        required=True,
        help="a checkpoint (file, checkpoint dir, or run dir: newest checkpoint) or an MLflow "
        "model URI such as models:/demo/1 or runs:/<run id>/model",
    )
    ev.add_argument("--data", required=True, help="prepared shards folder (manifest.json)")
    ev.add_argument(
        "--split",
        action="append",
        help="split to score (repeatable; default: the model's data.eval_split)",
    )
    ev.add_argument(
        "--merge", default=None, help="class merge, e.g. potsdam3 (default: the model's)"
    )
    ev.add_argument("--plots", default="", help="also write joint/confusion/overlay PNGs here")
    ev.set_defaults(func=_evaluate)


def _add_segment(sub, tracking: argparse.ArgumentParser) -> None:
    seg = sub.add_parser(
        "segment",
        parents=[tracking],
        help="segment whole rasters with a trained model into georeferenced maps (COG)",
        description="Segment rasters of any size with a trained model, as Ray Data batch "
        "inference: overlapping windows (each core read with a margin of context, only the "
        "core kept, so tile borders leave no seam), scored by a pool of model actors, written "
        "as a tiled, compressed Cloud-Optimised GeoTIFF per raster (uint8 cluster ids, nodata "
        "255, the input's CRS and transform, overviews, a colour table), with a PNG preview. "
        "A map gets its final name when complete; a rerun skips rasters already done.",
    )
    seg.add_argument(
        "--model",
        required=True,
        help="a run folder, checkpoint, or MLflow model URI (models:/demo/latest)",
    )
    seg.add_argument(
        "--src", required=True, help="a raster, a folder of rasters, or a glob ('tiles/*.tif')"
    )
    seg.add_argument("--out", default="segmented", help="output folder (default %(default)s)")
    seg.add_argument(
        "--head", choices=["A", "B"], default="B", help="B (default) or A (overclustering)"
    )
    seg.add_argument(
        "--subhead", type=int, default=-1, help="sub-head (default: the model's choice)"
    )
    seg.add_argument(
        "--probabilities",
        action="store_true",
        help="also write NAME_probabilities.tif: one uint8 band per cluster, p * 254",
    )
    seg.add_argument(
        "--names",
        metavar="FILE",
        help="YAML list (or id: name mapping) of cluster names for the legend and band "
        "description (default: the classes the clusters matched on labelled held-out data)",
    )
    seg.add_argument(
        "--core", type=int, default=256, help="kept pixels per window side (multiple of 16)"
    )
    seg.add_argument(
        "--margin",
        type=int,
        default=32,
        help="context read around each core (default %(default)s; 0 turns blending off)",
    )
    seg.add_argument("--batch-size", type=int, default=8, help="windows per scored batch")
    seg.add_argument("--actors", type=int, default=1, help="model actors (default %(default)s)")
    seg.add_argument(
        "--readers", type=int, default=0, help="read tasks at once (default: one per actor)"
    )
    seg.add_argument(
        "--cpus-per-actor", type=float, default=2.0, help="CPUs (torch threads) per CPU actor"
    )
    seg.add_argument("--gpu", action="store_true", help="one GPU per model actor")
    seg.add_argument(
        "--overwrite", action="store_true", help="redo rasters whose map already exists"
    )
    seg.add_argument(
        "--preview-size", type=int, default=1024, help="longest side of the preview PNG"
    )
    seg.add_argument("--no-progress", action="store_true", help="no progress bar")
    seg.set_defaults(func=_segment)


def _add_prepare(sub) -> None:
    prep = sub.add_parser(
        "prepare",
        help="tile raw data into Parquet shards",
        description="Tile raw imagery into Parquet shards plus manifest.json.",
    )
    kinds = prep.add_subparsers(dest="kind", required=True)
    output, split = _output_options(), _split_options()
    rasters = [_tiling_options(), split, output]  # every option a raster kind takes
    pots = kinds.add_parser(
        "potsdam",
        parents=rasters,
        help="ISPRS Potsdam release layout",
        description="Tile an ISPRS Potsdam release (2_Ortho_RGB, 3_Ortho_IRRG, 4_Ortho_RGBIR, "
        "5_Labels_all[_noBoundary]) into shards. Labels keep the 6 classes; black boundaries and "
        "off-palette colours become 255 (ignored) and are counted in the manifest; the "
        "Potsdam-3 merge is recorded there. Tiles without labels go to the unlabelled split.",
    )
    pots.add_argument("src", help="release folder")
    pots.add_argument("out", help="output folder for shards and manifest.json")
    pots.add_argument(
        "--variant",
        choices=["rgb", "irrg", "rgbir"],
        default="rgb",
        help="which ortho product to tile (3, 3 or 4 bands)",
    )
    pots.add_argument(
        "--labels",
        choices=["noboundary", "all"],
        default="noboundary",
        help="5_Labels_all_noBoundary (eroded edges ignored) or 5_Labels_all",
    )
    pots.set_defaults(func=_prepare_potsdam)

    fold = kinds.add_parser(
        "folder",
        parents=rasters,
        help="a folder of your own PNG/JPEG/TIFF images, with masks or without",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Tile every PNG/JPEG/TIFF under SRC (recursively); other files are reported as bad input.
Images with another band count than most of them (or --bands) are skipped and reported.
Masks pair by relative path and stem: SRC/a/x.tif takes LABELS/a/x.png (or .jpg .jpeg
.tif .tiff); a SRC holding img_dir/ and ann_dir/ (mmsegmentation, LoveDA) pairs those
without --labels. Images without a mask go to the unlabelled split (trained on, not
scored); masks without an image are listed in the manifest (unpaired_masks).
A mask is either
  a class-index raster: 1 band of class ids (uint8/uint16); --classes names them,
    --num-classes K makes them 0..K-1, else the ids found in the masks (one pass over
    them before tiling) are the classes; other values fail the file, naming it;
  a colour-coded RGB raster with --palette: colours off the palette are ignored (255)
    and counted in the manifest.""",
        epilog="""\
--classes / --palette YAML: a list (the position is the id) or a mapping id -> entry;
an entry is a name or {name: building, colour: [0, 0, 255]}; {name: boundary,
colour: [0, 0, 0], ignore: true} marks ignored pixels (counted, takes no id), e.g.
  - {name: road, colour: [255, 255, 255]}
  - {name: building, colour: [0, 0, 255]}
--merge coarse=road+car,building+clutter,veg:low_veg+tree records a class merge in the
manifest (train with --set data.merge=coarse); classes are names or ids, a group is
named label:a+b or its members joined by _and_; classes in no group are ignored. A
--merge FILE maps names to such strings, or to lists of groups ([a, b] or {label: [a, b]}).""",
    )
    fold.add_argument("src", help="image folder")
    fold.add_argument("out", help="output folder for shards and manifest.json")
    fold.add_argument(
        "--bands",
        type=int,
        default=None,
        help="required band count (default: the count most images have)",
    )
    fold.add_argument(
        "--labels", metavar="LABELS", help="mask folder mirroring SRC (may lie inside SRC)"
    )
    fold.add_argument("--classes", metavar="FILE", help="YAML naming the class ids of the masks")
    fold.add_argument(
        "--num-classes",
        type=int,
        metavar="K",
        help="masks hold class ids 0..K-1 (no pass over the masks)",
    )
    fold.add_argument(
        "--ignore-index",
        type=int,
        metavar="N",
        help="mask value of ignored pixels in class-index masks (default 255)",
    )
    fold.add_argument("--palette", metavar="FILE", help="YAML of class colours: RGB masks")
    fold.add_argument(
        "--merge",
        action="append",
        metavar="NAME=GROUPS|FILE",
        help="record a class merge in the manifest (repeatable; see below)",
    )
    fold.set_defaults(func=_prepare_folder)

    syn = kinds.add_parser(
        "synthetic",
        parents=rasters,
        help="the generated aerial-like scene behind `make demo`",
        description="Generate an aerial-like scene as GeoTIFFs in the Potsdam layout under "
        "OUT/raw, then prepare it like real Potsdam data into OUT/shards; records colour-only "
        "and context baselines in the manifest.",
    )
    syn.add_argument("out", help="output folder")
    syn.add_argument("--size", type=int, default=2048, help="scene side in pixels (>= 256)")
    syn.add_argument("--scene-seed", type=int, default=0, help="seed of the generated scene")
    syn.add_argument(
        "--roads", type=int, default=0, help="roads per direction (0: one per 256 px of side)"
    )
    syn.add_argument(
        "--buildings",
        type=float,
        default=1.0,
        help="building density, 0-4 (1: the default scene; 0.1 with --roads 2: a rural scene "
        "with 70%% vegetation)",
    )
    syn.add_argument("--trees", type=float, default=1.0, help="tree density, 0-4")
    syn.add_argument("--no-baselines", action="store_true", help="skip the baseline measurements")
    syn.set_defaults(func=_prepare_synthetic)

    coco = kinds.add_parser(
        "cocostuff",
        parents=[_tiling_options(tile=128), split, output],
        help="COCO-Stuff 164k layout -> COCO-Stuff-3 or -15",
        description="Map COCO-Stuff fine labels to the 27 coarse classes and to the subset "
        "(3: sky/plant/ground, 15: the stuff superclasses; other pixels ignored), curate, "
        "pre-scale and centre-crop to a --tile square (pairs crop randomly from it).",
    )
    coco.add_argument(
        "src",
        help="folder with images/{train2017,val2017} and "
        "stuffthingmaps_trainval2017/{train2017,val2017}",
    )
    coco.add_argument("out", help="output folder for shards and manifest.json")
    coco.add_argument("--subset", type=int, choices=[3, 15], default=3)
    coco.add_argument(
        "--prescale",
        type=float,
        default=0.33,
        help="resize factor before the crop (reference 0.33)",
    )
    coco.add_argument(
        "--min-target",
        type=float,
        default=0.75,
        help="keep images with at least this share of target-class pixels (reference 0.75)",
    )
    coco.add_argument(
        "--min-side",
        type=int,
        default=360,
        help="keep images whose shorter side is at least this many pixels (reference 360)",
    )
    coco.add_argument("--ids", default=None, help="file of image ids to keep instead of the rule")
    coco.set_defaults(func=_prepare_cocostuff)

    # Whole images: no tiling, so no --tile, --stride or --downscale. Only `classes` can skip a
    # bad file and go on (a broken MNIST or STL-10 file stops the prepare), so only it takes
    # --skip-bad; stl10's files always name the split, so it takes no --test-fraction.
    whole_output = _output_options(skip_bad=False)
    whole = {
        "digits": (
            "scikit-learn's 8x8 digits, shipped inside the package (no SRC)",
            "A hash of each image's index and --seed holds --test-fraction of them out as test.",
            [split, whole_output],
        ),
        "mnist": (
            "MNIST IDX files (train-/t10k-images-idx3-ubyte[.gz] and labels) or CSVs in SRC",
            "SRC: a folder with the IDX files, a folder with .csv files, or one .csv file. IDX: "
            "with both the train- and the t10k- set the files name the split and --test-fraction "
            "does not apply; with one set, --test-fraction of its images (by a hash of their "
            "index and --seed) are held out as test. CSV (Kaggle's mnist_train.csv): a line per "
            "image, its class id 0-9 then side*side pixel values 0-255, after an optional header "
            "line; when SRC holds a file named *train* and one named *test*, the names decide "
            "their split, and every other file (or a single .csv) is split by --test-fraction. A "
            "bad line stops the prepare before anything is written, naming the file and line.",
            [split, whole_output],
        ),
        "stl10": (
            "STL-10 binary files (train_X.bin, train_y.bin, test_*, unlabeled_X.bin) in SRC",
            "The files name the split: train, test and unlabelled.",
            [whole_output],
        ),
        "classes": (
            "a folder with one sub-folder of images per class",
            "Greyscale stays one band: if most images are greyscale the dataset has one band "
            "(16-bit images kept as uint16) and a colour image in it is a bad file; otherwise "
            "three (RGB, alpha dropped, greyscale repeated). A hash of each file's index and "
            "--seed holds --test-fraction of the images out as test. Unreadable files, and "
            "images of another size without --size, are listed as bad files.",
            [split, output],
        ),
    }
    for kind, (text, how, parents) in whole.items():
        p = kinds.add_parser(
            kind,
            parents=parents,
            help=f"whole images for clustering: {text}",
            description=f"Write {text} as shards, one image per row with its class id. {how}",
        )
        if kind == "mnist":
            p.add_argument("src", help="folder of IDX or .csv files, or one .csv file")
        elif kind != "digits":
            p.add_argument("src", help="source folder")
        p.add_argument("out", help="output folder for shards and manifest.json")
        if kind == "classes":
            p.add_argument(
                "--size",
                type=int,
                default=0,
                help="resize every image to SIZE x SIZE (default: keep sizes)",
            )
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(func=_prepare_clustering)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iid",
        description="Invariant Information Distillation: unsupervised clustering and segmentation.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {importlib.metadata.version('iid-pipeline')}",
    )
    _verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    tracking = _tracking_option()
    run = _config_options(tracking)
    _add_demo(sub)
    _add_train(sub, run)
    _add_tune(sub, run)
    _add_evaluate(sub, tracking)
    _add_segment(sub, tracking)
    _add_prepare(sub)
    _verbosity_everywhere(parser)
    return parser


def _verbosity(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v and -q: with defaults on the top-level parser only (``top``)."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0 if top else argparse.SUPPRESS,
        help="-v: the project's progress logs (INFO); -vv: Ray's and MLflow's own too",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="errors only",
    )


def _verbosity_everywhere(parser: argparse.ArgumentParser) -> None:
    """-v/-q after a sub-command too (``iid train --config X -v``); SUPPRESS keeps a sub-command
    without them from resetting what was given before it."""
    for action in parser._actions:  # argparse has no public walk over sub-commands
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _verbosity(sub, top=False)
                _verbosity_everywhere(sub)


def _set_verbosity(verbose: int, quiet: bool) -> None:
    """-q: errors only; default: warnings and the project's own messages; -v: the project's
    INFO logs; -vv: Ray's and MLflow's own logs too."""
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    theirs = logging.INFO if verbose >= 2 and not quiet else logging.WARNING
    # The variable for processes that import MLflow later (Ray workers), the level for this one.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(theirs))
    for name in ("mlflow", "ray", "alembic"):
        logging.getLogger(name).setLevel(theirs)
    if theirs == logging.INFO:
        from pipeline.train import THIRD_PARTY_LOGS

        os.environ[THIRD_PARTY_LOGS] = "1"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _set_verbosity(args.verbose, args.quiet)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"iid {args.command}: interrupted", file=sys.stderr)
        return 130
    except (PrepareError, storage.StorageError, ValueError, OSError, RuntimeError) as err:
        log.info("iid %s failed", args.command, exc_info=True)  # the traceback, with -v
        print(f"iid {args.command}: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, BadFilesError) else 2


if __name__ == "__main__":
    sys.exit(main())
