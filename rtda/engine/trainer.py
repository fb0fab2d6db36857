"""The shared trainer: one loop for every adaptation strategy.

Per iteration: zero the model's gradients, `strategy.training_step` (it computes its losses and calls
`ctx.backward`), step the model's optimiser through the AMP scaler, update the scaler, `strategy.after_step`,
step the LR schedule. The host synchronises with the device only at logging, evaluation and checkpoint
intervals.

`train()` reads as the story of a run: build the parts, open (or resume) the run folder, loop, finish. The
pieces it uses live beside it: `setup` (data, train state), `resume`, `checkpoint`, `monitor`, `runlog`.
"""
from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from pathlib import Path

import torch

from rtda.config import Config, ConfigError, parse_duration
from rtda.datasets import DatasetError
from rtda.datasets.loaders import split_batch, to_device, val_loader, worker_message
from rtda.engine.checkpoint import Checkpointer
from rtda.engine.context import StepContext
from rtda.engine.monitor import LossMeter, StopRequest
from rtda.engine.resume import ResumePoint, find_resume_path, lock_run, open_run, read_resume_point
from rtda.engine.runlog import RunLog, Validator
from rtda.engine.setup import Data, Progress, TrainState, build_data, build_parts, check_combinations
from rtda.runs import check_run_name, remove_leftover_temporaries
from rtda.utils.distributed import Distributed, init_distributed
from rtda.utils.files import output_folder_problem
from rtda.utils.seed import seed_everything


class DataFault(DatasetError):
    """A data file that broke during training (last.pt was saved first)."""


def train(cfg: Config, work_dir: str | Path = "runs", resume: str | None = None, apply_changes: bool = False,
          stop: StopRequest | None = None) -> Path:
    """Train `cfg` to the end (or to a stop) and return the run folder.

    Everything that can be checked is checked before anything is written: a run that fails before its first
    step leaves no run folder, and a resume touches nothing of the run it names until its state has loaded.
    The run folder's lock (`lock_run`) is held from the moment it is opened to the return, whatever the way out:
    RunLockError when another live process trains it. Temporaries that killed saves left in this config's run
    folders (`runs.leftover_temporaries`) are removed, with a note.
    `stop` receives SIGINT/SIGTERM (the CLI reads which one stopped the run from it).
    """
    check_run_name(cfg.name)
    dist = init_distributed()
    seed_everything(cfg.seed, cfg.train.deterministic)  # every rank builds the same model and strategy
    data = build_data(cfg, dist)
    check_combinations(cfg, dist)
    parts = build_parts(cfg, dist, data.max_iters)
    if dist.enabled:  # ...but draws its own random numbers while training
        seed_everything(cfg.seed + dist.rank, cfg.train.deterministic)
    work_dir = Path(work_dir)
    resume_path = find_resume_path(resume, work_dir, cfg, dist) if resume else None
    with contextlib.ExitStack() as held:  # the run folder's lock, released on every way out
        point = None
        if resume_path is not None:  # locked before its last.pt is read: no other writer can replace it now
            held.enter_context(lock_run(resume_path.parent, dist))
            point = read_resume_point(resume_path, dist)
            point.check(cfg, apply_changes)
        check_writable(work_dir, "--work-dir")
        note = remove_leftover_temporaries(work_dir, cfg.name) if dist.is_main else None  # of runs killed in a save
        if note:
            print(note, flush=True)
        run_dir, progress = open_run(cfg, work_dir, point, parts, dist)
        return run_training(cfg, run_dir, progress, point, data, parts, stop or StopRequest(), dist, held)


def run_training(cfg: Config, run_dir: Path, progress: Progress, point: ResumePoint | None, data: Data,
                 parts: TrainState, stop: StopRequest, dist: Distributed, held: contextlib.ExitStack) -> Path:
    """The run once its folder is open: take a new folder's lock (into `held`), apply a resume's accepted
    changes, loop, finish (metrics.json) or report the stop; a new run that fails before its first step is removed.
    """
    fresh = point is None
    log = None
    try:
        if fresh:
            held.enter_context(lock_run(run_dir, dist))
        if point is not None and point.changes:
            point.apply(run_dir, cfg, parts, dist)
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


