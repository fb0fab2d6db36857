"""The shared trainer: one loop for every adaptation strategy.

    python train.py --config configs/gta5_bisenet.yaml [section.key=value ...] [--resume auto|PATH] [--work-dir runs]
    torchrun --nproc_per_node 4 train.py --config configs/cityscapes_deeplabv2.yaml

Per iteration: zero the model's gradients, `strategy.training_step` (it computes its losses and calls
`ctx.backward`), step the model's optimiser through the AMP scaler, update the scaler, `strategy.after_step`,
step the LR schedule. The host synchronises with the device only at logging, evaluation and checkpoint
intervals. A run folder `<work dir>/<config name>/<timestamp>/` receives config.yaml, TensorBoard events,
last.pt, best.pt and metrics.json (schema in docs/architecture.md).

`train()` reads as the story of a run: build the parts, open (or resume) the run folder, loop, finish. The
pieces it uses are named below it: `Parts` (what is trained and saved), `Checkpointer`, `Validator`,
`DivergenceGuard` and `LossMeter`, each usable on its own.

`train.batch_size` is the global batch: each of N processes loads batch_size / N images, so a recipe
means the same thing on any number of GPUs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from rtda.adapt import STRATEGIES, Strategy, build_strategy
from rtda.config import (
    STRUCTURE_KEYS,
    Config,
    ConfigError,
    dump_config,
    learning_differences,
    load_config,
    parse_duration,
    to_dict,
)
from rtda.datasets import DatasetError, build_dataset
from rtda.datasets.samplers import EpochSampler, ShardSampler
from rtda.evaluation import CLASS_NAMES, colorize, evaluate, iou_table, metrics_from_confusion
from rtda.models import build_model
from rtda.utils.amp import autocast, autocast_dtype, grad_scaler, load_scaler_state
from rtda.utils.distributed import Distributed, all_reduce_sum, broadcast_object, close_distributed, init_distributed
from rtda.utils.files import CheckpointError, load_checkpoint, output_folder_problem, save_checkpoint
from rtda.utils.seed import epoch_seed, init_worker, rng_state, seed_everything, set_rng_state


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite."""


class DataFault(DatasetError):
    """A data file that broke during training (last.pt was saved first)."""


def worker_message(exc: BaseException) -> str:
    """The one-line message of a data error, also when a DataLoader worker wrapped it in its traceback."""
    text = str(exc).strip()
    if "Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(("datasets.", "DatasetError")) and ": " in last else last


# ---------------------------------------------------------------------------------------------- train
def train(cfg: Config, work_dir: str | Path = "runs", resume: str | None = None, apply_changes: bool = False,
          stop: StopRequest | None = None) -> Path:
    """Train `cfg` to the end (or to a stop) and return the run folder.

    Everything that can be checked is checked before anything is written: a run that fails before its first
    step leaves no run folder, and a resume touches nothing of the run it names until its state has loaded.
    `stop` receives SIGINT/SIGTERM (the CLI reads which one stopped the run from it).
    """
    dist = init_distributed()
    seed_everything(cfg.seed, cfg.train.deterministic)  # every rank builds the same model and strategy
    data = build_data(cfg, dist)
    check_combinations(cfg, dist)
    parts = build_parts(cfg, dist, data.max_iters)
    if dist.enabled:  # ...but draws its own random numbers while training
        seed_everything(cfg.seed + dist.rank, cfg.train.deterministic)
    work_dir = Path(work_dir)
    point = find_resume_point(resume, work_dir, cfg, dist) if resume else None
    if point is not None:
        point.check(cfg, apply_changes)
    check_writable(work_dir, "--work-dir")

    run_dir, progress = open_run(cfg, work_dir, point, parts, dist)
    fresh = point is None
    stop = stop or StopRequest()
    log = None
    try:
        if point is not None and point.changes:
            point.record(run_dir, cfg, parts, dist)
        log = RunLog(cfg, run_dir, dist, progress.iteration, data.max_iters, write_config=fresh or bool(point.changes))
        batches = data.batches(cfg, dist, parts.strategy.needs_target, progress.iteration)
        validator = Validator(cfg, parts.model, val_loader(data.val, cfg, dist), dist.device, log.writer)
        checkpointer = Checkpointer(cfg, run_dir, parts, dist)
        with stop:
            metrics = train_loop(cfg, parts, batches, progress, validator, checkpointer, log, stop, dist)
    except BaseException:
        if log is not None:
            log.close()
        if fresh and progress.iteration == 0 and dist.is_main:  # failed before its first step: leave nothing
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if metrics is not None:
        log.finish(progress, metrics)
    log.close()
    if metrics is None and dist.is_main:  # stopped early: last.pt holds everything a resume needs
        why = "train.max_wall_time reached" if stop.reason == "wall time" else "stopped"
        print(f"{why} at iteration {progress.iteration}; saved {run_dir / 'last.pt'}. Continue with "
              f"--resume auto (or --resume {run_dir / 'last.pt'})", flush=True)
    return run_dir


