"""Model cost, training-step cost, data loading, the thesis tables, the GPU check and the synthetic experiments.

    python benchmark.py model --config configs/cityscapes_bisenet.yaml [--json]
    python benchmark.py tables --runs runs/ --table all [--format md|csv] [--plot miou_fps.png]
    python benchmark.py --help      # every subcommand; the old flat spellings still work
"""
import sys

from rtda.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
