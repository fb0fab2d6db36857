"""The evaluator: one int64 confusion matrix over the whole validation set, IoU = TP / (TP + FP + FN).

    python eval.py --config configs/gta5_bisenet.yaml --checkpoint runs/gta5_bisenet/<time>/best.pt
    python eval.py --config ... --checkpoint A.pt B.pt C.pt          # averages the three models' softmax (FDA MBT)
    python eval.py --config ... --checkpoint A.pt B.pt --each        # one column per checkpoint
    python eval.py --config ... --checkpoint best.pt eval.label_size=full --save-predictions out --format labelids
    python eval.py --config ... --checkpoint best.pt --out results/        # + iou_table.txt, confusion.png, JSON
    python eval.py --config ... --checkpoint best.pt eval.tta.flip=true "eval.tta.scales=[0.75,1,1.25]"
    python eval.py --config ... --checkpoint best.pt "data.val.size=[2048,1024]" "eval.window=[1024,512]"
    python eval.py --run-dir runs/gta5_bisenet/<time>                     # every snapshot: the mIoU curve
    python eval.py --config ... --checkpoint best.pt|model.onnx --images DIR|VIDEO --out DIR   # your own data

The confusion matrix lives on the device (bincount per batch, summed across processes) and is read once.
mIoU is the mean over the classes *present*: a class with TP + FP + FN = 0 (absent from both the labels
and the predictions) has no IoU (null) and is left out of the mean, as cityscapesscripts does.
Predictions are scored (and saved) at the size of the labels: `eval.label_size: protocol` is the configured
val size (1024x512), `full` the original label files (2048x1024 for Cityscapes, as AdaptSegNet/ADVENT report).
`--format labelids` writes the PNGs cityscapesscripts' evalPixelLevelSemanticLabeling reads.

Inference (`Inference`, from the `eval` section): `eval.tta.flip` / `eval.tta.scales` average the softmax over
flipped and rescaled copies of the input, `eval.window` runs the model on overlapping crops and averages their
logits. Both apply here and to `--images`, not to the trainer's periodic validation. A `--checkpoint` ending in
`.onnx` (from `python -m rtda.models.export`) runs in ONNX Runtime instead of PyTorch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from rtda.config import Config, ConfigError, load_config
from rtda.datasets.io import DatasetError
from rtda.datasets.labels import CLASS_NAMES, IGNORE_INDEX, train_ids_to_label_ids
from rtda.datasets.labels import colorize as colorize_hwc
from rtda.datasets.samplers import ShardSampler
from rtda.models.export import ExportError, OnnxModel, is_onnx_file
from rtda.utils.amp import autocast
from rtda.utils.distributed import all_reduce_sum, close_distributed, init_distributed
from rtda.utils.files import CheckpointError, output_folder_problem
from rtda.utils.seed import init_worker

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


# ----------------------------------------------------------------------------------------- predicting
@dataclass(frozen=True)
class Inference:
    """How a model is applied to an image: flip / multi-scale TTA and sliding windows (sizes are (H, W))."""

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, eval_cfg) -> Inference:
        """From the `eval` section; a bad value is a ConfigError naming its key."""
        scales = tuple(float(s) for s in eval_cfg.tta.scales)
        if not scales or any(not (0 < s <= 8) for s in scales):
            raise ConfigError(f"eval.tta.scales = {list(eval_cfg.tta.scales)}: expected a non-empty list of "
                              "scales in (0, 8], e.g. [0.75, 1.0, 1.25]")
        window = stride = None
        if eval_cfg.window is not None:
            window = _hw(eval_cfg.window, "eval.window")
            if eval_cfg.window_stride is None:
                stride = (max(1, window[0] * 2 // 3), max(1, window[1] * 2 // 3))
            else:
                stride = _hw(eval_cfg.window_stride, "eval.window_stride")
                if stride[0] > window[0] or stride[1] > window[1]:
                    raise ConfigError(f"eval.window_stride = {eval_cfg.window_stride}: a step larger than "
                                      f"eval.window = {eval_cfg.window} leaves pixels unpredicted; expected "
                                      "each value <= the window's")
        elif eval_cfg.window_stride is not None:
            raise ConfigError("eval.window_stride is set but eval.window is null: set the window ([width, height])")
        return cls(bool(eval_cfg.tta.flip), scales, window, stride)

    @property
    def plain(self) -> bool:
        return not self.flip and self.scales == (1.0,) and self.window is None

    def describe(self) -> str:
        parts = []
        if self.flip or self.scales != (1.0,):
            parts.append("TTA " + " + ".join(filter(None, ["flip" if self.flip else "",
                                                           f"scales {list(self.scales)}" if self.scales != (1.0,)
                                                           else ""])))
        if self.window:
            parts.append(f"sliding window [{self.window[1]}, {self.window[0]}] stride "
                         f"[{self.stride[1]}, {self.stride[0]}] ([width, height])")
        return ", ".join(parts) or "whole image, no TTA"


def _hw(value: list[int], key: str) -> tuple[int, int]:
    """A config [width, height] pair -> (H, W), checked."""
    if len(value) != 2 or any(v < 1 for v in value):
        raise ConfigError(f"{key} = {value}: expected [width, height] in pixels, both >= 1")
    return int(value[1]), int(value[0])


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Offsets of windows of `window` pixels every `stride` pixels covering `length`; the last is flush with the end."""
    last = max(length - window, 0)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def sliding_logits(model, images: torch.Tensor, window: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Logits of `images` [B, 3, H, W] from overlapping `window` (H, W) crops, averaged where they overlap.

    A window larger than the image shrinks to it (one crop = whole-image inference). Each crop's logits are
    the model's own (eval mode: at the crop's size), so nothing is resized.
    """
    height, width = images.shape[-2:]
    wh, ww = min(window[0], height), min(window[1], width)
    total = count = None
    for top in window_starts(height, wh, stride[0]):
        for left in window_starts(width, ww, stride[1]):
            logits = model(images[..., top : top + wh, left : left + ww]).float()
            if total is None:
                total = logits.new_zeros(*logits.shape[:2], height, width)
                count = logits.new_zeros(1, 1, height, width)
            total[..., top : top + wh, left : left + ww] += logits
            count[..., top : top + wh, left : left + ww] += 1
    return total / count


@torch.no_grad()
def predict_probs(models: list[nn.Module], images: torch.Tensor, size=None,
                  amp_dtype: torch.dtype | None = None, inference: Inference | None = None) -> torch.Tensor:
    """The mean softmax of eval-mode `models` on `images` (raw 0-255), upsampled to `size` [B, C, H, W].

    With `inference`, every model also sees the flipped and rescaled images (TTA) and/or runs on sliding
    windows; all softmax maps (at `size`, or the images' size) are averaged.
    """
    inference = inference or Inference()
    size = tuple(size) if size is not None else tuple(images.shape[-2:])
    height, width = images.shape[-2:]
    probs, n = None, 0
    for model in models:
        for scale in inference.scales:
            x = images
            if scale != 1.0:
                scaled = (max(1, round(height * scale)), max(1, round(width * scale)))
                x = F.interpolate(images.float(), size=scaled, mode="bilinear", align_corners=False)
            for flipped in (False, True) if inference.flip else (False,):
                xi = x.flip(-1) if flipped else x
                with autocast(images.device, amp_dtype):
                    if inference.window is not None:
                        logits = sliding_logits(model, xi, inference.window, inference.stride)
                    else:
                        logits = model(xi)
                logits = logits.float()
                if flipped:
                    logits = logits.flip(-1)
                if tuple(logits.shape[-2:]) != size:
                    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                p = logits.softmax(1)
                probs = p if probs is None else probs.add_(p)
                n += 1
    return probs.div_(n)


@torch.no_grad()
def evaluate(models: list[nn.Module] | nn.Module, loader, device: torch.device, num_classes: int,
             amp_dtype: torch.dtype | None = None, on_batch=None, inference: Inference | None = None) -> torch.Tensor:
    """Score eval-mode models (their softmax averaged) on every labelled batch of `loader`.

    Returns the int64 confusion matrix [num_classes, num_classes], summed across processes.
    `on_batch(batch, pred)` sees each batch (on the device) with its train-id prediction at the label size.
    `inference`: TTA and sliding windows (default: one whole-image pass per model).
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True).long()  # uint8 from the loader
        pred = predict_probs(models, images, label.shape[-2:], amp_dtype, inference).argmax(1)
        update_confusion(confusion, pred, label)
        if on_batch is not None:
            on_batch({**batch, "image": images, "label": label}, pred)
    return all_reduce_sum(confusion)


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


