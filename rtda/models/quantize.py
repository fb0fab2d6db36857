"""The INT8 form of an exported model: static post-training quantisation in ONNX Runtime, and its parity.

    python -m rtda.models.export --config C --checkpoint best.pt --out model_int8.onnx --int8 \
        [--calibration 300] [--parity-images 50] [--min-agreement 0.97] [--max-miou-drop 2.0] [--force]

The float file (`export_onnx`, fixed shape: batch 1 at the config's `data.val.size`) is quantised by
`onnxruntime.quantization.quantize_static`: QDQ format, per-channel int8 weights, int8 activations (S8S8: ONNX
Runtime's default for QDQ and the first choice its quantisation guide names; on x86 without VNNI, U8S8 kernels can
saturate, S8S8 does not), activation ranges by MinMax calibration (the default: exact ranges of the calibration
images, no histograms, which for Entropy/Percentile take many times the memory at 512x1024). ONNX Runtime's
pre-processing (`quant_pre_process`: shape inference, graph optimisation) runs first, as its guide asks.

Images: the config's val split as evaluation reads it (`data.val`, resized to its size). The LAST
`--parity-images` (default 50) are held out for parity; calibration takes the first `--calibration` (default
300) of the others, clamped to what exists (a note says so). Parity on the held-out images: argmax agreement of
the INT8 file with the float file over all pixels, and the mIoU of both on the labels (mean over the classes
present, as `rtda.evaluation.metrics` scores). The file is written only when the agreement is >= 97% and the INT8
mIoU is at most 2.0 points below the float one (`--min-agreement`, `--max-miou-drop`), unless `--force`.

The result is one self-contained file (weights inline) replaced atomically; its metadata_props add `precision:
int8`, the quantisation, `calibration_images`, `calibration_method`, `calibration_split`, the parity numbers,
and keep the float file's (`checkpoint`: the source checkpoint, model, classes, input convention).
"""
from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from rtda.models.export import ExportError, OnnxModel, require
from rtda.utils.files import atomic_write

DEFAULT_CALIBRATION = 300
DEFAULT_PARITY_IMAGES = 50
MIN_AGREEMENT = 0.97  # argmax agreement of INT8 with float on the held-out val images
MAX_MIOU_DROP = 2.0  # mIoU points the INT8 file may lose against the float file on them
CALIBRATION_METHOD = "MinMax"
QUANTISATION = "static post-training, QDQ, per-channel int8 weights, int8 activations (S8S8)"


def quantize_file(float_path: str | Path, out: str | Path, images, metadata: dict | None = None) -> dict:
    """Quantise the float ONNX file `float_path` into `out` (one self-contained file, written atomically),
    calibrated on `images` (an iterable of float32 numpy arrays [1, 3, H, W], raw RGB 0-255).

    Returns {"calibration_images": n, "bytes": size}. `metadata` (str -> str) is added to the file's metadata_props.
    """
    onnx = require("onnx", "INT8 quantisation")
    require("onnxruntime", "INT8 quantisation")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name):
            self.name, self.iterator, self.count = name, iter(images), 0

        def get_next(self):
            image = next(self.iterator, None)
            if image is None:
                return None
            self.count += 1
            return {self.name: np.ascontiguousarray(image, dtype=np.float32)}

    out = Path(out)
    input_name = onnx.load(str(float_path), load_external_data=False).graph.input[0].name
    reader = Reader(input_name)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=out.parent) as tmp:
        prepared, quantised = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantised), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHOD),
                        calibration_providers=["CPUExecutionProvider"])
        if reader.count == 0:
            raise ExportError("INT8 quantisation needs at least one calibration image, got none")
        model = onnx.load(str(quantised))
        props = {p.key: p.value for p in model.metadata_props}
        props.update({"precision": "int8", "quantization": QUANTISATION, "calibration_images": reader.count,
                      "calibration_method": CALIBRATION_METHOD, **(metadata or {})})
        del model.metadata_props[:]
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
        serialized = io.BytesIO()
        onnx.save_model(model, serialized, save_as_external_data=False)
        atomic_write(out, lambda handle: handle.write(serialized.getvalue()))
    return {"calibration_images": reader.count, "bytes": out.stat().st_size}


