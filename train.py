"""The shared trainer: one loop for every adaptation strategy.

    python train.py --config configs/gta5_bisenet.yaml [section.key=value ...] [--resume auto|PATH] [--work-dir runs]
    torchrun --nproc_per_node 4 train.py --config configs/cityscapes_deeplabv2.yaml

Per iteration: zero the model's gradients, `strategy.training_step` (it computes its losses and calls
`ctx.backward`), step the model's optimiser through the AMP scaler, update the scaler, `strategy.after_step`,
step the LR schedule. The host synchronises with the device only at logging, evaluation and checkpoint
intervals. A run folder `<work dir>/<config name>/<timestamp>/` receives config.yaml, TensorBoard events,
last.pt, best.pt and metrics.json (schema in docs/architecture.md).

`train.batch_size` is the global batch: each of N processes loads batch_size / N images, so a recipe
means the same thing on any number of GPUs.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import runtime
from adapt import build_strategy
from config import Config, ConfigError, dump_config, load_config, to_dict
from datasets import DatasetError, build_dataset
from eval import CLASS_NAMES, colorize, evaluate, iou_table, metrics_from_confusion
from models import build_model


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite."""


# ------------------------------------------------------------------------------------ step context
class StepContext:
    """What a strategy may use inside `training_step`: the iteration, autocast, and the AMP-aware backward/step."""

    def __init__(self, max_iters: int, device: torch.device, amp_dtype: torch.dtype | None,
                 scaler: torch.amp.GradScaler, lr_factor):
        self.iteration = 0
        self.max_iters = max_iters
        self.device = device
        self.amp_dtype = amp_dtype
        self.scaler = scaler
        self._lr_factor = lr_factor

    @property
    def lr_factor(self) -> float:
        """The schedule's multiplier at this iteration (poly decay after warm-up), for strategy-owned optimisers."""
        return self._lr_factor(self.iteration)

    def autocast(self):
        return runtime.autocast(self.device, self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step an optimiser the strategy owns (e.g. a discriminator's); the trainer updates the scaler once."""
        self.scaler.step(optimizer)


def train_step(model, strategy, optimizer, scheduler, source: dict, target: dict | None,
               ctx: StepContext) -> dict[str, torch.Tensor]:
    """One iteration of every strategy: the strategy's losses and backward, then the model's optimiser step."""
    optimizer.zero_grad(set_to_none=True)
    losses = strategy.training_step(model, source, target, ctx)
    ctx.scaler.step(optimizer)
    ctx.scaler.update()
    strategy.after_step(model, ctx)
    scheduler.step()
    return losses


# ------------------------------------------------------------------------------------ building blocks
def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD (or Adam) over the model's parameter groups; the head learns `head_lr_mult` times faster."""
    t = cfg.train
    groups = model.param_groups()
    param_groups = [
        {"params": [p for p in groups["backbone"] if p.requires_grad], "lr": t.lr, "name": "backbone"},
        {"params": [p for p in groups["head"] if p.requires_grad], "lr": t.lr * t.head_lr_mult, "name": "head"},
    ]
    if t.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(param_groups, lr=t.lr, weight_decay=t.weight_decay)


def poly_schedule(max_iters: int, power: float, warmup_iters: int = 0):
    """LR multiplier at an iteration: linear warm-up to 1, then (1 - it / max_iters) ** power."""

    def factor(iteration: int) -> float:
        if iteration < warmup_iters:
            return (iteration + 1) / warmup_iters
        return max(0.0, 1.0 - iteration / max_iters) ** power

    return factor


def endless_batches(dataset, batch_size: int, seed: int, dist: runtime.Distributed, workers: int, start_step: int):
    """Batches forever, epoch after epoch, starting at global step `start_step` of this data set's own epochs.

    The order of epoch e is a function of (seed, e) alone and each epoch re-seeds the data set's per-sample
    augmentation (`set_epoch`), so skipping `start_step` batches reproduces exactly the stream an
    uninterrupted run sees. Workers are restarted each epoch so that they see the new epoch.
    """
    sampler = runtime.EpochSampler(len(dataset), seed, dist.rank, dist.world_size)
    steps_per_epoch = len(dataset) // dist.world_size // batch_size
    epoch, step = divmod(start_step, steps_per_epoch)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, skip=step * batch_size)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                            pin_memory=dist.device.type == "cuda", worker_init_fn=runtime.init_worker,
                            generator=torch.Generator().manual_seed(runtime.epoch_seed(seed, epoch)))
        yield from loader
        epoch, step = epoch + 1, 0