# ------------------------------------------------------------------------------------------ loading
def load_model(cfg: Config, path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """One eval-mode model and its checkpoint dict: a PyTorch checkpoint, or an ONNX file (ONNX Runtime).

    Weights of another model or an ONNX file with another number of classes: one `ConfigError` line.
    """
    from rtda.models import build_untrained, load_trained_weights

    if is_onnx_file(path):
        model = OnnxModel(path, device)
        if model.num_classes is not None and model.num_classes != cfg.model.num_classes:
            raise ConfigError(f"{path}: the ONNX model predicts {model.num_classes} classes "
                              f"({model.metadata.get('model', 'unknown model')}), the config's model.num_classes "
                              f"is {cfg.model.num_classes}; pass the config it was exported from")
        return model, {"iteration": _int_or_none(model.metadata.get("iteration"))}
    model = build_untrained(cfg.model)  # the checkpoint has every weight
    checkpoint = load_trained_weights(model, path, cfg.model)
    return model.to(device).eval(), checkpoint


def load_models(cfg: Config, checkpoints: list[str], device: torch.device) -> list[nn.Module]:
    return [load_model(cfg, path, device)[0] for path in checkpoints]


def _int_or_none(text) -> int | None:
    return int(text) if str(text).isdigit() else None


def run_name(checkpoint: str) -> str:
    """`runs/gta5_bisenet/20260101-120000/best.pt` -> `gta5_bisenet/best`."""
    path = Path(checkpoint)
    return f"{path.parent.parent.name}/{path.stem}" if path.parent.parent.name else path.stem


# ------------------------------------------------------------------------------ snapshots of a run
SNAPSHOT = re.compile(r"^iter_(\d+)\.pt$")


def run_checkpoints(run_dir: str | Path) -> list[tuple[int | None, Path]]:
    """`RUN/snapshots/iter_NNNNNNN.pt` (iteration from the name) in iteration order, then `RUN/last.pt`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    found = []
    snapshots = run_dir / "snapshots"
    if snapshots.is_dir():
        for path in snapshots.iterdir():
            match = SNAPSHOT.match(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
    found.sort()
    if (run_dir / "last.pt").is_file():
        found.append((None, run_dir / "last.pt"))  # its iteration is read from the file
    if not found:
        raise FileNotFoundError(f"{run_dir}: no snapshots/iter_NNNNNNN.pt and no last.pt (train with "
                                "train.keep_every=N to keep a snapshot every N iterations)")
    return found


def score_run(cfg: Config, run_dir: str | Path, loader, device: torch.device, inference: Inference,
              log=print) -> dict:
    """Score every snapshot of a run (and last.pt) on `loader`: {"snapshots": [...], "best": ...}.

    An unreadable checkpoint is reported through `log` and skipped; last.pt at the iteration of a snapshot
    (the same weights) is not scored twice.
    """
    rows, skipped, seen = [], [], {}
    for named_iteration, path in run_checkpoints(run_dir):
        try:
            model, checkpoint = load_model(cfg, path, device)
        except CheckpointError as exc:
            log(f"skipped: {exc}")
            skipped.append(str(path))
            continue
        iteration = checkpoint.get("iteration", named_iteration)
        iteration = int(iteration) if isinstance(iteration, int) else named_iteration
        if iteration is not None and iteration in seen:
            seen[iteration]["also"] = path.name
            continue
        confusion = evaluate([model], loader, device, cfg.model.num_classes, inference=inference)
        row = {"iteration": iteration, "checkpoint": str(path.relative_to(run_dir)),
               **metrics_from_confusion(confusion)}
        rows.append(row)
        if iteration is not None:
            seen[iteration] = row
    rows.sort(key=lambda r: (r["iteration"] is None, r["iteration"] or 0))
    scored = [r for r in rows if r["mIoU"] is not None]
    best = max(scored, key=lambda r: r["mIoU"]) if scored else None
    return {"snapshots": rows, "best": best, "skipped": skipped}


def snapshot_table(result: dict) -> str:
    lines = [f"{'iteration':>10}  {'checkpoint':<28}{'mIoU':>8}"]
    for r in result["snapshots"]:
        it = "?" if r["iteration"] is None else str(r["iteration"])
        name = r["checkpoint"] + (f" (= {r['also']})" if r.get("also") else "")
        miou = "-" if r["mIoU"] is None else f"{r['mIoU']:.2f}"
        mark = "  <- best" if r is result["best"] else ""
        lines.append(f"{it:>10}  {name:<28}{miou:>8}{mark}")
    return "\n".join(lines)


# -------------------------------------------------------------------------- your own images and videos
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".mjpeg")
MAX_FRAME_MISSES = 50  # consecutive unreadable frames after which a video counts as ended


@dataclass
class PredictionReport:
    done: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)  # "name (why)"
    model_s: float = 0.0  # time inside the model(s)
    wall_s: float = 0.0  # everything: decoding, inference, writing
    outputs: list[Path] = dataclasses.field(default_factory=list)

    def summary(self, what: str) -> str:
        fps = self.done / self.wall_s if self.wall_s > 0 else 0.0
        model_fps = self.done / self.model_s if self.model_s > 0 else 0.0
        line = (f"predicted {self.done} {what} in {self.wall_s:.1f} s: {fps:.2f} {what}/s end to end "
                f"(model alone {model_fps:.2f} FPS)")
        if self.skipped:
            shown = "; ".join(self.skipped[:5]) + ("; ..." if len(self.skipped) > 5 else "")
            line += f"; {len(self.skipped)} unreadable {what} skipped: {shown}"
        return line


class Predictor:
    """Train-id maps at an image's own size from `models` (softmax averaged) at `input_size` (H, W; None = as is)."""

    def __init__(self, models: list[nn.Module], device: torch.device, input_size: tuple[int, int] | None,
                 inference: Inference):
        self.models, self.device, self.input_size, self.inference = models, device, input_size, inference
        self.model_s = 0.0

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """`rgb` uint8 [H, W, 3] -> uint8 train ids [H, W]."""
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(self.device)
        height, width = image.shape[-2:]
        if self.input_size is not None and tuple(self.input_size) != (height, width):
            image = F.interpolate(image.float(), size=self.input_size, mode="bilinear", align_corners=False)
        start = time.perf_counter()
        pred = predict_probs(self.models, image, (height, width), inference=self.inference).argmax(1)[0]
        pred = pred.to(torch.uint8).cpu().numpy()  # the copy to the host is the synchronisation
        self.model_s += time.perf_counter() - start
        return pred


def overlay(rgb: np.ndarray, pred: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Half image, half Cityscapes colour of the prediction (uint8 [H, W, 3])."""
    colours = colorize_hwc(pred)
    return ((1 - alpha) * rgb + alpha * colours).round().astype(np.uint8)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def predict_folder(predictor: Predictor, folder: Path, out: Path, progress: bool = True) -> PredictionReport:
    """Colour map and overlay PNGs for every image under `folder` (sub-folders mirrored under `out`)."""
    from tqdm import tqdm

    from rtda.datasets.io import read_image

    files = list_images(folder)
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
    report = PredictionReport()
    start = time.perf_counter()
    for path in tqdm(files, desc="predicting", unit="image", disable=not progress, file=sys.stderr):
        try:
            rgb = read_image(path).permute(1, 2, 0).numpy()
        except DatasetError as exc:
            report.skipped.append(f"{path.relative_to(folder)} ({str(exc).split(': ', 1)[-1]})")
            continue
        pred = predictor(rgb)
        stem = out / path.relative_to(folder).with_suffix("")
        stem.parent.mkdir(parents=True, exist_ok=True)
        for kind, array in (("color", colorize_hwc(pred)), ("overlay", overlay(rgb, pred))):
            target = stem.with_name(f"{stem.name}_{kind}.png")
            Image.fromarray(array).save(target)
            report.outputs.append(target)
        report.done += 1
    report.wall_s, report.model_s = time.perf_counter() - start, predictor.model_s
    return report


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ConfigError("reading and writing videos needs OpenCV, which is not installed: "
                          "pip install opencv-python-headless") from None
    return cv2


def video_frames(capture, announced: int):
    """(index, RGB frame or None) for every frame of an opened cv2.VideoCapture; None = an unreadable frame.

    A read failure is an unreadable frame when a readable one follows; failures at the end (or more than
    MAX_FRAME_MISSES in a row) end the video, since containers often announce more frames than they hold.
    """
    index, pending = 0, []
    while True:
        ok, frame = capture.read()
        if ok and frame is not None and frame.ndim == 3 and frame.shape[2] == 3:
            for missed in pending:
                yield missed, None
            pending = []
            yield index, np.ascontiguousarray(frame[..., ::-1])  # BGR -> RGB
        else:
            pending.append(index)
            if len(pending) > MAX_FRAME_MISSES or (announced > 0 and index >= announced - 1) or announced <= 0:
                return
        index += 1


def predict_video(predictor: Predictor, path: Path, out: Path, progress: bool = True) -> PredictionReport:
    """`out/<stem>_overlay.mp4`: every readable frame with its prediction overlaid, at the source's frame rate."""
    from tqdm import tqdm

    cv2 = _cv2()
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise DatasetError(f"{path}: not a video OpenCV can open (formats: {', '.join(VIDEO_SUFFIXES)})")
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and math.isfinite(fps) and fps > 0 else 25.0
    announced = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{path.stem}_overlay.mp4"
    writer, size = None, None
    report = PredictionReport()
    start = time.perf_counter()
    bar = tqdm(total=announced or None, desc="predicting", unit="frame", disable=not progress, file=sys.stderr)
    try:
        for index, rgb in video_frames(capture, announced):
            bar.update(1)
            if rgb is not None and size is not None and rgb.shape[:2] != size:
                rgb = None  # a frame of another size than the stream's: corrupt
            if rgb is None:
                report.skipped.append(f"frame {index}")
                continue
            if writer is None:
                size = rgb.shape[:2]
                writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size[1], size[0]))
                if not writer.isOpened():
                    raise DatasetError(f"{target}: OpenCV cannot write an mp4v video here")
            writer.write(np.ascontiguousarray(overlay(rgb, predictor(rgb))[..., ::-1]))
            report.done += 1
    finally:
        bar.close()
        capture.release()
        if writer is not None:
            writer.release()
    if report.done == 0:
        raise DatasetError(f"{path}: no readable frame in this video")
    report.outputs.append(target)
    report.wall_s, report.model_s = time.perf_counter() - start, predictor.model_s
    return report


