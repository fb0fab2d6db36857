"""Prediction on your own data (`eval.py --images`): a folder of images of any size, or a video, with no labels.

Outputs are at each image's own size: `<name>_color.png` and `<name>_overlay.png` per image (sub-folders
mirrored), or `<stem>_overlay.mp4` for a video at its own frame rate. Unreadable images or frames are
skipped and listed in the `PredictionReport`. Outputs are named by the input's stem, so inputs that differ only
in their suffix (`a.png`, `a.jpg`) are refused with one line listing them (`folder_outputs`) rather than
writing one over the other; every written file is noted in `<out>/.rtda-outputs.jsonl` (`record_outputs`).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rtda.config import ConfigError
from rtda.datasets.io import DatasetError
from rtda.datasets.labels import colorize as colorize_hwc
from rtda.evaluation.inference import Inference, predict_probs
from rtda.utils.files import record_outputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".mjpeg")
MAX_FRAME_MISSES = 50  # consecutive unreadable frames after which a video counts as ended


@dataclass
class PredictionReport:
    """What one `predict_folder` / `predict_video` call did: counts, skipped inputs, times and written files."""

    done: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)  # "name (why)"
    model_s: float = 0.0  # time inside the model(s)
    wall_s: float = 0.0  # everything: decoding, inference, writing
    outputs: list[Path] = dataclasses.field(default_factory=list)

    def summary(self, what: str) -> str:
        """One line: how many `what` (images, frames), end-to-end and model-only rates, the first skipped ones."""
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
    """Every file under `folder` (recursively) with an IMAGE_SUFFIXES suffix, any case, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# EXIF orientation tag (0x0112) -> the PIL transpose that shows the image upright (as PIL.ImageOps.exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def displayed(rgb: np.ndarray, path: Path) -> np.ndarray:
    """The pixels `rgb` decoded from `path`, turned as viewers show them: phones store photos sideways with an EXIF
    orientation tag, and a model fed the stored pixels predicts sideways. No tag, or an unreadable one: unchanged."""
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 -- the pixels decoded; a broken EXIF block only loses the orientation
        return rgb
    if orientation not in _UPRIGHT:
        return rgb
    return np.array(Image.fromarray(rgb).transpose(_UPRIGHT[orientation]))  # a writable copy


OUTPUT_KINDS = ("color", "overlay")


def folder_outputs(folder: Path) -> tuple[list[Path], list[str]]:
    """(the images under `folder`, every output name `predict_folder` writes for them, relative to --out).

    DatasetError (one line) when there are no images, or when images differ only in their suffix (`a.png`,
    `a.jpg`): both would write `a_color.png`, so the clash is listed instead of one prediction being lost.
    """
    files = list_images(folder)
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
    stems: dict[Path, list[Path]] = {}
    for path in files:
        stems.setdefault(path.relative_to(folder).with_suffix(""), []).append(path)
    clashes = [paths for paths in stems.values() if len(paths) > 1]
    if clashes:
        shown = "; ".join(" and ".join(str(p.relative_to(folder)) for p in paths) for paths in clashes[:5])
        raise DatasetError(f"{folder}: {len(clashes)} image name(s) differ only in their suffix and would write the "
                           f"same {'/'.join(f'<name>_{k}.png' for k in OUTPUT_KINDS)}: {shown}"
                           f"{'; ...' if len(clashes) > 5 else ''}; rename or move all but one of each")
    return files, [_output_name(stem, kind) for stem in stems for kind in OUTPUT_KINDS]


def _output_name(stem: Path, kind: str) -> str:
    return stem.with_name(f"{stem.name}_{kind}.png").as_posix()


def predict_folder(predictor: Predictor, folder: Path, out: Path, progress: bool = True,
                   files: list[Path] | None = None) -> PredictionReport:
    """Colour map and overlay PNGs for every image under `folder` (sub-folders mirrored under `out`), or for
    `files` (from `folder_outputs`, which checks them); each image's two files are noted in out's manifest."""
    from tqdm import tqdm

    from rtda.datasets.io import read_image

    files = files if files is not None else folder_outputs(folder)[0]
    report = PredictionReport()
    start = time.perf_counter()
    for path in tqdm(files, desc="predicting", unit="image", disable=not progress, file=sys.stderr):
        try:
            rgb = displayed(read_image(path).permute(1, 2, 0).numpy(), path)
        except DatasetError as exc:
            report.skipped.append(f"{path.relative_to(folder)} ({str(exc).split(': ', 1)[-1]})")
            continue
        pred = predictor(rgb)
        stem = path.relative_to(folder).with_suffix("")
        (out / stem).parent.mkdir(parents=True, exist_ok=True)
        names = [_output_name(stem, kind) for kind in OUTPUT_KINDS]
        for name, array in zip(names, (colorize_hwc(pred), overlay(rgb, pred))):
            Image.fromarray(array).save(out / name)
            report.outputs.append(out / name)
        record_outputs(out, names)
        report.done += 1
    report.wall_s, report.model_s = time.perf_counter() - start, predictor.model_s
    return report


def _cv2():
    """The cv2 module, or a ConfigError saying how to install it."""
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
    target = out / video_output(path)
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
    record_outputs(out, [target.name])
    report.wall_s, report.model_s = time.perf_counter() - start, predictor.model_s
    return report


def video_output(path: Path) -> str:
    """The file name `predict_video` writes in --out for the video `path`."""
    return f"{path.stem}_overlay.mp4"


def is_video(path: Path) -> bool:
    """An existing file with a VIDEO_SUFFIXES suffix (any case)."""
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES
