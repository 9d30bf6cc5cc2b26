"""The `rl-seg` command: one entry point, a subcommand per job.

Each subcommand's module is imported only when it runs, so `rl-seg score` does not pay for torch or Ray.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .data import DataError


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"thresholds must be comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"thresholds must lie in [0, 1), got {text!r}")
    return values


def cmd_score(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .score import format_report, plot_sweep, score_predictions, write_json

    dataset = load_dataset(args.data, args.split)
    report = score_predictions(args.pred, dataset, args.thresholds, progress=not args.quiet)
    print(format_report(report, per_image=not args.summary))
    if args.out:
        print(f"wrote {write_json(report, args.out)}")
    if args.plot:
        print(f"wrote {plot_sweep(report, args.plot)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rl-seg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score = sub.add_parser("score", help="score saved predictions against a dataset",
                           description="Score saved predictions (binary masks or probability maps) against a "
                                       "dataset, per image and mean, inside the FOV where there is one.")
    score.add_argument("--pred", type=Path, required=True, help="folder of predictions; a file matches a sample "
                       "when its stem is the sample id or starts with the id and an underscore")
    score.add_argument("--data", required=True, help="dataset name (drive, arcade, drive-sample, arcade-sample) "
                       "or a dataset folder")
    score.add_argument("--split", default="test", help="split to score (default: test)")
    score.add_argument("--thresholds", type=_thresholds, default=[0.5],
                       help="comma-separated thresholds for the sweep, e.g. 0.1,0.3,0.5,0.7 (0.5 is always in)")
    score.add_argument("--out", type=Path, help="write the JSON report here")
    score.add_argument("--plot", type=Path, help="write a PNG of the threshold sweep here")
    score.add_argument("--summary", action="store_true", help="print only the means, not every image")
    score.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except DataError as exc:
        print(f"rl-seg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
