"""The evaluator: one int64 confusion matrix over the whole validation set, IoU = TP / (TP + FP + FN).

    python eval.py --config configs/gta5_bisenet.yaml --checkpoint runs/gta5_bisenet/<time>/best.pt
    python eval.py --config ... --checkpoint A.pt B.pt C.pt          # averages the three models' softmax (FDA MBT)
    python eval.py --config ... --checkpoint A.pt B.pt --each        # one column per checkpoint
    python eval.py --config ... --checkpoint best.pt eval.label_size=full --save-predictions out --format labelids

The confusion matrix lives on the device (bincount per batch, summed across processes) and is read once.
mIoU is the mean over the classes *present*: a class with TP + FP + FN = 0 (absent from both the labels
and the predictions) has no IoU (null) and is left out of the mean, as cityscapesscripts does.
Predictions are scored (and saved) at the size of the labels: `eval.label_size: protocol` is the configured
val size (1024x512), `full` the original label files (2048x1024 for Cityscapes, as AdaptSegNet/ADVENT report).
`--format labelids` writes the PNGs cityscapesscripts' evalPixelLevelSemanticLabeling reads.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import runtime
from config import Config, ConfigError, load_config
from datasets.io import DatasetError
from datasets.labels import CLASS_NAMES, IGNORE_INDEX, train_ids_to_label_ids
from datasets.labels import colorize as colorize_hwc

PREDICTION_FORMATS = ("labelids", "trainids", "color", "overlay")
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")  # section.key=value


# ------------------------------------------------------------------------------------------- scoring
def update_confusion(confusion: torch.Tensor, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Add one batch to `confusion` [C, C] (rows = ground truth, columns = prediction); 255 is ignored."""
    num_classes = confusion.shape[0]
    valid = label != IGNORE_INDEX
    index = label[valid] * num_classes + pred[valid]
    confusion += torch.bincount(index, minlength=num_classes**2).view(num_classes, num_classes)
    return confusion


