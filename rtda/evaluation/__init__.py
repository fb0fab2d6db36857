"""The evaluator: confusion matrices, IoU and mIoU, inference with TTA and sliding windows, the mIoU curve of
a run's snapshots, prediction on your own images and videos, and eval.py's command line.

    metrics.py     confusion matrix -> IoU, mIoU (the rule), the per-class table, the confusion plot
    inference.py   Inference (TTA, windows), predict_probs, evaluate (the confusion over a loader), load_model(s)
    snapshots.py   score_run: every snapshot of a run folder
    predict.py     Predictor, folder and video prediction
    visual.py      colour maps and saved prediction PNGs
    cli.py         `python eval.py`

The names below are the ones other units use; they stay importable from `rtda.evaluation`. The pseudo-label
writer looks `load_models` and `predict_probs` up here when it runs, so patching them on this package
reaches it.
"""
from rtda.datasets.labels import CLASS_NAMES
from rtda.evaluation.cli import main, parse_args
from rtda.evaluation.inference import (
    Inference,
    evaluate,
    load_model,
    load_models,
    predict_probs,
    sliding_logits,
    window_starts,
)
from rtda.evaluation.metrics import (
    cityscapes_official_miou,
    iou_from_confusion,
    iou_table,
    metrics_from_confusion,
    save_confusion_plot,
    update_confusion,
)
from rtda.evaluation.snapshots import run_checkpoints, score_run, snapshot_table
from rtda.evaluation.visual import colorize, prediction_image

__all__ = [
    "CLASS_NAMES", "Inference", "cityscapes_official_miou", "colorize", "evaluate", "iou_from_confusion",
    "iou_table", "load_model", "load_models", "main", "metrics_from_confusion", "parse_args", "predict_probs",
    "prediction_image", "run_checkpoints", "save_confusion_plot", "score_run", "sliding_logits", "snapshot_table",
    "update_confusion", "window_starts",
]
