"""What a run is built from, before its first step: the data sets, the train state, the optimiser and schedule.

Everything here checks what it can and raises ConfigError with the key to change; nothing here writes files.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rtda.adapt import STRATEGIES, Strategy, build_strategy
from rtda.config import Config, ConfigError
from rtda.datasets import build_dataset
from rtda.datasets.loaders import endless_batches, steps_per_epoch
from rtda.engine.context import StepContext
from rtda.models import build_model
from rtda.utils.amp import autocast_dtype, grad_scaler, load_scaler_state
from rtda.utils.distributed import Distributed
from rtda.utils.repeated_sgd import RepeatedSGD, official_repeats


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
    """The source, val and (when the strategy needs one) target sets, each file checked; the run's length."""
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


# ------------------------------------------------------------------------------------ train state
@dataclass
class TrainState:
    """What a run trains and what its checkpoint saves: model, strategy, optimiser, schedule, AMP scaler.

    `state_dict` gives the checkpoint keys model, optimizer, scheduler, scaler and strategy; `load_state_dict`
    takes them back.
    """

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


@dataclass
class Progress:
    """Where a run stands: the iteration reached, the best validation so far, the time trained."""

    iteration: int = 0
    best: dict = field(default_factory=lambda: {"mIoU": -1.0, "iteration": 0, "IoU": {}})
    wall_before: float = 0.0  # seconds trained in earlier lives of the run (before a resume)
    started: float = field(default_factory=time.perf_counter)

    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.started


def build_parts(cfg: Config, dist: Distributed, max_iters: int) -> TrainState:
    """The train state of `cfg` on this rank's device, for a run of `max_iters` iterations.

    Draws from the global RNG (model and strategy initialisation): seed it first, identically on every rank.
    """
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
    return TrainState(model, strategy, optimizer, scheduler, scaler, ctx, train_model)


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over the model's parameter groups; the head learns `head_lr_mult` times faster.

    `train.official_param_repeats`: RepeatedSGD, each backbone parameter updated as often per step as the
    official module walk over the backbone's children lists it (the head's parameters once, as theirs).
    """
    t = cfg.train
    groups = model.param_groups()
    param_groups = [
        {"params": [p for p in groups["backbone"] if p.requires_grad], "lr": t.lr, "name": "backbone"},
        {"params": [p for p in groups["head"] if p.requires_grad], "lr": t.lr * t.head_lr_mult, "name": "head"},
    ]
    if t.official_param_repeats != "none":
        if t.optimizer != "sgd":
            raise ConfigError(f"train.official_param_repeats = {t.official_param_repeats!r} reproduces an official "
                              f"SGD loop; train.optimizer = {t.optimizer!r}: expected 'sgd' (or "
                              f"official_param_repeats: none)")
        counts = official_repeats(model.backbone.children())  # conv1, bn1, layer1..4 for the ResNets
        param_groups[0]["repeats"] = [counts.get(id(p), 1) for p in param_groups[0]["params"]]
        return RepeatedSGD(param_groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                           inplace_decay=t.official_param_repeats == "torch0.4")
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
