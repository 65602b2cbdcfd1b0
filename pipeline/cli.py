"""The ``iid`` command line.

Each stage of the pipeline gets a sub-command as it lands; errors reach the user as one line
on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("pipeline")


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import DigitsDemoConfig, format_summary, run_digits_demo

    cfg = DigitsDemoConfig(epochs=args.epochs, seed=args.seed)
    summary = run_digits_demo(Path(args.out), cfg)
    print(format_summary(summary))
    print(f"metrics written to {Path(args.out) / 'demo_metrics.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iid",
        description="Invariant Information Distillation: unsupervised clustering and segmentation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run the main job end to end on embedded data",
        description="Train IID on embedded data, evaluate (ACC/NMI/ARI) and compare with k-means.",
    )
    demo.add_argument("--out", default="demo-output", help="folder for the results")
    demo.add_argument("--epochs", type=int, default=10, help="training epochs (each: head A, B)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"iid {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
