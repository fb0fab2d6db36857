"""The trainer, as a package of one job per file.

    python train.py --config configs/gta5_bisenet.yaml [section.key=value ...] [--resume auto|PATH] [--work-dir runs]
    torchrun --nproc_per_node 4 train.py --config configs/cityscapes_deeplabv2.yaml

    trainer     train(), train_loop(), train_step(): the story of a run
    context     StepContext: the whole contract a strategy sees
    setup       data sets, train state (TrainState via build_parts), optimiser, LR schedule, combination checks
    resume      ResumePoint: find, read, check and apply a resume; lock_run (the run's one writer)
    checkpoint  Checkpointer: last.pt, best.pt and snapshots, refused for a diverged run
    monitor     DivergenceGuard, LossMeter, StopRequest (signals, wall time)
    runlog      Validator and RunLog: TensorBoard, progress bar, config.yaml, metrics.json
    cli         train.py's command line

A run folder `<work dir>/<config name>/<timestamp>/` (format in `rtda.runs`) receives config.yaml, TensorBoard
events, last.pt, best.pt and metrics.json (schema in docs/architecture.md).

`train.batch_size` is the global batch: each of N processes loads batch_size / N images, so a recipe
means the same thing on any number of GPUs.
"""
from rtda.engine.checkpoint import Checkpointer
from rtda.engine.cli import main, parse_args
from rtda.engine.context import StepContext
from rtda.engine.monitor import DivergenceGuard, LossMeter, StopRequest, TrainingDiverged
from rtda.engine.resume import ResumePoint
from rtda.engine.setup import Progress, TrainState, build_optimizer, build_parts, poly_schedule
from rtda.engine.trainer import DataFault, train, train_loop, train_step

__all__ = ["Checkpointer", "DataFault", "DivergenceGuard", "LossMeter", "Progress", "ResumePoint", "StepContext",
           "StopRequest", "TrainState", "TrainingDiverged", "build_optimizer", "build_parts", "main", "parse_args",
           "poly_schedule", "train", "train_loop", "train_step"]