def is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate checkpoints on the validation set of a config, score "
                                     "every snapshot of a run, or predict on your own images and videos.")
    parser.add_argument("--config", help="YAML config file (its data.val, model and eval sections); with "
                        "--run-dir the default is RUN/config.yaml")
    parser.add_argument("--checkpoint", nargs="+", help="one or more checkpoints (.pt, or .onnx from "
                        "`python -m rtda.models.export`); several are ensembled (mean softmax) unless --each")
    parser.add_argument("--run-dir", metavar="RUN", help="score every RUN/snapshots/iter_*.pt and RUN/last.pt "
                        "in iteration order; the curve goes to RUN/snapshot_miou.json")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. eval.label_size=full")
    parser.add_argument("--each", action="store_true", help="score every checkpoint on its own, one column each")
    parser.add_argument("--save-predictions", metavar="DIR", help="write one PNG per validation image")
    parser.add_argument("--format", default="labelids", choices=PREDICTION_FORMATS,
                        help="labelids (for cityscapesscripts), trainids, color or overlay")
    parser.add_argument("--images", metavar="DIR|VIDEO", help="predict on a folder of images (any size, no "
                        "labels) or a video file instead of scoring; needs --out")
    parser.add_argument("--out", metavar="DIR", help="--images: where colour maps and overlays go; scoring: "
                        "where iou_table.txt, metrics.json and the confusion-matrix PNG go")
    parser.add_argument("--input-size", metavar="HxW|original", help="--images: the size the model sees "
                        "(default the config's data.val.size; `original` = each image's own size, e.g. with "
                        "eval.window); predictions are always written at the image's size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    # `--checkpoint A B section.key=value` : argparse hands the trailing overrides to --checkpoint; take them back
    checkpoints = args.checkpoint or []
    overrides = [c for c in checkpoints if OVERRIDE.match(c)]
    args.checkpoint = [c for c in checkpoints if not OVERRIDE.match(c)]
    args.overrides = overrides + args.overrides
    if args.run_dir:
        if args.checkpoint or args.images:
            parser.error("--run-dir scores the run's own snapshots: drop --checkpoint and --images")
        args.config = args.config or str(Path(args.run_dir) / "config.yaml")
    else:
        if not args.config:
            parser.error("--config is required (unless --run-dir)")
        if not args.checkpoint:
            parser.error("--checkpoint: expected at least one checkpoint path")
    if args.images and not args.out:
        parser.error("--images needs --out DIR for the colour maps and overlays")
    if args.images and (args.each or args.save_predictions):
        parser.error("--each and --save-predictions score a validation set; --images writes to --out")
    if args.input_size and not args.images:
        parser.error("--input-size applies to --images (scoring uses data.val.size)")
    for flag, folder in (("--save-predictions", args.save_predictions), ("--out", args.out)):
        if folder:
            problem = output_folder_problem(Path(folder))
            if problem:
                parser.error(f"{flag} {folder}: {problem}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.run_dir:
            run_checkpoints(args.run_dir)  # a missing folder or one without checkpoints: before anything is built
        cfg = load_config(args.config, args.overrides)
        inference = Inference.from_config(cfg.eval)
        if args.images:
            return _main_predict(args, cfg, inference)
        if args.each and args.save_predictions:
            raise ConfigError("--save-predictions needs one model (or one ensemble); drop --each")
        dist = init_distributed()
        from rtda.datasets import build_dataset

        val_set = build_dataset(cfg.data.val, cfg, "val")
        loader = DataLoader(val_set, batch_size=cfg.eval.batch_size, num_workers=cfg.train.workers,
                            sampler=ShardSampler(len(val_set), dist.rank, dist.world_size),
                            pin_memory=dist.device.type == "cuda", worker_init_fn=init_worker)
        header = (f"{cfg.name}: {len(val_set)} validation images, labels at "
                  f"{'their original size' if cfg.eval.label_size == 'full' else 'the configured size'}; "
                  f"{inference.describe()}")
        if args.run_dir:
            return _main_run_dir(args, cfg, loader, dist, inference, header)
        groups = [[c] for c in args.checkpoint] if args.each else [args.checkpoint]
        on_batch = None
        if args.save_predictions:
            out = Path(args.save_predictions)
            out.mkdir(parents=True, exist_ok=True)

            def on_batch(batch, pred):
                for name, image, p in zip(batch["name"], batch["image"], pred):
                    prediction_image(p, image, args.format).save(out / f"{name}.png")

        columns, confusions = {}, {}
        for group in groups:
            models = load_models(cfg, group, dist.device)
            confusion = evaluate(models, loader, dist.device, cfg.model.num_classes, on_batch=on_batch,
                                 inference=inference)
            name = run_name(group[0]) if len(group) == 1 else f"ensemble of {len(group)}"
            columns[name], confusions[name] = metrics_from_confusion(confusion), confusion
        if dist.is_main:
            print(header)
            table = iou_table(columns)
            print(table)
            if args.save_predictions:
                print(f"predictions ({args.format}) in {args.save_predictions}")
            if args.out:
                _write_scores(Path(args.out), cfg, header, table, columns, confusions, inference)
    except (ConfigError, DatasetError, FileNotFoundError, CheckpointError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        close_distributed()
    return 0


def _write_scores(out: Path, cfg: Config, header: str, table: str, columns: dict, confusions: dict,
                  inference: Inference) -> None:
    """iou_table.txt, metrics.json and one row-normalised confusion-matrix PNG per column, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "iou_table.txt").write_text(header + "\n" + table + "\n")
    plots = {}
    for name, confusion in confusions.items():
        file = "confusion.png" if len(confusions) == 1 else f"confusion_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.png"
        miou = columns[name]["mIoU"]
        save_confusion_plot(confusion, out / file, title=f"{name} on {cfg.name} val: mIoU "
                            f"{'-' if miou is None else f'{miou:.2f}'} (rows normalised, %)")
        plots[name] = file
    (out / "metrics.json").write_text(json.dumps(
        {"config_name": cfg.name, "label_size": cfg.eval.label_size, "inference": inference.describe(),
         "classes": list(CLASS_NAMES), "columns": columns, "confusion_plots": plots,
         "confusion": {name: c.cpu().tolist() for name, c in confusions.items()}}, indent=1))
    print(f"wrote {out / 'iou_table.txt'}, {out / 'metrics.json'} and {', '.join(str(out / f) for f in plots.values())}")


def _main_run_dir(args, cfg: Config, loader, dist, inference: Inference, header: str) -> int:
    run_dir = Path(args.run_dir)
    result = score_run(cfg, run_dir, loader, dist.device, inference,
                       log=lambda line: print(line, file=sys.stderr) if dist.is_main else None)
    if dist.is_main:
        print(header)
        print(snapshot_table(result))
        target = run_dir / "snapshot_miou.json"
        payload = {"config_name": cfg.name, "label_size": cfg.eval.label_size, "inference": inference.describe(),
                   "classes": list(CLASS_NAMES), **result}
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, target)
        best = result["best"]
        if best is not None:
            print(f"best: iteration {best['iteration']} ({best['checkpoint']}), mIoU {best['mIoU']:.2f}; "
                  f"curve written to {target}")
    return 0 if result["snapshots"] else 1


def _main_predict(args, cfg: Config, inference: Inference) -> int:
    source, out = Path(args.images), Path(args.out)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder or video file")
    if source.is_file() and not is_video(source):
        raise DatasetError(f"{source}: --images takes a folder of images or a video file "
                           f"({', '.join(VIDEO_SUFFIXES)})")
    if args.input_size in (None, ""):
        width, height = cfg.data.val.size
        input_size = (height, width)
    elif args.input_size == "original":
        input_size = None
    else:
        from rtda.models.export import parse_size

        input_size = parse_size(args.input_size, "--input-size")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = load_models(cfg, args.checkpoint, device)
    predictor = Predictor(models, device, input_size, inference)
    size_text = "each image's own size" if input_size is None else f"{input_size[0]}x{input_size[1]}"
    print(f"{', '.join(map(str, args.checkpoint))} on {source} at {size_text} ({inference.describe()}), "
          f"device {device}", file=sys.stderr)
    if source.is_dir():
        report = predict_folder(predictor, source, out, not args.no_progress)
        print(report.summary("images"))
        print(f"colour maps (*_color.png) and overlays (*_overlay.png) in {out}")
    else:
        report = predict_video(predictor, source, out, not args.no_progress)
        print(report.summary("frames"))
        print(f"overlaid video: {report.outputs[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