def val_loader(dataset, cfg: Config, dist: runtime.Distributed) -> DataLoader:
    # A fixed generator: creating the loader's iterator must not draw from the global RNG (resume exactness).
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, sampler=runtime.ShardSampler(len(dataset), dist.rank,
                      dist.world_size), num_workers=cfg.train.workers, pin_memory=dist.device.type == "cuda",
                      worker_init_fn=runtime.init_worker, generator=torch.Generator().manual_seed(cfg.seed))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def steps_per_epoch(dataset_size: int, per_rank_batch: int, world_size: int, what: str) -> int:
    steps = dataset_size // world_size // per_rank_batch
    if steps == 0:
        raise ConfigError(f"data.{what}: {dataset_size} images cannot fill one batch of {per_rank_batch} per process "
                          f"on {world_size} process(es); lower train.batch_size")
    return steps


def new_run_dir(work_dir: Path, cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = work_dir / cfg.name / stamp, 1
    while run_dir.exists():  # two runs started within the same second
        run_dir, n = work_dir / cfg.name / f"{stamp}-{n}", n + 1
    run_dir.mkdir(parents=True)
    return run_dir


def find_resume_checkpoint(resume: str, work_dir: Path, cfg: Config) -> Path | None:
    """`auto`: last.pt of the newest run of this config (None when there is none); otherwise the path itself."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume {resume}: checkpoint not found")
        return path
    runs = sorted((work_dir / cfg.name).glob("*/last.pt"), key=lambda p: p.parent.name)
    return runs[-1] if runs else None


def weights_finite(model: nn.Module) -> torch.Tensor:
    return torch.stack([t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()]).all()


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads between iterations; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------- train
def train(cfg: Config, work_dir: str | Path = "runs", resume: str | None = None) -> Path:
    """Train `cfg` to the end (or to a stop request) and return the run folder."""
    dist = runtime.init_distributed()
    runtime.seed_everything(cfg.seed, cfg.train.deterministic)  # every rank builds the same model and strategy
    device, work_dir = dist.device, Path(work_dir)
    t = cfg.train
    if t.batch_size % dist.world_size:
        raise ConfigError(f"train.batch_size = {t.batch_size} is not divisible by the {dist.world_size} processes")
    per_rank_batch = t.batch_size // dist.world_size

    # data
    source_set = build_dataset(cfg.data.source, cfg, "source")
    val_set = build_dataset(cfg.data.val, cfg, "val")
    epoch_steps = steps_per_epoch(len(source_set), per_rank_batch, dist.world_size, "source")
    max_iters = t.iters if t.iters is not None else t.epochs * epoch_steps

    # model, strategy, optimiser, schedule, AMP
    model = build_model(cfg.model).to(device)
    if t.sync_bn and dist.enabled:
        if device.type != "cuda":
            raise ConfigError("train.sync_bn = true needs CUDA (SyncBatchNorm has no CPU kernel); set it to false")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    strategy = build_strategy(cfg, model).to(device)
    optimizer = build_optimizer(model, cfg)
    lr_factor = poly_schedule(max_iters, t.poly_power, t.warmup_iters)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    amp_dtype = runtime.autocast_dtype(t.amp, device)
    scaler = runtime.grad_scaler(device, amp_dtype)  # on for fp16 only, CUDA or CPU
    ctx = StepContext(max_iters, device, amp_dtype, scaler, lr_factor)
    if dist.enabled:  # ...but draws its own random numbers while training
        runtime.seed_everything(cfg.seed + dist.rank, t.deterministic)

    # resume
    start_iter, best, wall_before = 0, {"mIoU": -1.0, "iteration": 0, "IoU": {}}, 0.0
    checkpoint_path = find_resume_checkpoint(resume, work_dir, cfg) if resume else None
    if resume == "auto" and checkpoint_path is None and dist.is_main:
        print(f"--resume auto: no run of {cfg.name} in {work_dir} to resume; starting a new one", flush=True)
    if checkpoint_path is not None:
        state = runtime.load_checkpoint(checkpoint_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        runtime.load_scaler_state(scaler, state["scaler"])  # also across AMP modes (bf16 <-> fp16)
        strategy.load_state_dict(state["strategy"])
        runtime.set_rng_state(state["rng"][dist.rank % len(state["rng"])])
        start_iter, best, wall_before = state["iteration"], state["best"], state["wall_time_s"]
        run_dir = checkpoint_path.parent
    else:
        run_dir = new_run_dir(work_dir, cfg) if dist.is_main else None
    run_dir = Path(runtime.broadcast_object(str(run_dir) if run_dir else None))

    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.enabled else model
    source_batches = endless_batches(source_set, per_rank_batch, cfg.seed, dist, t.workers, start_iter)
    target_batches = None
    if strategy.needs_target:
        target_set = build_dataset(cfg.data.target, cfg, "target")
        steps_per_epoch(len(target_set), per_rank_batch, dist.world_size, "target")
        target_batches = endless_batches(target_set, per_rank_batch, cfg.seed + 1, dist, t.workers, start_iter)
    val_batches = val_loader(val_set, cfg, dist)

    writer = None
    if dist.is_main:
        dump_config(cfg, run_dir / "config.yaml")
        writer = SummaryWriter(str(run_dir), purge_step=start_iter)
        print(f"run folder: {run_dir}  ({'resumed at iteration %d' % start_iter if start_iter else 'new run'}, "
              f"{max_iters} iterations, {dist.world_size} process(es), device {device})", flush=True)

    def save_best(iteration: int) -> None:
        """best.pt: the weights to evaluate or deploy (a resume continues from last.pt)."""
        if dist.is_main:
            runtime.save_checkpoint({"iteration": iteration, "model": model.state_dict(), "best": best,
                                     "config_name": cfg.name}, run_dir / "best.pt")

    def checkpoint(path: Path, iteration: int) -> None:
        """Save everything a resume needs; every rank contributes its RNG state, rank 0 writes."""
        rng = [runtime.rng_state()]
        if dist.enabled:
            rng = [None] * dist.world_size
            torch.distributed.all_gather_object(rng, runtime.rng_state())
        if dist.is_main:
            runtime.save_checkpoint({
                "iteration": iteration, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "strategy": strategy.state_dict(), "rng": rng, "best": best,
                "wall_time_s": wall_before + time.perf_counter() - started, "config_name": cfg.name,
            }, path)

    def check_finite(iteration: int, weights: bool = False) -> None:
        """One host sync: did any loss since the last check (or, before a save, any weight) stop being finite?"""
        ok = finite if not weights else finite & weights_finite(model)
        bad = runtime.all_reduce_sum((~ok).float().reshape(1))  # every rank stops together
        if bool(bad > 0):
            last = run_dir / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written"
            raise TrainingDiverged(f"loss or weights became NaN/inf by iteration {iteration} of {cfg.name}; {kept}. "
                                   f"Lower train.lr (now {t.lr:g}) or check the data")

    def validate(iteration: int) -> dict:
        vis = []

        def keep_for_display(batch, pred):
            for i in range(min(len(pred), t.vis_images - len(vis))):
                vis.append((batch["image"][i], batch["label"][i], pred[i]))

        model.eval()
        confusion = evaluate([model], val_batches, device, cfg.model.num_classes,  # float32: exact scores
                             on_batch=keep_for_display if dist.is_main and writer else None)
        model.train()
        metrics = metrics_from_confusion(confusion)
        if writer:
            writer.add_scalar("val/mIoU", metrics["mIoU"], iteration)
            for name, value in metrics["IoU"].items():
                if value is not None:
                    writer.add_scalar(f"val/IoU/{name}", value, iteration)
            for i, (image, label, pred) in enumerate(vis):
                writer.add_image(f"val/prediction/{i}", prediction_panel(image, label, pred), iteration)
        return metrics

    # loop
    started = time.perf_counter()
    finite = torch.ones((), dtype=torch.bool, device=device)
    loss_sums: dict[str, torch.Tensor] = {}
    logged_since = 0
    model.train()
    progress = tqdm(total=max_iters, initial=start_iter, disable=not dist.is_main, dynamic_ncols=True)
    iteration = start_iter
    with StopRequest() as stop:
        while iteration < max_iters:
            ctx.iteration = iteration
            source = to_device(next(source_batches), device)
            target = to_device(next(target_batches), device) if target_batches else None
            losses = train_step(train_model, strategy, optimizer, scheduler, source, target, ctx)
            iteration += 1
            progress.update()

            total = sum(losses.values())
            finite &= torch.isfinite(total)
            for name, value in losses.items():
                loss_sums[name] = loss_sums.get(name, 0.0) + value.float()
            logged_since += 1

            at_end = iteration == max_iters
            stop_now = stop.requested
            if dist.enabled:  # ranks must agree: they compare notes at logging intervals only
                stop_now = False
                if iteration % t.log_interval == 0 or at_end:
                    flag = torch.tensor([float(stop.requested)], device=device)
                    stop_now = bool(runtime.all_reduce_sum(flag) > 0)
            if iteration % t.log_interval == 0 or at_end or stop_now:
                check_finite(iteration)
                means = dict(zip(loss_sums, (torch.stack(list(loss_sums.values())) / logged_since).tolist()))
                lrs = {group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)}
                if writer:
                    for name, value in means.items():
                        writer.add_scalar(f"loss/{name}", value, iteration)
                    for name, lr in lrs.items():
                        writer.add_scalar(f"lr/{name}", lr, iteration)
                progress.set_postfix(loss=f"{sum(means.values()):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                loss_sums, logged_since = {}, 0
            if (t.eval_interval and iteration % t.eval_interval == 0) or at_end:
                metrics = validate(iteration)
                if metrics["mIoU"] is not None and metrics["mIoU"] > best["mIoU"]:
                    best = {"mIoU": metrics["mIoU"], "iteration": iteration, "IoU": metrics["IoU"]}
                    check_finite(iteration, weights=True)
                    save_best(iteration)
                if dist.is_main:
                    progress.write(f"iteration {iteration}: val mIoU {metrics['mIoU']} (best {best['mIoU']})")
            if iteration % t.checkpoint_interval == 0 or at_end or stop_now:
                check_finite(iteration, weights=True)
                checkpoint(run_dir / "last.pt", iteration)
            if stop_now and not at_end:
                progress.close()
                if dist.is_main:
                    print(f"stopped at iteration {iteration}; resume with --resume {run_dir / 'last.pt'}", flush=True)
                if writer:
                    writer.close()
                return run_dir
    progress.close()

    if start_iter == max_iters:  # resumed a finished run: score it again
        metrics = validate(iteration)
    if dist.is_main:
        wall_time = wall_before + time.perf_counter() - started
        summary = {
            "config_name": cfg.name,
            "synthetic": any(d.name == "synthetic" for d in (cfg.data.source, cfg.data.target, cfg.data.val)),
            "seed": cfg.seed, "model": cfg.model.name, "backbone": cfg.model.backbone, "adapt": cfg.adapt.name,
            "iterations": iteration, "wall_time_s": round(wall_time, 1),
            "final": metrics, "best": best, "classes": list(CLASS_NAMES), "config": to_dict(cfg),
        }
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        print(iou_table({cfg.name: metrics}), flush=True)
        writer.close()
    return run_dir


def prediction_panel(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """[image | ground truth | prediction] side by side, uint8 CHW, at the label's size."""
    size = label.shape[-2:]
    image = image.float()[None]
    if image.shape[-2:] != size:
        image = nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)
    image = image[0].round().clamp(0, 255).to(torch.uint8).cpu()
    return torch.cat([image, colorize(label.cpu()), colorize(pred.cpu())], dim=-1)


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a segmentation model (optionally with domain adaptation).")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-3")
    parser.add_argument("--resume", default=None, help="`auto` (newest run of this config) or a checkpoint path")
    parser.add_argument("--work-dir", default="runs", help="where run folders are created (default: runs)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, work_dir=args.work_dir, resume=args.resume)
    except (ConfigError, DatasetError, FileNotFoundError, runtime.CheckpointError, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        runtime.close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
