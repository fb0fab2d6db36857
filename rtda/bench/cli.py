"""`python benchmark.py SUBCOMMAND ...`: model cost, training-step cost, data loading, thesis tables, GPU check
and the synthetic experiments.

    python benchmark.py model --config configs/cityscapes_bisenet.yaml [--size 512x1024] [--json]
                              [--forms eager,deploy,compile,onnxruntime | all]
    python benchmark.py train-step --config configs/gta5_bisenet_adv.yaml [--size 360x640] [--batch-size 2]
    python benchmark.py data --config configs/gta5_bisenet.yaml [--workers 2]
    python benchmark.py tables --runs runs/ [--table all] [--format md|csv] [--plot miou_fps.png]
    python benchmark.py gpu-check [--out runs/gpu_check.json]                  # CUDA only; `make gpu-check`
    python benchmark.py adaptation-table --work-dir runs/benchmark_adaptation --seeds 0 1 2 [overrides]
    python benchmark.py step-cost --configs A.yaml B.yaml [--rounds 3] [--iters 2]
    python benchmark.py pretrain-synthetic runs/synthetic_pretrained/resnet18.pt
    python benchmark.py zoo [--configs A.yaml B.yaml] [--size 512x1024] [--forms eager,deploy,onnxruntime]
    python benchmark.py zoo-table --work-dir runs/zoo_synthetic [--latency zoo.json] [--jobs 2]

`python benchmark.py SUBCOMMAND --help` lists that subcommand's options. The old spellings (`--config X
[--train-step | --data]`, `--runs`, `--gpu-check`, `--adaptation-table`, `--step-cost`, `--pretrain-synthetic`)
still work: they run the same subcommand, with the same output and exit codes.

Exit codes: 0 done; 1 the work ran but failed (`tables`: no run fits the table; `gpu-check`: a part failed);
2 a bad command line, config, run folder or work dir, reported as one line `benchmark.py: ...` on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rtda.bench import legacy
from rtda.bench.common import THESIS_SIZE, BenchmarkError, parse_size
from rtda.bench.options import SUBCOMMANDS, add_options
from rtda.config import ConfigError, load_config
from rtda.experiments import ExperimentError
from rtda.utils.files import OverwriteError, atomic_write_text, check_overwrite, record_outputs


def _config_run(args) -> tuple:
    """The checks `model` and `train-step` share: (cfg, device, size); sets the torch threads."""
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: no CUDA device is available")
    amp = getattr(args, "amp", None)
    if amp and device.type != "cuda":
        raise BenchmarkError(f"--amp {amp}: autocast is a CUDA option; use --device cuda")
    size = parse_size(args.size) if args.size else None
    for name in ("iters", "warmup", "batch_size", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise BenchmarkError(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    if args.threads:
        torch.set_num_threads(args.threads)
    return cfg, device, size


def _print(result: dict, as_json: bool, report) -> int:
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        report(result)
    return 0


def main_model(args) -> int:
    from rtda.bench.latency import DEFAULT_ITERS, DEFAULT_WARMUP, parse_variants
    from rtda.bench.model_cost import benchmark_model, print_model_report

    cfg, device, size = _config_run(args)
    iters = args.iters or DEFAULT_ITERS[device.type]
    warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[device.type]
    forms = parse_variants(args.forms, device)
    result = benchmark_model(cfg, size or THESIS_SIZE, device, iters, warmup, args.amp, args.compile,
                             source=args.config, forms=forms)
    return _print(result, args.json, print_model_report)


def main_train_step(args) -> int:
    from rtda.bench.train_cost import benchmark_train_step, print_train_report

    cfg, device, size = _config_run(args)
    iters = args.iters or (10 if device.type == "cuda" else 3)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    result = benchmark_train_step(cfg, device, iters, warmup, size, args.batch_size, source=args.config)
    return _print(result, args.json, print_train_report)


def main_data(args) -> int:
    from rtda.bench.data_cost import DATA_ITEMS, benchmark_data, print_data_report
    from rtda.datasets import DatasetError
    from rtda.datasets.io import PYSPNG_HINT, has_pyspng

    if getattr(args, "runs", None) or not args.config:
        raise BenchmarkError("--data needs --config")
    for name in ("iters", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchmarkError(f"--{name} {value}: expected a positive integer")
    cfg = load_config(args.config, args.overrides)
    if not has_pyspng():
        print(f"benchmark.py: note: {PYSPNG_HINT}", file=sys.stderr)
    try:
        result = benchmark_data(cfg, args.iters or DATA_ITEMS, args.workers)
    except DatasetError as exc:
        raise BenchmarkError(str(exc)) from None
    return _print(result, args.json, print_data_report)


def main_tables(args) -> int:
    from rtda.bench.plot import plot_miou_fps
    from rtda.bench.tables import build_tables, find_runs, format_csv, format_markdown

    if args.plot:  # a file the project did not write is refused before any work (rtda.utils.files)
        plot_file = Path(args.plot)
        try:
            check_overwrite(plot_file.parent, [plot_file.name], args.overwrite)
        except OverwriteError as exc:
            raise BenchmarkError(f"--plot {exc}") from None
    runs, problems = find_runs(args.runs)
    tables = build_tables(runs, args.table, args.metric, problems)
    print((format_csv if args.format == "csv" else format_markdown)(tables), end="")
    if not tables:
        problems.append(f"no run fits table {args.table!r}")
    if args.plot:
        drawn = plot_miou_fps(runs, args.plot, args.metric, problems, args.plot_form)
        record_outputs(plot_file.parent, [plot_file.name])  # a later `tables --plot` may replace it
        print(f"wrote {args.plot} ({drawn} markers)", file=sys.stderr)
    for line in problems:
        print(f"benchmark.py: {line}", file=sys.stderr)
    return 0 if tables else 1


def main_gpu_check(args) -> int:
    from rtda.bench.gpu_check import gpu_check

    device = torch.device(args.device or "cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = gpu_check(Path(args.out or "runs/gpu_check.json"), device, tiny=args.tiny)
    return 0 if result["ok"] else 1


def main_adaptation_table(args) -> int:
    from rtda.experiments import run_adaptation_table

    if args.threads:
        torch.set_num_threads(args.threads)  # 1 is fastest when several runs share a busy machine
    work_dir = Path(args.work_dir)
    if args.into:
        print(f"benchmark.py: --into {args.into} is no longer written: the table is in {work_dir / 'table.md'} "
              "and the docs quote it", file=sys.stderr)
    try:
        print(run_adaptation_table(work_dir, args.seeds, args.overrides, args.ssl, args.jobs, args.threads))
    except (FileNotFoundError, RuntimeError, ValueError) as exc:  # data, checkpoint, divergence
        raise BenchmarkError(str(exc)) from None
    print(f"benchmark.py: table written to {work_dir / 'table.md'}", file=sys.stderr)
    return 0


def main_step_cost(args) -> int:
    from rtda.bench.train_cost import step_cost

    if args.threads:
        torch.set_num_threads(args.threads)
    print(step_cost(args.step_cost, args.overrides, args.rounds, args.iters or 2))
    return 0


def main_pretrain_synthetic(args) -> int:
    from rtda.experiments import PRETRAIN_DEFAULTS, pretrain_synthetic_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = pretrain_synthetic_backbone(Path(args.pretrain_synthetic), args.overrides,
                                         steps=args.iters or PRETRAIN_DEFAULTS["steps"],
                                         batch=args.batch_size or PRETRAIN_DEFAULTS["batch"])
    print(f"wrote {args.pretrain_synthetic} ({recipe['steps']} steps in {recipe['wall_time_s']:.0f} s, loss "
          f"{recipe['loss_first']:.3f} -> {recipe['loss_last50']:.3f}; sha256 {recipe['sha256'][:16]}...; "
          f"recipe in {args.pretrain_synthetic}.json)")
    return 0


def main_zoo(args) -> int:
    from rtda.bench.latency import parse_variants
    from rtda.bench.zoo import benchmark_zoo, default_configs, format_zoo

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    result = benchmark_zoo([Path(c) for c in args.configs] if args.configs else default_configs(),
                           parse_size(args.size) if args.size else THESIS_SIZE, device, args.iters or (100 if cuda else 6),
                           warmup, parse_variants(args.forms or "eager,deploy,onnxruntime", device))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1) if args.json else format_zoo(result))
    return 0


def main_zoo_table(args) -> int:
    from rtda.experiments.zoo_table import run_zoo_table

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        print(run_zoo_table(Path(args.work_dir), args.seed, args.overrides, args.latency, args.jobs, args.threads))
    except (FileNotFoundError, RuntimeError, ValueError) as exc:  # data, checkpoint, divergence
        raise BenchmarkError(str(exc)) from None
    return 0


HANDLERS = {"model": main_model, "train-step": main_train_step, "data": main_data, "tables": main_tables,
            "gpu-check": main_gpu_check, "adaptation-table": main_adaptation_table, "step-cost": main_step_cost,
            "pretrain-synthetic": main_pretrain_synthetic, "zoo": main_zoo,
            "zoo-table": main_zoo_table}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (summary, options) in SUBCOMMANDS.items():
        add_options(commands.add_parser(name, help=summary, description=summary), options)
    return parser


def main(argv=None) -> int:
    """Run one subcommand (or an old spelling of one); returns the exit code (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HANDLERS or argv[0] in ("-h", "--help"):
        args = build_parser().parse_args(argv)
        handler = HANDLERS[args.command]
    else:
        args = legacy.parse_args(argv)
        handler = None
    try:
        if handler is None:
            handler = HANDLERS[legacy.subcommand(args)]
        return handler(args)
    except (BenchmarkError, ConfigError, ExperimentError) as exc:
        print(f"benchmark.py: {exc}", file=sys.stderr)
        return 2
