"""Benchmarks: model cost, training-step cost, data loading, the thesis tables and plot, the GPU check.

One file per job; `rtda.bench.cli` is the command line (`python benchmark.py SUBCOMMAND`). Re-exported here:
the names other packages and tests import from `rtda.bench`.
"""
from rtda.bench.cli import main
from rtda.bench.common import BenchmarkError
from rtda.bench.tables import build_tables, find_runs
from rtda.bench.train_cost import random_batch

__all__ = ["BenchmarkError", "build_tables", "find_runs", "main", "random_batch"]