def train_loop(cfg: Config, parts: Parts, batches, progress: Progress, validator: Validator,
               checkpointer: Checkpointer, log: RunLog, stop: StopRequest, dist: Distributed) -> dict | None:
    """Iterate from `progress.iteration` to the end; return the final validation metrics (None when stopped).

    Logging, validation and checkpoints happen at their intervals; nothing else waits for the device.
    """
    t, max_iters = cfg.train, parts.ctx.max_iters
    guard = DivergenceGuard(cfg, parts.model, checkpointer.last, dist.device)
    losses_seen = LossMeter()
    metrics = None
    source_batches, target_batches = batches
    wall_limit = parse_duration(t.max_wall_time) if t.max_wall_time is not None else None
    while progress.iteration < max_iters:
        parts.ctx.iteration = progress.iteration
        try:
            source = to_device(next(source_batches), dist.device)
            target = to_device(next(target_batches), dist.device) if target_batches else None
        except DatasetError as exc:  # a file broke after the pre-flight check: stop as Ctrl-C would
            if progress.iteration == 0:  # nothing learned yet: nothing to save (and no run folder is kept)
                raise DataFault(f"{worker_message(exc)} (before the first step)") from None
            guard.check(progress.iteration, weights=True)
            checkpointer.save_last(progress)
            raise DataFault(f"{worker_message(exc)} (at iteration {progress.iteration}; saved "
                            f"{checkpointer.last}, resume with --resume auto once the file is fixed)") from None
        losses = train_step(parts.train_model, parts.strategy, parts.optimizer, parts.scheduler, source, target,
                            parts.ctx)
        progress.iteration += 1
        iteration = progress.iteration
        guard.update(losses)
        losses_seen.update(losses)
        log.progress.update()

        at_end = iteration == max_iters
        if wall_limit is not None and time.perf_counter() - progress.started >= wall_limit:
            stop.request("wall time")  # a host-side clock read: no device sync
        stop_now = stop.agreed(iteration % t.log_interval == 0 or at_end, dist)
        if iteration % t.log_interval == 0 or at_end or stop_now:
            guard.check(iteration)
            log.losses(iteration, losses_seen.pop_means(), parts.optimizer)
        if (t.eval_interval and iteration % t.eval_interval == 0) or at_end:
            metrics = validator(iteration)
            if metrics["mIoU"] is not None and metrics["mIoU"] > progress.best["mIoU"]:
                progress.best = {"mIoU": metrics["mIoU"], "iteration": iteration, "IoU": metrics["IoU"]}
                guard.check(iteration, weights=True)
                checkpointer.save_weights(checkpointer.best, progress)
            log.validation(iteration, metrics, progress.best)
        if t.keep_every and iteration % t.keep_every == 0:
            guard.check(iteration, weights=True)
            checkpointer.save_weights(checkpointer.snapshot(iteration), progress)
        if iteration % t.checkpoint_interval == 0 or at_end or stop_now:
            guard.check(iteration, weights=True)
            checkpointer.save_last(progress)
        if stop_now and not at_end:
            return None
    if metrics is None:  # resumed a finished run: score it again
        metrics = validator(progress.iteration)
    return metrics


