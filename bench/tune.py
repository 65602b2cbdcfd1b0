"""Search: how well does a label-free criterion agree with ACC, trial against trial?

A real ``iid tune`` search (Ray Tune + Ray Train trials, ASHA, Optuna, MLflow) on a labelled
case, then every trial's per-epoch metrics from MLflow. Trials are compared at equal budgets: at
each epoch (ASHA's rungs are epochs), among the trials that reached it, Spearman's rank
correlation between each label-free criterion and ACC. Criteria, all from the held-out pairs
every epoch scores:

- ``mi``: I(z, z') of the chosen sub-head (the lambda = 1 objective; what ``iid tune`` ranks by);
- ``mean sub-head mi``: I(z, z') averaged over the sub-heads (less luck of one initialisation);
- ``-lambda_B loss``: the objective the trial trained with (lambda_B > 1 adds the entropies);
- ``balance``: the entropy of the chosen sub-head's cluster masses over ln K (1: equal masses);
- ``agreement``: the chosen sub-head's mean NMI with the other sub-heads (a clustering that
  every initialisation finds).

Cases: ``synthetic`` (the generated scene, configs/demo.yaml, tune_spaces/demo.yaml),
``rural`` (bench/quality.py's held-out rural scene, classes 70/20/10%, the same config and
space: does held-out MI choose a weaker balance term where the classes are skewed?),
``digits28`` (the even half of the 28 px digits stand-in with the clustering defaults,
configs/clustering.yaml, tune_spaces/clustering.yaml) and ``potsdam3`` (bench/quality.py's
potsdam-mini P3 config, tune_spaces/aerial.yaml's params). All but ``rural`` are tuned cases:
their labels chose recipes before (see bench/quality.py), but not the criterion. The space
files' own sizing (search and config sections) is not used: the flags here set it.

    python bench/tune.py                          # synthetic: 12 trials, up to 3 epochs each
    python bench/tune.py --case digits28 --trials 8 --epochs 30
    python bench/tune.py --case potsdam3 --trials 10 --epochs 4
    python bench/tune.py --case rural
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import apply_overrides  # noqa: E402
from pipeline.prepare.clustering import DigitsSpec, prepare_digits  # noqa: E402
from pipeline.prepare.run import TilingOptions  # noqa: E402
from pipeline.prepare.synthetic import SceneSpec, prepare_synthetic  # noqa: E402
from pipeline.tune.search import SearchOptions, format_table, run_search  # noqa: E402
from pipeline.tune.space import read_space_file  # noqa: E402

Metrics = dict[str, float]


def _mean_subhead_mi(m: Metrics) -> float:
    values = [v for k, v in m.items() if k.startswith("mi_sub")]
    return float(np.mean(values)) if values else math.nan


def _balance(m: Metrics) -> float:
    masses = np.array([v for k, v in sorted(m.items()) if k.startswith("mass_")])
    if len(masses) < 2:
        return math.nan
    p = masses[masses > 0] / masses.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(masses)))


CRITERIA: dict[str, Callable[[Metrics], float]] = {
    "mi": lambda m: m.get("mi", math.nan),
    "mean sub-head mi": _mean_subhead_mi,
    "-lambda_B loss": lambda m: -m.get("heldout_loss", math.nan),
    "balance": _balance,
    "agreement": lambda m: m.get("agreement", math.nan),
}


def prepare(case: str, work: Path, scene: int) -> tuple[dict, dict, str]:
    """(base config, space, space file) of a case, its shards prepared under ``work``."""
    if case in ("synthetic", "rural"):
        sys.path.insert(0, str(ROOT / "bench"))
        from quality import RURAL

        spec = replace(RURAL, size=scene) if case == "rural" else SceneSpec(size=scene)
        shards = work / case / "shards"
        if not (shards / "manifest.json").is_file():
            opts = TilingOptions(tile=200, stride=200, progress=False)
            prepare_synthetic(work / case, opts, spec, baselines=True)
        config, space = "configs/demo.yaml", "tune_spaces/demo.yaml"
    elif case == "potsdam3":
        # bench/quality.py's P3 case (its labels chose that recipe), around its tuned values.
        sys.path.insert(0, str(ROOT / "bench"))
        from quality import potsdam3

        base, _, _ = potsdam3(work, 0.5)  # 4 epochs
        space = "tune_spaces/aerial.yaml"
        return base, read_space_file(ROOT / space).raw, space
    else:
        shards = work / "digits28-even"
        if not (shards / "manifest.json").is_file():
            spec = DigitsSpec(size=28, copies=3, half="even", seed=0)
            prepare_digits(shards, TilingOptions(progress=False), spec)
        config, space = "configs/clustering.yaml", "tune_spaces/clustering.yaml"
    base = yaml.safe_load((ROOT / config).read_text())
    base = apply_overrides(base, [f"data.shards={shards}"])
    return base, read_space_file(ROOT / space).raw, space


def histories(tracking_uri: str, run_ids: dict[str, str]) -> dict[str, list[Metrics]]:
    """Every trial's metrics per epoch (``{trial: run id}``), from its MLflow run: epoch =
    step, names without their ``eval/``/``train/`` prefix."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    out = {}
    for trial, run_id in run_ids.items():
        by_epoch: dict[int, Metrics] = {}
        for key in client.get_run(run_id).data.metrics:
            for point in client.get_metric_history(run_id, key):
                by_epoch.setdefault(point.step, {})[key.rsplit("/", 1)[-1]] = point.value
        out[trial] = [by_epoch[e] for e in sorted(by_epoch)]
    return out


