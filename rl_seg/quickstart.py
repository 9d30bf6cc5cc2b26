"""`make quickstart`: the scoring demo on DRIVE (until the PPO job lands, which gives it its final meaning).

It scores DRIVE's second human observer against the first (the human level, about Dice 0.79) with the same tool a
user runs on any model's saved outputs, and writes the JSON report and a threshold-sweep plot. It uses the full
DRIVE test set when ../shared/data (or RL_SEG_DATA_DIR) has it, and the sample shipped in data/samples otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import main as cli_main
from .data import DataError, resolve_root


def main() -> int:
    try:
        dataset, root = "drive", resolve_root("drive")
    except DataError:
        dataset, root = "drive-sample", resolve_root("drive-sample")
    out = Path("runs") / "quickstart"
    print(f"rl-seg quickstart: scoring DRIVE's second observer against the first ({dataset}: {root})\n")
    return cli_main(["score", "--pred", str(root / "test" / "2nd_manual"), "--data", dataset, "--split", "test",
                     "--thresholds", "0.1,0.3,0.5,0.7", "--out", str(out / "score.json"),
                     "--plot", str(out / "threshold_sweep.png")])


if __name__ == "__main__":
    sys.exit(main())