# ------------------------------------------------------------------------------------ step context
class StepContext:
    """What a strategy may use inside `training_step`: the iteration, autocast, and the AMP-aware backward/step.

    With `train.accumulate` = N the trainer calls `training_step` N times per iteration on micro-batches
    (`micro_step` 0..N-1). `backward` scales each loss by 1/N, and a strategy-owned optimiser is zeroed by
    `zero_grad` on the first micro-batch and stepped by `step` on the last, so an iteration still means one
    optimiser step on the whole batch.
    """

    def __init__(self, max_iters: int, device: torch.device, amp_dtype: torch.dtype | None,
                 scaler: torch.amp.GradScaler, lr_factor, accumulate: int = 1):
        self.iteration = 0
        self.max_iters = max_iters
        self.device = device
        self.amp_dtype = amp_dtype
        self.scaler = scaler
        self._lr_factor = lr_factor
        self.accumulate = accumulate
        self.micro_step = 0

    @property
    def lr_factor(self) -> float:
        """The schedule's multiplier at this iteration (poly decay after warm-up), for strategy-owned optimisers."""
        return self._lr_factor(self.iteration)

    @property
    def last_micro_step(self) -> bool:
        return self.micro_step == self.accumulate - 1

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accumulate if self.accumulate > 1 else loss).backward()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero a strategy-owned optimiser's gradients (on the first micro-batch of an iteration only)."""
        if self.micro_step == 0:
            optimizer.zero_grad(set_to_none=True)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step an optimiser the strategy owns (e.g. a discriminator's) on the last micro-batch; the trainer
        updates the scaler once."""
        if self.last_micro_step:
            self.scaler.step(optimizer)


def train_step(model, strategy, optimizer, scheduler, source: dict, target: dict | None,
               ctx: StepContext) -> dict[str, torch.Tensor]:
    """One iteration of every strategy: the strategy's losses and backward (per micro-batch when accumulating),
    then the model's optimiser step. Returns the losses averaged over the micro-batches."""
    optimizer.zero_grad(set_to_none=True)
    if ctx.accumulate == 1:
        losses = strategy.training_step(model, source, target, ctx)
    else:
        losses = {}
        sources = split_batch(source, ctx.accumulate)
        targets = split_batch(target, ctx.accumulate) if target is not None else [None] * ctx.accumulate
        for ctx.micro_step, (src, tgt) in enumerate(zip(sources, targets)):
            # DDP: reduce gradients once, in the last micro-batch's backward passes
            sync = ctx.last_micro_step or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                micro = strategy.training_step(model, src, tgt, ctx)
            for name, value in micro.items():
                losses[name] = losses.get(name, 0.0) + value / ctx.accumulate
        ctx.micro_step = 0
    ctx.scaler.step(optimizer)
    ctx.scaler.update()
    strategy.after_step(model, ctx)
    with warnings.catch_warnings():
        # A GradScaler that skips an overflowing fp16 step skips optimizer.step(), and LambdaLR then warns that the
        # schedule stepped first; skipping is the scaler's design, so the warning is noise.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()
    return losses


def split_batch(batch: dict, chunks: int) -> list[dict]:
    """A batch as `chunks` equal micro-batches (tensors and lists split along the batch dimension)."""
    size = len(batch["image"]) // chunks
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(chunks)]


# ------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """The run's data sets and its length in iterations (`train.iters`, or epochs of the source)."""

    source: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    target: torch.utils.data.Dataset | None
    per_rank_batch: int
    max_iters: int

    def batches(self, cfg: Config, dist: Distributed, needs_target: bool, start_iter: int):
        """(source batches, target batches or None): endless streams positioned at `start_iter`."""
        source = endless_batches(self.source, self.per_rank_batch, cfg.seed, dist, cfg.train.workers, start_iter)
        if not needs_target:
            return source, None
        if self.target is None:
            raise ConfigError(f"adapt.name = {cfg.adapt.name!r} needs a target data set: set data.target")
        target = endless_batches(self.target, self.per_rank_batch, cfg.seed + 1, dist, cfg.train.workers, start_iter)
        return source, target


def build_data(cfg: Config, dist: Distributed) -> Data:
    t = cfg.train
    if t.batch_size % dist.world_size:
        raise ConfigError(f"train.batch_size = {t.batch_size} is not divisible by the {dist.world_size} processes")
    per_rank_batch = t.batch_size // dist.world_size
    source_set = build_dataset(cfg.data.source, cfg, "source")
    val_set = build_dataset(cfg.data.val, cfg, "val")
    epoch_steps = steps_per_epoch(len(source_set), per_rank_batch, dist.world_size, "source")
    target_set = None
    if getattr(STRATEGIES.get(cfg.adapt.name), "needs_target", False):
        target_set = build_dataset(cfg.data.target, cfg, "target")
        steps_per_epoch(len(target_set), per_rank_batch, dist.world_size, "target")
    for dataset in (source_set, target_set, val_set):  # every file present, every header as expected: seconds
        if dataset is not None:
            dataset.check_files()
    max_iters = t.iters if t.iters is not None else t.epochs * epoch_steps
    return Data(source_set, val_set, target_set, per_rank_batch, max_iters)