def iou_from_confusion(confusion: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-class IoU (NaN for a class absent from labels and predictions) and their mean over the others, 0-1."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    present = ~iou.isnan()
    miou = iou[present].mean().item() if present.any() else math.nan
    return iou, miou


def metrics_from_confusion(confusion: torch.Tensor, names=CLASS_NAMES) -> dict:
    """`{"mIoU": 41.2, "IoU": {"road": 88.0, ..., "train": None}}` in percent (the metrics.json schema)."""
    iou, miou = iou_from_confusion(confusion.cpu())
    per_class = {name: None if math.isnan(v) else round(100 * v, 2) for name, v in zip(names, iou.tolist())}
    return {"mIoU": round(100 * miou, 2) if not math.isnan(miou) else None, "IoU": per_class}


def iou_table(columns: dict[str, dict], names=CLASS_NAMES) -> str:
    """A per-class text table, one column of `metrics_from_confusion` results per entry."""
    width = max(12, *(len(c) + 2 for c in columns))
    lines = ["class".ljust(15) + "".join(c.rjust(width) for c in columns)]
    for name in names:
        cells = (m["IoU"].get(name) for m in columns.values())
        lines.append(name.ljust(15) + "".join(("-" if v is None else f"{v:.2f}").rjust(width) for v in cells))
    lines.append("mIoU".ljust(15) + "".join(
        ("-" if m["mIoU"] is None else f"{m['mIoU']:.2f}").rjust(width) for m in columns.values()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- predicting
@torch.no_grad()
def predict_probs(models: list[nn.Module], images: torch.Tensor, size=None,
                  amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The mean softmax of eval-mode `models` on `images` (raw 0-255), upsampled to `size` [B, C, H, W]."""
    probs = None
    for model in models:
        with runtime.autocast(images.device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        p = logits.softmax(1)
        probs = p if probs is None else probs.add_(p)
    return probs.div_(len(models))


@torch.no_grad()
def evaluate(models: list[nn.Module] | nn.Module, loader, device: torch.device, num_classes: int,
             amp_dtype: torch.dtype | None = None, on_batch=None) -> torch.Tensor:
    """Score eval-mode models (their softmax averaged) on every labelled batch of `loader`.

    Returns the int64 confusion matrix [num_classes, num_classes], summed across processes.
    `on_batch(batch, pred)` sees each batch (on the device) with its train-id prediction at the label size.
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        pred = predict_probs(models, images, label.shape[-2:], amp_dtype).argmax(1)
        update_confusion(confusion, pred, label)
        if on_batch is not None:
            on_batch({**batch, "image": images, "label": label}, pred)
    return runtime.all_reduce_sum(confusion)


def colorize(train_ids: torch.Tensor) -> torch.Tensor:
    """Train ids [H, W] -> Cityscapes colours as uint8 [3, H, W] (TensorBoard's CHW)."""
    return colorize_hwc(train_ids).permute(2, 0, 1)


def prediction_image(pred: torch.Tensor, image: torch.Tensor, fmt: str) -> Image.Image:
    """One saved prediction (train ids [H, W] on any device) as a PIL image in `fmt`."""
    pred = pred.to(torch.uint8).cpu()
    if fmt == "labelids":
        return Image.fromarray(train_ids_to_label_ids(pred).numpy())
    if fmt == "trainids":
        return Image.fromarray(pred.numpy())
    colours = colorize_hwc(pred).numpy()
    if fmt == "color":
        return Image.fromarray(colours)
    rgb = image.float()[None]
    if rgb.shape[-2:] != pred.shape:
        rgb = F.interpolate(rgb, size=pred.shape, mode="bilinear", align_corners=False)
    rgb = rgb[0].permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((0.5 * rgb + 0.5 * colours).round().astype(np.uint8))


# ---------------------------------------------------------------------------- official cross-check
def cityscapes_official_miou(predictions: str | Path, label_files: list[str | Path]) -> float:
    """mIoU (0-1) from cityscapesscripts' evalPixelLevelSemanticLabeling on `labelids` PNGs and `*_labelIds.png` GT.

    It matches each ground-truth file `{city}_{seq}_{frame}_gtFine_labelIds.png` to the one prediction named
    `{city}_{seq}_{frame}*.png` under `predictions`.
    """
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = official.args
    args.predictionPath, args.predictionWalk = os.path.abspath(predictions), None
    args.JSONOutput, args.colorized, args.quiet, args.evalInstLevelScore = False, False, True, False
    ground_truth = [str(f) for f in label_files]
    predicted = [official.getPrediction(args, gt) for gt in ground_truth]
    return float(official.evaluateImgLists(predicted, ground_truth, args)["averageScoreClasses"])


# ------------------------------------------------------------------------------------------------ CLI
def load_models(cfg: Config, checkpoints: list[str], device: torch.device) -> list[nn.Module]:
    from models import build_model

    models = []
    for path in checkpoints:
        model = build_model(cfg.model)
        state = runtime.model_state_from_checkpoint(runtime.load_checkpoint(path))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"{path}: weights do not fit model {cfg.model.name}/{cfg.model.backbone} "
                              f"with {cfg.model.num_classes} classes ({first})") from None
        models.append(model.to(device).eval())
    return models


def run_name(checkpoint: str) -> str:
    """`runs/gta5_bisenet/20260101-120000/best.pt` -> `gta5_bisenet/best`."""
    path = Path(checkpoint)
    return f"{path.parent.parent.name}/{path.stem}" if path.parent.parent.name else path.stem


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate checkpoints on the validation set of a config.")
    parser.add_argument("--config", required=True, help="YAML config file (its data.val and model sections)")
    parser.add_argument("--checkpoint", required=True, nargs="+", help="one or more checkpoints; several are "
                        "ensembled (mean softmax) unless --each")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. eval.label_size=full")
    parser.add_argument("--each", action="store_true", help="score every checkpoint on its own, one column each")
    parser.add_argument("--save-predictions", metavar="DIR", help="write one PNG per validation image")
    parser.add_argument("--format", default="labelids", choices=PREDICTION_FORMATS,
                        help="labelids (for cityscapesscripts), trainids, color or overlay")
    args = parser.parse_args(argv)
    # `--checkpoint A B section.key=value` : argparse hands the trailing overrides to --checkpoint; take them back
    overrides = [c for c in args.checkpoint if OVERRIDE.match(c)]
    args.checkpoint = [c for c in args.checkpoint if not OVERRIDE.match(c)]
    args.overrides = overrides + args.overrides
    if not args.checkpoint:
        parser.error("--checkpoint: expected at least one checkpoint path")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.each and args.save_predictions:
            raise ConfigError("--save-predictions needs one model (or one ensemble); drop --each")
        dist = runtime.init_distributed()
        from datasets import build_dataset

        val_set = build_dataset(cfg.data.val, cfg, "val")
        loader = DataLoader(val_set, batch_size=cfg.eval.batch_size, num_workers=cfg.train.workers,
                            sampler=runtime.ShardSampler(len(val_set), dist.rank, dist.world_size),
                            pin_memory=dist.device.type == "cuda", worker_init_fn=runtime.init_worker)
        groups = [[c] for c in args.checkpoint] if args.each else [args.checkpoint]
        on_batch = None
        if args.save_predictions:
            out = Path(args.save_predictions)
            out.mkdir(parents=True, exist_ok=True)

            def on_batch(batch, pred):
                for name, image, p in zip(batch["name"], batch["image"], pred):
                    prediction_image(p, image, args.format).save(out / f"{name}.png")

        columns = {}
        for group in groups:
            models = load_models(cfg, group, dist.device)
            confusion = evaluate(models, loader, dist.device, cfg.model.num_classes, on_batch=on_batch)
            name = run_name(group[0]) if len(group) == 1 else f"ensemble of {len(group)}"
            columns[name] = metrics_from_confusion(confusion)
        if dist.is_main:
            print(f"{cfg.name}: {len(val_set)} validation images, labels at "
                  f"{'their original size' if cfg.eval.label_size == 'full' else 'the configured size'}")
            print(iou_table(columns))
            if args.save_predictions:
                print(f"predictions ({args.format}) in {args.save_predictions}")
    except (ConfigError, DatasetError, FileNotFoundError, runtime.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        runtime.close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
