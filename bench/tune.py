"""Search on the generated default: how well does the label-free choice agree with ACC?

A real ``iid tune`` search (Ray Tune + Ray Train trials, ASHA, Optuna, MLflow) over lambda_B,
the half window T and the augmentation strength (``tune_spaces/demo.yaml``) on the demo config
and the generated scene. Prints the table of trials, the chosen config, its ACC, and Spearman's
rank correlation between the label-free criterion (mi) and ACC across trials.

    python bench/tune.py                          # 12 trials, up to 3 epochs each, 1 at a time
    python bench/tune.py --trials 6 --epochs 2
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import apply_overrides  # noqa: E402
from pipeline.prepare.run import TilingOptions  # noqa: E402
from pipeline.prepare.synthetic import SceneSpec, prepare_synthetic  # noqa: E402
from pipeline.tune.search import SearchOptions, format_table, run_search  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=1)
    parser.add_argument("--scene", type=int, default=2048, help="generated scene side (pixels)")
    parser.add_argument("--work", default="", help="working folder (default: a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pipeline.tune").setLevel(logging.INFO)

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-tune-"))
    shards = work / "synthetic" / "shards"
    if not (shards / "manifest.json").is_file():
        opts = TilingOptions(tile=200, stride=200, progress=False)
        prepare_synthetic(work / "synthetic", opts, SceneSpec(size=args.scene), baselines=True)
    base = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    base = apply_overrides(
        base,
        [
            f"data.shards={shards}",
            f"optim.epochs={args.epochs}",
            "scaling.num_workers=1",
            f"scaling.cpus_per_worker={2 / args.concurrent}",
            f"run.storage_path={work / 'runs'}",
            f"run.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            "run.experiment=bench-tune",
        ],
    )
    space = yaml.safe_load((ROOT / "tune_spaces" / "demo.yaml").read_text())
    name = f"bench-{int(time.time())}"
    opts = SearchOptions(name=name, num_samples=args.trials, max_concurrent=args.concurrent)
    start = time.perf_counter()
    outcome = run_search(base, space, opts, "tune_spaces/demo.yaml")
    minutes = (time.perf_counter() - start) / 60

    print(f"\n{args.trials} trials over {', '.join(space['params'])} in {minutes:.1f} min")
    print(format_table(outcome))
    if outcome.best is not None:
        print(f"chosen config (label-free, by mi): {outcome.best.params}")
        print(f"  its ACC {outcome.best.metrics.get('acc', float('nan')):.3f}")
        top = max(outcome.rows, key=lambda r: r.metrics.get("acc", -1.0))
        print(f"  best ACC of any trial {top.metrics.get('acc', float('nan')):.3f} ({top.params})")
    print(f"  best config: {outcome.best_config}")
    print(f"Spearman rank correlation of mi and ACC across trials: {outcome.spearman:.3f}")
    print(f"command: python bench/tune.py {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