def endless_batches(dataset, batch_size: int, seed: int, dist: Distributed, workers: int, start_step: int):
    """Batches forever, epoch after epoch, starting at global step `start_step` of this data set's own epochs.

    The order of epoch e is a function of (seed, e) alone and each epoch re-seeds the data set's per-sample
    augmentation (`set_epoch`), so skipping `start_step` batches reproduces exactly the stream an
    uninterrupted run sees. Workers are restarted each epoch so that they see the new epoch.
    """
    sampler = EpochSampler(len(dataset), seed, dist.rank, dist.world_size)
    steps_per_epoch = len(dataset) // dist.world_size // batch_size
    epoch, step = divmod(start_step, steps_per_epoch)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, skip=step * batch_size)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                            pin_memory=dist.device.type == "cuda", worker_init_fn=init_worker,
                            generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        yield from loader
        epoch, step = epoch + 1, 0


def val_loader(dataset, cfg: Config, dist: Distributed) -> DataLoader:
    # A fixed generator: creating the loader's iterator must not draw from the global RNG (resume exactness).
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, sampler=ShardSampler(len(dataset), dist.rank,
                      dist.world_size), num_workers=cfg.train.workers, pin_memory=dist.device.type == "cuda",
                      worker_init_fn=init_worker, generator=torch.Generator().manual_seed(cfg.seed))


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch on the device; labels arrive as uint8 train ids (cheap to collate and copy) and become int64 there."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "label" in out:
        out["label"] = out["label"].long()
    return out


def steps_per_epoch(dataset_size: int, per_rank_batch: int, world_size: int, what: str) -> int:
    steps = dataset_size // world_size // per_rank_batch
    if steps == 0:
        raise ConfigError(f"data.{what}: {dataset_size} images cannot fill one batch of {per_rank_batch} per process "
                          f"on {world_size} process(es); lower train.batch_size")
    return steps


# ------------------------------------------------------------------------------------------ parts
@dataclass
class Parts:
    """What a run trains and what its checkpoint saves: model, strategy, optimiser, schedule, AMP scaler."""

    model: nn.Module  # the unwrapped model (what is saved and validated)
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ctx: StepContext
    train_model: nn.Module = None  # what the loop calls: the model, wrapped in DDP when distributed

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "strategy": self.strategy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        load_scaler_state(self.scaler, state["scaler"])  # also across AMP modes (bf16 <-> fp16)
        self.strategy.load_state_dict(state["strategy"])


def build_parts(cfg: Config, dist: Distributed, max_iters: int) -> Parts:
    t, device = cfg.train, dist.device
    model = build_model(cfg.model).to(device)
    if t.sync_bn and dist.enabled:
        if device.type != "cuda":
            raise ConfigError("train.sync_bn = true needs CUDA (SyncBatchNorm has no CPU kernel); set it to false")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    strategy = build_strategy(cfg, model).to(device)
    optimizer = build_optimizer(model, cfg)
    lr_factor = poly_schedule(max_iters, t.poly_power, t.warmup_iters, t.poly_horizon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    amp_dtype = autocast_dtype(t.amp, device)
    scaler = grad_scaler(device, amp_dtype)  # on for fp16 only, CUDA or CPU
    ctx = StepContext(max_iters, device, amp_dtype, scaler, lr_factor, t.accumulate)
    # DDP wraps the model only for the loop; the unwrapped model is what is saved, restored and validated.
    train_model = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
                   if dist.enabled else model)
    return Parts(model, strategy, optimizer, scheduler, scaler, ctx, train_model)


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over the model's parameter groups; the head learns `head_lr_mult` times faster."""
    t = cfg.train
    groups = model.param_groups()
    param_groups = [
        {"params": [p for p in groups["backbone"] if p.requires_grad], "lr": t.lr, "name": "backbone"},
        {"params": [p for p in groups["head"] if p.requires_grad], "lr": t.lr * t.head_lr_mult, "name": "head"},
    ]
    if t.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.Adam(param_groups, lr=t.lr, weight_decay=t.weight_decay)


def poly_schedule(max_iters: int, power: float, warmup_iters: int = 0, horizon: int | None = None):
    """LR multiplier at an iteration: linear warm-up to 1, then (1 - it / horizon) ** power.

    `horizon` (`train.poly_horizon`) is where poly would reach 0; None = `max_iters`, the stop iteration.
    """
    horizon = max_iters if horizon is None else horizon
    if horizon < max_iters:
        raise ConfigError(f"train.poly_horizon = {horizon} is below the run's {max_iters} iterations (the learning "
                          f"rate would be 0 for the last {max_iters - horizon}); expected >= {max_iters} or null")

    def factor(iteration: int) -> float:
        if iteration < warmup_iters:
            return (iteration + 1) / warmup_iters
        return max(0.0, 1.0 - iteration / horizon) ** power

    return factor


