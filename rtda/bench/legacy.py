"""The old flat spelling of `benchmark.py` (`--config X [--train-step | --data]`, `--runs`, `--gpu-check`,
`--adaptation-table`, `--step-cost`, `--pretrain-synthetic`), translated to a subcommand.

Contract: the old parser accepts every option in every mode, as it always did, and `subcommand(args)` picks the
subcommand in the old order of precedence; the subcommand's handler then runs on this namespace, so output and
exit codes are the subcommand's."""
from __future__ import annotations

import argparse

from rtda.bench.common import BenchmarkError
from rtda.bench.options import SUBCOMMANDS, add_options

# The mode flags; each of them names the subcommand it runs (`--config` runs `model` or `train-step`).
MODES = [(("--config",), {"help": "a config YAML: benchmark its model (or its training step)"}),
         (("--runs",), {"nargs": "+", "metavar": "DIR", "help": "folders of finished runs to tabulate"}),
         (("--adaptation-table",), {"action": "store_true", "help": SUBCOMMANDS["adaptation-table"][0]}),
         (("--step-cost",), {"nargs": "+", "metavar": "CONFIG", "help": SUBCOMMANDS["step-cost"][0]}),
         (("--pretrain-synthetic",), {"metavar": "FILE.pt", "help": SUBCOMMANDS["pretrain-synthetic"][0]}),
         (("--gpu-check",), {"action": "store_true", "help": SUBCOMMANDS["gpu-check"][0]})]
FLAGS = [(("--train-step",), {"action": "store_true", "help": "time full training steps instead"}),
         (("--data",), {"action": "store_true", "help": "time the data loaders instead"})]
MODE_DESTS = {"config", "runs", "step_cost", "pretrain_synthetic"}


def _dest(flags: tuple, kwargs: dict) -> str:
    return kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmark.py", description="The old spelling of benchmark.py; "
                                     "`python benchmark.py --help` lists the subcommands.")
    mode = parser.add_mutually_exclusive_group(required=True)
    add_options(mode, MODES)
    seen = set(MODE_DESTS)
    options = []
    for _, subcommand_options in SUBCOMMANDS.values():
        for flags, kwargs in subcommand_options:
            if _dest(flags, kwargs) not in seen:
                seen.add(_dest(flags, kwargs))
                options.append((flags, {k: v for k, v in kwargs.items() if k != "required"}))
    add_options(parser, options + FLAGS)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def subcommand(args: argparse.Namespace) -> str:
    """The subcommand an old command line means, in the old order of precedence."""
    for name in ("out", "tiny"):
        if getattr(args, name) and not args.gpu_check:
            raise BenchmarkError(f"--{name} is an option of --gpu-check")
    if args.data:
        return "data"
    if args.runs:
        return "tables"
    if args.step_cost:
        return "step-cost"
    if args.pretrain_synthetic:
        return "pretrain-synthetic"
    if args.adaptation_table:
        return "adaptation-table"
    if args.gpu_check:
        return "gpu-check"
    return "train-step" if args.train_step else "model"