def train_loop(cfg: Config, parts: TrainState, batches, progress: Progress, validator: Validator,
               checkpointer: Checkpointer, log: RunLog, stop: StopRequest, dist: Distributed) -> dict | None:
    """Iterate from `progress.iteration` to the end; return the final validation metrics (None when stopped).

    Logging, validation and checkpoints happen at their intervals; nothing else waits for the device. Every
    checkpoint save first checks that losses and weights are finite (`Checkpointer`).
    """
    t, max_iters = cfg.train, parts.ctx.max_iters
    guard = checkpointer.guard
    losses_seen = LossMeter()
    metrics = None
    wall_limit = parse_duration(t.max_wall_time) if t.max_wall_time is not None else None
    while progress.iteration < max_iters:
        parts.ctx.iteration = progress.iteration
        source, target = next_batches(batches, progress, checkpointer, dist)
        losses = train_step(parts.train_model, parts.strategy, parts.optimizer, parts.scheduler, source, target,
                            parts.ctx)
        progress.iteration += 1
        iteration = progress.iteration
        guard.update(losses)
        losses_seen.update(losses)
        log.step()

        at_end = iteration == max_iters
        if wall_limit is not None and time.perf_counter() - progress.started >= wall_limit:
            stop.request("wall time")  # a host-side clock read: no device sync
        stop_now = stop.agreed(dist, final=at_end)  # under DDP: every rank, one iteration after the request
        if iteration % t.log_interval == 0 or at_end or stop_now:
            guard.check(iteration)
            log.losses(iteration, losses_seen.pop_means(), parts.optimizer)
        if (t.eval_interval and iteration % t.eval_interval == 0) or at_end:
            metrics = validator(iteration)
            if metrics["mIoU"] is not None and metrics["mIoU"] > progress.best["mIoU"]:
                progress.best = {"mIoU": metrics["mIoU"], "iteration": iteration, "IoU": metrics["IoU"]}
                checkpointer.save_weights(checkpointer.best, progress)
            log.validation(iteration, metrics, progress.best)
        if t.keep_every and iteration % t.keep_every == 0:
            checkpointer.save_weights(checkpointer.snapshot(iteration), progress)
        if iteration % t.checkpoint_interval == 0 or at_end or stop_now:
            checkpointer.save_last(progress)
        if stop_now and not at_end:
            return None
    if metrics is None:  # resumed a finished run: score it again
        metrics = validator(progress.iteration)
    return metrics


def next_batches(batches, progress: Progress, checkpointer: Checkpointer,
                 dist: Distributed) -> tuple[dict, dict | None]:
    """The next (source, target or None) batches on the device.

    A data file that breaks after the pre-flight check stops the run as Ctrl-C would: last.pt is saved (unless
    nothing was learned yet) and DataFault names the file and how to continue.
    """
    source_batches, target_batches = batches
    try:
        source = to_device(next(source_batches), dist.device)
        target = to_device(next(target_batches), dist.device) if target_batches else None
    except DatasetError as exc:
        if progress.iteration == 0:  # nothing learned yet: nothing to save (and no run folder is kept)
            raise DataFault(f"{worker_message(exc)} (before the first step)") from None
        checkpointer.save_last(progress)
        raise DataFault(f"{worker_message(exc)} (at iteration {progress.iteration}; saved "
                        f"{checkpointer.last}, resume with --resume auto once the file is fixed)") from None
    return source, target


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


def check_writable(folder: Path, what: str) -> None:
    """An output folder must be a folder (or not exist yet) that this process can write into."""
    problem = output_folder_problem(folder)
    if problem:
        raise ConfigError(f"{what} {folder}: {problem}")
