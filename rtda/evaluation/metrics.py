"""Scores from one int64 confusion matrix [C, C] (rows = ground truth, columns = prediction).

IoU = TP / (TP + FP + FN) per class. mIoU is the mean over the classes *present*: a class with
TP + FP + FN = 0 (absent from both the labels and the predictions) has no IoU (NaN, null in JSON) and is
left out of the mean, as cityscapesscripts does. `cityscapes_official_miou` runs cityscapesscripts itself,
as a cross-check of that rule on saved `labelids` PNGs.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from rtda.datasets.labels import CLASS_NAMES, IGNORE_INDEX


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


def save_confusion_plot(confusion: torch.Tensor, path: str | Path, names=CLASS_NAMES, title: str = "") -> Path:
    """The confusion matrix as a PNG: rows = ground truth normalised to sum to 1 (recall on the diagonal),
    columns = prediction, class names on both axes; a class without ground-truth pixels is a grey row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion.double().cpu().numpy()
    rows = counts.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(rows > 0, counts / rows, np.nan)
    n = len(names)
    side = max(4.0, 0.42 * n + 2)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="0.85")
    shown = ax.imshow(np.ma.masked_invalid(normalised), cmap=cmap, vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            v = normalised[i, j]
            if not np.isnan(v) and v >= 0.005:
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    ax.set_title(title or "confusion matrix (rows normalised, %)", fontsize=9)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the ground-truth row")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
