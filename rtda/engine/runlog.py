"""What a run reports: validation scores (and prediction images) and everything rank 0 writes besides checkpoints.

Files: config.yaml, TensorBoard events and, when the run finishes, metrics.json (through `rtda.runs`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from rtda import runs
from rtda.config import Config, dump_config, to_dict
from rtda.engine.setup import Progress
from rtda.evaluation import CLASS_NAMES, colorize, evaluate, iou_table, metrics_from_confusion
from rtda.utils.distributed import Distributed


class Validator:
    """mIoU and per-class IoU of the model on the val set; TensorBoard gets the scores and a few predictions.

    Calling it returns the metrics.json form of the scores (`metrics_from_confusion`) and leaves the model in
    train mode.
    """

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
    """What rank 0 writes besides checkpoints: config.yaml, TensorBoard, the progress bar, metrics.json.

    Other ranks get a disabled progress bar and no writer, so every rank can call every method.
    """

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

    def step(self) -> None:
        """One more iteration done (the progress bar)."""
        self.progress.update()

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
        runs.write_metrics(self.run_dir, summary)
        print(iou_table({cfg.name: metrics}), flush=True)

    def close(self) -> None:
        self.progress.close()
        if self.writer:
            self.writer.close()
