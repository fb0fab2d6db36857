"""Model cost (params, FLOPs, latency), training-step cost, data loading, the thesis tables and the GPU check.

    python benchmark.py --config configs/cityscapes_bisenet.yaml [--json]
    python benchmark.py --runs runs/ --table all [--format md|csv] [--plot miou_fps.png]
"""
import sys

from rtda.bench import main

if __name__ == "__main__":
    sys.exit(main())
