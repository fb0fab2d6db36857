"""The options of each `benchmark.py` subcommand, written once: the subcommands and the old flat spelling
(rtda/bench/legacy.py) are both built from these tables."""
from __future__ import annotations

from pathlib import Path

from rtda.bench.latency import VARIANT_HELP
from rtda.bench.tables import TABLES
from rtda.experiments import PRETRAIN_DEFAULTS


def opt(*flags, **kwargs) -> tuple[tuple, dict]:
    return flags, kwargs


OVERRIDES = opt("overrides", nargs="*", help="config overrides, section.key=value")
CONFIG = opt("--config", required=True, help="a config YAML")
DEVICE = opt("--device", choices=("cpu", "cuda"), help="default: cuda when available")
THREADS = opt("--threads", type=int, help="torch CPU threads (default: torch's choice)")
JSON = opt("--json", action="store_true", help="print one JSON object instead of the report")
WARMUP_HELP = "untimed calls first (default 50 on cuda, 3 on cpu)"

MODEL = [CONFIG, OVERRIDES,
         opt("--size", help="HEIGHTxWIDTH (default 512x1024)"), DEVICE,
         opt("--iters", type=int, help="timed calls (default 1000 on cuda, 20 on cpu)"),
         opt("--warmup", type=int, help=WARMUP_HELP), THREADS,
         opt("--amp", choices=("fp16", "bf16"), help="autocast the deploy form (cuda only)"),
         opt("--compile", action="store_true", help="torch.compile the deploy form"),
         opt("--forms", metavar="A,B,...", help="forms to time in alternating rounds, each with its parity to eager "
             "(default eager,deploy; `all` = every form of the device): "
             + "; ".join(f"{k}: {v}" for k, v in VARIANT_HELP.items())),
         JSON]
TRAIN_STEP = [CONFIG, OVERRIDES,
              opt("--size", help="HEIGHTxWIDTH (default: the config's source/target sizes)"), DEVICE,
              opt("--iters", type=int, help="timed steps (default 10 on cuda, 3 on cpu)"),
              opt("--warmup", type=int, help="untimed steps first (default 3 on cuda, 1 on cpu)"), THREADS,
              opt("--batch-size", type=int, help="override train.batch_size"), JSON]
DATA = [CONFIG, OVERRIDES,
        opt("--iters", type=int, help="items per measurement (default 32)"),
        opt("--workers", type=int, help="DataLoader workers (default: train.workers, at most the cores available)"),
        JSON]
TABLES_OPTIONS = [
    opt("--runs", nargs="+", required=True, metavar="DIR", help="folders of finished runs to tabulate"),
    opt("--table", choices=(*TABLES, "all"), default="all"),
    opt("--format", choices=("md", "csv"), default="md"),
    opt("--metric", choices=("final", "best"), default="final",
        help="which metrics.json result to tabulate (best = selected on val)"),
    opt("--plot", metavar="FILE.png", help="also draw mIoU against FPS"),
    opt("--plot-form", default="eager", metavar="FORM",
        help="--plot: which timed form's FPS to draw (eager, deploy, onnxruntime, ..., or fastest)"),
    opt("--overwrite", action="store_true", help="--plot: replace FILE even if this project did not write it")]
GPU_CHECK = [opt("--out", metavar="FILE.json", help="where the JSON goes (default: runs/gpu_check.json)"),
             opt("--tiny", action="store_true", help="tiny sizes, 1 step (with --device cpu: a smoke test of the "
                 "check itself)"),
             opt("--device", choices=("cpu", "cuda"), help="default: cuda"), THREADS]
ADAPTATION_TABLE = [
    OVERRIDES,
    opt("--work-dir", default="runs/benchmark_adaptation", help="run folders and table.md"),
    opt("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds"),
    opt("--jobs", type=int, default=1, help="trainings side by side, each a train.py process with --threads torch "
        "threads (default: the cores shared out)"),
    THREADS,
    opt("--ssl", action="store_true", help="also FDA's self-supervised round on multi-band pseudo-labels"),
    opt("--into", type=Path, metavar="FILE.md", help="old flag, accepted: the runner no longer edits docs; the table "
        "is in WORK_DIR/table.md, which the docs quote")]
STEP_COST = [opt("--configs", dest="step_cost", nargs="+", required=True, metavar="CONFIG",
                 help="configs to time; the first is the reference"),
             OVERRIDES,
             opt("--rounds", type=int, default=3, help="interleaved rounds"),
             opt("--iters", type=int, help="timed steps per config and round (default 2)"), THREADS]
ZOO = [opt("--configs", nargs="+", metavar="CONFIG", help="configs whose models to measure; the first is the "
           "ratio's reference (default: configs/cityscapes_<net>.yaml of BiSeNet-R18 and every zoo network)"),
       opt("--size", help="HEIGHTxWIDTH (default 512x1024)"), DEVICE,
       opt("--iters", type=int, help="timed calls per model and form (default 100 on cuda, 6 on cpu)"),
       opt("--warmup", type=int, help=WARMUP_HELP), THREADS,
       opt("--forms", metavar="A,B,...", help="forms of each model (default eager,deploy,onnxruntime)"), JSON,
       opt("--out", type=Path, metavar="ZOO.json", help="also write the JSON there (zoo-table's --latency)")]
ZOO_TABLE = [OVERRIDES,
             opt("--work-dir", default="runs/zoo_synthetic", help="run folders, table.md and miou_latency.png"),
             opt("--seed", type=int, default=0, help="the one seed of every run"),
             opt("--latency", type=Path, metavar="ZOO.json", help="`benchmark.py zoo --json` output: the latency "
                 "column and the plot"),
             opt("--jobs", type=int, default=1, help="trainings side by side (as adaptation-table)"), THREADS]
PRETRAIN = [opt("pretrain_synthetic", metavar="FILE.pt", help="where the backbone's weights go"), OVERRIDES,
            opt("--iters", type=int, help=f"steps (default {PRETRAIN_DEFAULTS['steps']})"),
            opt("--batch-size", type=int, help=f"images per step (default {PRETRAIN_DEFAULTS['batch']})"), THREADS]

SUBCOMMANDS = {
    "model": ("parameters, FLOPs and latency of a config's model", MODEL),
    "train-step": ("time full training steps of a config (its strategy included) on random batches", TRAIN_STEP),
    "data": ("time the data loaders (source, target) with and without the prepared cache", DATA),
    "tables": ("the thesis tables (and the mIoU-FPS plot) from finished run folders", TABLES_OPTIONS),
    "gpu-check": ("CUDA: every protocol config's step time and memory, train.py on the real layouts, latency of "
                  "both models, a 2-process DDP run", GPU_CHECK),
    "adaptation-table": ("train every synthetic method, source-only and the oracle for --seeds, then tabulate "
                         "them (resumable: finished runs are reused)", ADAPTATION_TABLE),
    "step-cost": ("training-step time of configs as a ratio to the first, in interleaved --rounds of --iters "
                  "steps", STEP_COST),
    "zoo": ("every network's parameters, FLOPs and latency per form, all timed in the same alternating rounds",
            ZOO),
    "zoo-table": ("train source-only, DACS and the oracle of every network on the synthetic domains (one seed) "
                  "and tabulate them against CPU latency", ZOO_TABLE),
    "pretrain-synthetic": ("pretrain the synthetic rows' backbone on randomised scenes (the benchmark's stand-in "
                           "for ImageNet weights) and write it to FILE.pt", PRETRAIN),
}


def add_options(parser, options: list[tuple[tuple, dict]]) -> None:
    for flags, kwargs in options:
        parser.add_argument(*flags, **kwargs)