def per_rung(runs: dict[str, list[Metrics]]) -> list[tuple[int, int, dict[str, float]]]:
    """(epoch, trials that reached it, {criterion: Spearman's rho with ACC}) per epoch with at
    least 3 trials."""
    from scipy.stats import spearmanr

    rungs = []
    for epoch in range(max((len(h) for h in runs.values()), default=0)):
        at = [h[epoch] for h in runs.values() if len(h) > epoch and "acc" in h[epoch]]
        if len(at) < 3:
            continue
        acc = [m["acc"] for m in at]
        rhos = {}
        for name, criterion in CRITERIA.items():
            values = [criterion(m) for m in at]
            ok = all(math.isfinite(v) for v in values) and len(set(values)) > 1
            rhos[name] = float(spearmanr(values, acc).statistic) if ok else math.nan
        rungs.append((epoch + 1, len(at), rhos))
    return rungs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case", choices=["synthetic", "rural", "digits28", "potsdam3"], default="synthetic"
    )
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=1)
    parser.add_argument("--scene", type=int, default=2048, help="generated scene side (pixels)")
    parser.add_argument("--work", default="", help="working folder (default: a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pipeline.tune").setLevel(logging.INFO)

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-tune-"))
    base, space, space_file = prepare(args.case, work, args.scene)
    base = apply_overrides(
        base,
        [
            f"optim.epochs={args.epochs}",
            "scaling.num_workers=1",
            f"scaling.cpus_per_worker={2 / args.concurrent}",
            f"run.storage_path={work / 'runs'}",
            f"run.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            "run.experiment=bench-tune",
        ],
    )
    name = f"bench-{int(time.time())}"
    opts = SearchOptions(name=name, num_samples=args.trials, max_concurrent=args.concurrent)
    start = time.perf_counter()
    outcome = run_search(base, space, opts, space_file)
    minutes = (time.perf_counter() - start) / 60

    searched = ", ".join(space["params"])
    print(f"\n{args.case}: {args.trials} trials over {searched} in {minutes:.1f} min")
    print(format_table(outcome))
    if outcome.best is not None:
        print(f"chosen config (label-free, by mi): {outcome.best.params}")
        print(f"  its ACC {outcome.best.metrics.get('acc', float('nan')):.3f}")
        top = max(outcome.rows, key=lambda r: r.metrics.get("acc", -1.0))
        print(f"  best ACC of any trial {top.metrics.get('acc', float('nan')):.3f} ({top.params})")
    print(f"  best config: {outcome.best_config}")
    print(f"Spearman of mi and ACC across trials, each at its last epoch: {outcome.spearman:.3f}")
    runs = {r.trial_id: r.run_id for r in outcome.rows if r.run_id}
    rungs = per_rung(histories(outcome.tracking_uri, runs))
    print("\nSpearman's rho with ACC at equal epochs (trials that reached the epoch):")
    print(f"{'epoch':>5}{'trials':>7}" + "".join(f"{c:>18}" for c in CRITERIA))
    for epoch, n, rhos in rungs:
        print(f"{epoch:>5}{n:>7}" + "".join(f"{rhos[c]:>18.3f}" for c in CRITERIA))
    # With 3 trials a rho is one of 4 values: the mean leaves such rungs out.
    counted = [r for _, n, r in rungs if n >= 4]
    if counted:
        means = {c: np.nanmean([r[c] for r in counted]) for c in CRITERIA}
        label = f"mean of {len(counted)}"
        print(f"{label:>12}" + "".join(f"{means[c]:>18.3f}" for c in CRITERIA) + "  (>= 4 trials)")
    print(f"command: python bench/tune.py {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
