"""`python -m tune --config SWEEP.yaml [key=value ...]`: the same as `rl-seg tune`."""

import sys

from rl_seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