def split_val(total: int, calibration: int, parity_images: int) -> tuple[range, range, str | None]:
    """(calibration indices, held-out parity indices, a note when calibration was clamped) for a val set of `total`."""
    if calibration < 1:
        raise ExportError(f"--calibration {calibration}: expected at least 1 image")
    if parity_images < 1:
        raise ExportError(f"--parity-images {parity_images}: expected at least 1 image")
    if parity_images >= total:
        raise ExportError(f"--parity-images {parity_images}: the val split has {total} images and calibration "
                          f"needs at least one of its own; expected at most {total - 1}")
    held_out = range(total - parity_images, total)
    used = min(calibration, total - parity_images)
    note = (f"note: --calibration {calibration} clamped to {used}, the val images not held out for parity "
            f"({total} - {parity_images})") if used < calibration else None
    return range(used), held_out, note


def val_parity(float_model: OnnxModel, int8_model: OnnxModel, dataset, indices) -> dict:
    """Argmax agreement of `int8_model` with `float_model` over every pixel of `dataset[i]` for i in `indices`,
    and the mIoU (percent) of each on the labels (255 ignored)."""
    classes = float_model.num_classes or 19
    confusion = {"float": torch.zeros(classes, classes, dtype=torch.int64),
                 "int8": torch.zeros(classes, classes, dtype=torch.int64)}
    agree = pixels = 0
    for i in indices:
        item = dataset[i]
        image, label = item["image"][None].float(), item["label"].long()
        preds = {}
        for name, model in (("float", float_model), ("int8", int8_model)):
            logits = model(image)
            if logits.shape[-2:] != label.shape[-2:]:  # eval.label_size full: score at the label's size
                logits = torch.nn.functional.interpolate(logits, size=label.shape[-2:], mode="bilinear",
                                                         align_corners=model.align_corners)
            preds[name] = logits.argmax(1)[0]
            valid = label != 255
            confusion[name] += torch.bincount(label[valid] * classes + preds[name][valid],
                                              minlength=classes**2).view(classes, classes)
        agree += int((preds["float"] == preds["int8"]).sum())
        pixels += preds["float"].numel()
    return {"argmax_agreement": agree / max(pixels, 1), "images": len(indices),
            "miou_float": _miou(confusion["float"]), "miou_int8": _miou(confusion["int8"])}


def _miou(confusion: torch.Tensor) -> float:
    """mIoU in percent over the classes present (rtda.evaluation.metrics' rule; that layer sits above models)."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    return float(100 * (tp[present] / union[present]).mean()) if present.any() else math.nan


def export_int8(float_path: Path, out: Path, cfg, args, metadata: dict) -> None:
    """The `--int8` step of the export CLI: calibrate on the val split, check parity, write `out` (or refuse)."""
    from rtda.datasets import build_dataset

    dataset = build_dataset(cfg.data.val, cfg, "val")
    calibration, held_out, note = split_val(len(dataset), args.calibration, args.parity_images)
    if note:
        print(note)
    images = (dataset[i]["image"][None].float().numpy() for i in calibration)
    split = f"{cfg.data.val.name} {cfg.data.val.root} split {cfg.data.val.split}"
    staged = out.with_name(f".{out.name}.int8")
    try:
        info = quantize_file(float_path, staged, images, {**metadata, "calibration_split": split,
                                                           "calibration_indices": f"0-{len(calibration) - 1}"})
        result = val_parity(OnnxModel(float_path), OnnxModel(staged), dataset, held_out)
        print(f"INT8 ({QUANTISATION}; {CALIBRATION_METHOD} calibration on {info['calibration_images']} val "
              f"images): on {result['images']} held-out val images argmax agreement with float "
              f"{100 * result['argmax_agreement']:.2f}%, mIoU float {result['miou_float']:.2f} / "
              f"int8 {result['miou_int8']:.2f}")
        drop = result["miou_float"] - result["miou_int8"]
        if (result["argmax_agreement"] < args.min_agreement or drop > args.max_miou_drop) and not args.force:
            raise ExportError(f"{out}: not written, INT8 agrees with float on {100 * result['argmax_agreement']:.2f}% "
                              f"of the held-out pixels (need >= {100 * args.min_agreement:.2f}%) and loses "
                              f"{drop:.2f} mIoU points (allowed {args.max_miou_drop:.2f}); --force writes it anyway")
        os.replace(staged, out)
    finally:
        if staged.exists():
            staged.unlink()
    print(f"wrote {out} ({info['bytes'] / 2**20:.1f} MiB, INT8, one self-contained file)")