# --------------------------------------------------------------------------------- run folder, resume
@dataclass
class Progress:
    """Where a run stands: the iteration reached, the best validation so far, the time trained."""

    iteration: int = 0
    best: dict = field(default_factory=lambda: {"mIoU": -1.0, "iteration": 0, "IoU": {}})
    wall_before: float = 0.0  # seconds trained in earlier lives of the run (before a resume)
    started: float = field(default_factory=time.perf_counter)

    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.started


class ResumePoint:
    """The checkpoint a resume continues from, read and checked before anything is written.

    `changes` ({key: (old, new)}) are the keys that change what is learned whose values differ from the
    checkpoint's config; a resume with changes stops unless they are applied on purpose (`--apply-changes`).
    """

    def __init__(self, path: Path, state: dict, saved_config: dict):
        self.path, self.state, self.saved_config = path, state, saved_config
        self.changes: dict[str, tuple] = {}

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def describe(self) -> str:
        m, a = self.saved_config.get("model", {}), self.saved_config.get("adapt", {})
        return (f"{m.get('name')}/{m.get('backbone')} with {m.get('num_classes')} classes, strategy "
                f"{a.get('name')}, at iteration {self.state.get('iteration')}")

    def check(self, cfg: Config, apply_changes: bool) -> None:
        """Refuse a checkpoint of another model or strategy, a schedule shorter than the checkpoint's
        iteration, and (unless applied on purpose) any other change of what is learned."""
        new = to_dict(cfg)
        structure = {k: v for k, v in learning_differences(self.saved_config, new).items() if k in STRUCTURE_KEYS}
        if structure:
            shown = ", ".join(f"{k}: {old!r} -> {value!r}" for k, (old, value) in structure.items())
            raise CheckpointError(f"--resume {self.path}: it holds {self.describe()}; this config differs "
                                          f"in what the checkpoint's tensors are ({shown})")
        if cfg.train.iters is not None and cfg.train.iters < self.state["iteration"]:
            raise ConfigError(f"train.iters = {cfg.train.iters} is below the iteration of {self.path} "
                              f"({self.state['iteration']}); a resume can only continue or extend a run")
        self.changes = learning_differences(self.saved_config, new)
        if self.changes and not apply_changes:
            shown = "; ".join(f"{k}: {old!r} in the run, {value!r} now" for k, (old, value) in self.changes.items())
            raise ConfigError(f"--resume {self.path}: the config differs from the run's in what is learned ({shown}). "
                              f"Resume with the run's own values, or add --apply-changes to apply them from "
                              f"iteration {self.state['iteration']} (recorded in resume_log.jsonl)")

    def record(self, run_dir: Path, cfg: Config, parts: Parts, dist: Distributed) -> None:
        """Apply the changes for real (learning rates and schedule from the new config) and log them."""
        apply_new_hyperparameters(parts, cfg)
        if dist.is_main:
            entry = {"iteration": self.state["iteration"], "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "changes": {k: list(v) for k, v in self.changes.items()}}
            with open(run_dir / "resume_log.jsonl", "a") as log:
                log.write(json.dumps(entry) + "\n")
            print(f"--apply-changes: from iteration {entry['iteration']}: " + "; ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in self.changes.items()), flush=True)


def find_resume_point(resume: str, work_dir: Path, cfg: Config, dist: Distributed) -> ResumePoint | None:
    """`auto`: the newest run folder of the config, if it is unfinished and has a last.pt; otherwise the path."""
    if resume == "auto":
        runs = sorted((p for p in (work_dir / cfg.name).glob("*") if p.is_dir()), key=lambda p: p.name)
        if not runs:
            reason = f"no run of {cfg.name} in {work_dir}"
        elif (runs[-1] / "metrics.json").exists():
            reason = (f"the newest run {runs[-1]} is finished (to extend it, name its last.pt and a larger "
                      f"train.iters with --apply-changes)")
        elif not (runs[-1] / "last.pt").exists():
            reason = f"the newest run {runs[-1]} has no last.pt (it stopped before its first checkpoint)"
        else:
            return read_resume_point(runs[-1] / "last.pt", dist)
        if dist.is_main:
            print(f"--resume auto: {reason}; starting a new run", flush=True)
        return None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: checkpoint not found")
    return read_resume_point(path, dist)


def read_resume_point(path: Path, dist: Distributed) -> ResumePoint:
    state = load_checkpoint(path, map_location=dist.device)
    if not isinstance(state, dict) or "iteration" not in state or "model" not in state:
        raise CheckpointError(f"--resume {path}: not a checkpoint of this trainer (no iteration and model)")
    saved = state.get("config")
    if saved is None and (path.parent / "config.yaml").is_file():  # checkpoints written before the config was kept
        saved = to_dict(load_config(path.parent / "config.yaml"))
    point = ResumePoint(path, state, saved or {})
    if "optimizer" not in state:
        raise CheckpointError(f"--resume {path}: it holds weights only ({point.describe()}); resume from "
                                      f"the last.pt of its run folder, or evaluate it with eval.py")
    return point


def apply_new_hyperparameters(parts: Parts, cfg: Config) -> None:
    """After loading a checkpoint: the optimiser's hyper-parameters, base learning rates and schedule from `cfg`
    (a loaded optimiser and scheduler keep the checkpoint's otherwise)."""
    t = cfg.train
    base = {"backbone": t.lr, "head": t.lr * t.head_lr_mult}
    for group in parts.optimizer.param_groups:
        group["initial_lr"] = base[group["name"]]
        group["weight_decay"] = t.weight_decay
        if "momentum" in group:
            group["momentum"] = t.momentum
    parts.scheduler.base_lrs = [group["initial_lr"] for group in parts.optimizer.param_groups]
    factor = parts.ctx._lr_factor
    parts.scheduler.lr_lambdas = [factor] * len(parts.optimizer.param_groups)
    for group in parts.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor(parts.scheduler.last_epoch)
    parts.scheduler._last_lr = [group["lr"] for group in parts.optimizer.param_groups]


def open_run(cfg: Config, work_dir: Path, point: ResumePoint | None, parts: Parts,
             dist: Distributed) -> tuple[Path, Progress]:
    """A new run folder, or the folder of the resume point with the state restored from it."""
    if point is None:
        run_dir = new_run_dir(work_dir, cfg) if dist.is_main else None
        return Path(broadcast_object(str(run_dir) if run_dir else None)), Progress()
    state = point.state
    try:
        parts.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:  # tensors of another shape or module
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"--resume {point.path}: it holds {point.describe()}, which does not fit this "
                                      f"config ({first})") from None
    set_rng_state(state["rng"][dist.rank % len(state["rng"])])
    return point.run_dir, Progress(state["iteration"], state["best"], state["wall_time_s"])


def new_run_dir(work_dir: Path, cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (work_dir / cfg.name).mkdir(parents=True, exist_ok=True)
    run_dir, n = work_dir / cfg.name / stamp, 1
    while True:  # two runs started within the same second, in this process or another: mkdir is the arbiter
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            run_dir, n = work_dir / cfg.name / f"{stamp}-{n}", n + 1


def check_writable(folder: Path, what: str) -> None:
    """An output folder must be a folder (or not exist yet) that this process can write into."""
    problem = output_folder_problem(folder)
    if problem:
        raise ConfigError(f"{what} {folder}: {problem}")


def check_combinations(cfg: Config, dist: Distributed) -> None:
    """Model, batch and strategy combinations that cannot train, found before anything is built or written."""
    t = cfg.train
    per_rank = t.batch_size // dist.world_size
    if per_rank % t.accumulate:
        raise ConfigError(f"train.batch_size = {t.batch_size} on {dist.world_size} process(es) is {per_rank} per "
                          f"process, not divisible by train.accumulate = {t.accumulate}")
    micro = per_rank // t.accumulate
    if cfg.model.name == "bisenet" and micro < 2:
        raise ConfigError(f"model.name = bisenet trains on at least 2 images per process and micro-batch (its "
                          f"attention BN pools across the batch); train.batch_size = {t.batch_size} on "
                          f"{dist.world_size} process(es) with train.accumulate = {t.accumulate} gives {micro}")


class Checkpointer:
    """The run folder's checkpoints: `last.pt` (everything a resume needs) and weights-only files (`best.pt`).

    Every rank contributes its RNG state to last.pt; rank 0 writes. Files are written atomically.
    """

    def __init__(self, cfg: Config, run_dir: Path, parts: Parts, dist: Distributed):
        self.cfg, self.parts, self.dist = cfg, parts, dist
        self.last, self.best = run_dir / "last.pt", run_dir / "best.pt"

    def save_last(self, progress: Progress) -> None:
        rng = [rng_state()]
        if self.dist.enabled:
            rng = [None] * self.dist.world_size
            torch.distributed.all_gather_object(rng, rng_state())
        if self.dist.is_main:
            save_checkpoint({
                "iteration": progress.iteration, **self.parts.state_dict(), "rng": rng, "best": progress.best,
                "wall_time_s": progress.wall_time(), "config_name": self.cfg.name, "config": to_dict(self.cfg),
            }, self.last)

    def snapshot(self, iteration: int) -> Path:
        return self.last.parent / "snapshots" / f"iter_{iteration:07d}.pt"

    def save_weights(self, path: Path, progress: Progress) -> None:
        """The weights to evaluate or deploy (best.pt); a resume continues from last.pt."""
        if self.dist.is_main:
            save_checkpoint({"iteration": progress.iteration, "model": self.parts.model.state_dict(),
                                     "best": progress.best, "config_name": self.cfg.name}, path)


# ------------------------------------------------------------------------------ guard, losses, validation
def weights_finite(model: nn.Module) -> torch.Tensor:
    return torch.stack([t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()]).all()


class DivergenceGuard:
    """Tracks on the device whether every loss stayed finite; `check` is the one host sync, at intervals.

    All ranks stop together, and the message says which checkpoint is the last good one.
    """

    def __init__(self, cfg: Config, model: nn.Module, last_checkpoint: Path, device: torch.device):
        self.cfg, self.model, self.last = cfg, model, last_checkpoint
        self.finite = torch.ones((), dtype=torch.bool, device=device)

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        self.finite &= torch.isfinite(sum(losses.values()))

    def check(self, iteration: int, weights: bool = False) -> None:
        """Did any loss since the start (or, with `weights`, any weight) stop being finite? Then raise."""
        ok = self.finite if not weights else self.finite & weights_finite(self.model)
        bad = all_reduce_sum((~ok).float().reshape(1))
        if bool(bad > 0):
            kept = f"the last good checkpoint is {self.last}" if self.last.exists() else "no checkpoint was written"
            raise TrainingDiverged(f"loss or weights became NaN/inf by iteration {iteration} of {self.cfg.name}; "
                                   f"{kept}. Lower train.lr (now {self.cfg.train.lr:g}) or check the data")


class LossMeter:
    """Sums of the named losses on the device since the last `pop_means` (no host sync until then)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.float()
        self.count += 1

    def pop_means(self) -> dict[str, float]:
        means = dict(zip(self.sums, (torch.stack(list(self.sums.values())) / self.count).tolist()))
        self.sums, self.count = {}, 0
        return means


class Validator:
    """mIoU and per-class IoU of the model on the val set; TensorBoard gets the scores and a few predictions."""

    def __init__(self, cfg: Config, model: nn.Module, loader: DataLoader, device: torch.device,
                 writer: SummaryWriter | None):
        self.cfg, self.model, self.loader, self.device, self.writer = cfg, model, loader, device, writer

    def __call__(self, iteration: int) -> dict:
        shown = []

        def keep_for_display(batch, pred):
            for i in range(min(len(pred), self.cfg.train.vis_images - len(shown))):
                shown.append((batch["image"][i], batch["label"][i], pred[i]))

        self.model.eval()
        confusion = evaluate([self.model], self.loader, self.device, self.cfg.model.num_classes,  # float32
                             on_batch=keep_for_display if self.writer else None)
        self.model.train()
        metrics = metrics_from_confusion(confusion)
        if self.writer:
            self.writer.add_scalar("val/mIoU", metrics["mIoU"], iteration)
            for name, value in metrics["IoU"].items():
                if value is not None:
                    self.writer.add_scalar(f"val/IoU/{name}", value, iteration)
            for i, (image, label, pred) in enumerate(shown):
                self.writer.add_image(f"val/prediction/{i}", prediction_panel(image, label, pred), iteration)
        return metrics


def prediction_panel(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """[image | ground truth | prediction] side by side, uint8 CHW, at the label's size."""
    size = label.shape[-2:]
    image = image.float()[None]
    if image.shape[-2:] != size:
        image = nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)
    image = image[0].round().clamp(0, 255).to(torch.uint8).cpu()
    return torch.cat([image, colorize(label.cpu()), colorize(pred.cpu())], dim=-1)


class RunLog:
    """What rank 0 writes besides checkpoints: config.yaml, TensorBoard, the progress bar, metrics.json."""

    def __init__(self, cfg: Config, run_dir: Path, dist: Distributed, start_iter: int, max_iters: int,
                 write_config: bool = True):
        self.cfg, self.run_dir, self.dist = cfg, run_dir, dist
        self.writer = None
        if dist.is_main:
            if write_config:  # a new run, or a resume that applied changes (logged in resume_log.jsonl)
                dump_config(cfg, run_dir / "config.yaml")
            self.writer = SummaryWriter(str(run_dir), purge_step=start_iter)
            print(f"run folder: {run_dir}  ({'resumed at iteration %d' % start_iter if start_iter else 'new run'}, "
                  f"{max_iters} iterations, {dist.world_size} process(es), device {dist.device})", flush=True)
        self.progress = tqdm(total=max_iters, initial=start_iter, disable=not dist.is_main, dynamic_ncols=True)

    def losses(self, iteration: int, means: dict[str, float], optimizer: torch.optim.Optimizer) -> None:
        lrs = {group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)}
        if self.writer:
            for name, value in means.items():
                self.writer.add_scalar(f"loss/{name}", value, iteration)
            for name, lr in lrs.items():
                self.writer.add_scalar(f"lr/{name}", lr, iteration)
        self.progress.set_postfix(loss=f"{sum(means.values()):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")

    def validation(self, iteration: int, metrics: dict, best: dict) -> None:
        if self.dist.is_main:
            self.progress.write(f"iteration {iteration}: val mIoU {metrics['mIoU']} (best {best['mIoU']})")

    def finish(self, progress: Progress, metrics: dict) -> None:
        """metrics.json (schema in docs/architecture.md) and the per-class table."""
        self.progress.close()
        if not self.dist.is_main:
            return
        cfg = self.cfg
        summary = {
            "config_name": cfg.name,
            "synthetic": any(d.name == "synthetic" for d in (cfg.data.source, cfg.data.target, cfg.data.val)),
            "seed": cfg.seed, "model": cfg.model.name, "backbone": cfg.model.backbone, "adapt": cfg.adapt.name,
            "iterations": progress.iteration, "wall_time_s": round(progress.wall_time(), 1),
            "final": metrics, "best": progress.best, "classes": list(CLASS_NAMES), "config": to_dict(cfg),
        }
        (self.run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        print(iou_table({cfg.name: metrics}), flush=True)

    def close(self) -> None:
        self.progress.close()
        if self.writer:
            self.writer.close()


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads between iterations; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self.reason: str | None = None  # "SIGINT", "SIGTERM" or "wall time"
        self.signum: int | None = None
        self._previous = {}
        self._depth = 0

    def request(self, reason: str) -> None:
        self.requested, self.reason = True, self.reason or reason

    def __enter__(self):
        self._depth += 1  # re-entrant: the CLI listens from its start, train() again inside
        if self._depth > 1 or threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        self.request(signal.Signals(signum).name)

    def agreed(self, at_sync_point: bool, dist: Distributed) -> bool:
        """Whether to stop now. Ranks must agree, so under DDP they compare notes at sync points only."""
        if not dist.enabled:
            return self.requested
        if not at_sync_point:
            return False
        flag = torch.tensor([float(self.requested)], device=dist.device)
        return bool(all_reduce_sum(flag) > 0)

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a segmentation model (optionally with domain adaptation).")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-3")
    parser.add_argument("--resume", default=None, help="`auto` (newest run of this config) or a checkpoint path")
    parser.add_argument("--work-dir", default="runs", help="where run folders are created (default: runs)")
    parser.add_argument("--apply-changes", action="store_true", help="on --resume: apply the overrides that "
                        "differ from the run's config from the resumed iteration on (logged in resume_log.jsonl)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = StopRequest()
    try:
        with stop:  # a SIGTERM while the run is being built still stops it cleanly after its first step
            cfg = load_config(args.config, args.overrides)
            train(cfg, work_dir=args.work_dir, resume=args.resume, apply_changes=args.apply_changes, stop=stop)
    except DatasetError as exc:
        print(f"error: {worker_message(exc)}\n  check every file with: python -m rtda.datasets --config {args.config} "
              f"--check", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, CheckpointError, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        close_distributed()
    return 128 + stop.signum if stop.signum else 0  # 130 / 143: a scheduler may requeue the job


if __name__ == "__main__":
    sys.exit(main())
