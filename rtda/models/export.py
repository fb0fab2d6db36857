"""One self-contained ONNX file of a trained model's deploy form, and a module that runs such files.

    python -m rtda.models.export --config configs/cityscapes_bisenet.yaml --checkpoint runs/.../best.pt \
        --out bisenet.onnx [--size 512x1024] [--dynamic] [--exporter auto|torchscript|dynamo] [--opset N]

    model = OnnxModel("bisenet.onnx")       # an nn.Module: raw 0-255 RGB [B, 3, H, W] in, logits out (torch)

The file holds the deploy form (`models.deploy`: no auxiliary heads, BN folded) with the input
normalisation inside, so it takes what the PyTorch models take: raw RGB pixels 0-255 as float32
`image [B, 3, H, W]`, and returns `logits [B, C, H, W]` at the input size. Without `--dynamic` the input
shape is fixed (batch 1, `--size`, default the config's `data.val.size`), which lets ONNX Runtime and
TensorRT plan for it; `--dynamic` leaves batch, height and width free. The weights are inside the file (no
side `.onnx.data` file); model, classes and input convention are in its metadata. An existing `--out` is
replaced only if an earlier export wrote it (`.rtda-outputs.jsonl` beside it) or with `--overwrite`.

Exporter: `auto` uses torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`): it needs no
`onnxscript` and behaves the same on torch 2.4 to 2.14; `dynamo` is the
torch.export-based exporter (torch >= 2.6, needs `onnxscript`), which `auto` falls back to when the
TorchScript exporter is missing or fails. Both give the same ONNX Runtime speed on BiSeNet-R18
(docs/benchmarks.md). After writing, the file is run in ONNX Runtime on a random image and compared with the
PyTorch model (eval mode); the export fails, writing nothing, if fewer than 99.9% of the argmax labels agree.

`--int8` writes the INT8 form instead: static post-training quantisation of that float file, calibrated on the
config's val split, with its parity to the float file on held-out val images (rtda/models/quantize.py).

`onnx` and `onnxruntime` (and `onnxscript` for the dynamo exporter) are optional extras: a missing one is a
one-line error naming the `pip install` that provides it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rtda.config import ConfigError, load_config
from rtda.models.grid import align_corners_of
from rtda.utils.files import (
    CheckpointError,
    OverwriteError,
    atomic_write,
    check_overwrite,
    os_error_line,
    record_outputs,
)

DEFAULT_OPSET = 17  # the TorchScript exporter's; ONNX Runtime >= 1.14 and TensorRT >= 8.6 run it
EXPORTERS = ("auto", "torchscript", "dynamo")
MIN_AGREEMENT = 0.999
INPUT_NAME, OUTPUT_NAME = "image", "logits"
_PIP = {"onnx": "onnx", "onnxruntime": "onnxruntime (or onnxruntime-gpu)", "onnxscript": "onnxscript"}


class ExportError(ValueError):
    """An export or an ONNX file that cannot do what was asked; the message is one line naming it."""


def require(module: str, purpose: str):
    """Import an optional extra, or fail with one line naming the pip install that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{purpose} needs the optional package `{module}`, which is not installed: "
                          f"pip install {_PIP.get(module, module)}") from None


def parse_size(text: str, what: str = "--size") -> tuple[int, int]:
    """'512x1024' -> (512, 1024), height first."""
    h, sep, w = text.lower().partition("x")
    if not (sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
        raise ExportError(f"{what} {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 512x1024")
    return int(h), int(w)


# ------------------------------------------------------------------------------------------ export
def export_onnx(deployed: nn.Module, path: str | Path, size: tuple[int, int], dynamic: bool = False,
                exporter: str = "auto", opset: int | None = None, metadata: dict | None = None) -> dict:
    """Write the deploy form `deployed` (from `models.deploy`) to `path` as one self-contained ONNX file.

    Returns {"exporter", "opset", "input_shape", "bytes"}. `metadata` (str -> str) goes into the file's
    metadata_props. The file at `path` is replaced only once the whole file has been written.
    """
    onnx = require("onnx", "ONNX export")
    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter {exporter!r}: expected one of {', '.join(EXPORTERS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = deployed.graph().eval() if hasattr(deployed, "graph") else deployed.eval()
    example = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) * 255
    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as tmp:
        tmp_file = Path(tmp) / "model.onnx"
        used = _run_exporter(graph, example, tmp_file, dynamic, exporter, opset)
        # one file: load (external data included, if an exporter wrote any) and save with every weight inline
        model = onnx.load(str(tmp_file))
        # align_corners: the grid evaluation resizes this file's logits on (OnnxModel.align_corners)
        for key, value in {**(metadata or {}), "align_corners": align_corners_of(deployed), "exporter": used,
                           "torch": torch.__version__}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
        try:
            onnx.checker.check_model(model)
        except Exception as exc:  # onnx raises its own ValidationError
            raise ExportError(f"{path}: the exported graph is not valid ONNX ({_first_line(exc)})") from None
        serialized = io.BytesIO()  # onnx reads a file handle's name as a path: hand it one without
        onnx.save_model(model, serialized, save_as_external_data=False)
        atomic_write(path, lambda handle: handle.write(serialized.getvalue()))
    opset_used = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return {"exporter": used, "opset": opset_used, "input_shape": shape, "bytes": path.stat().st_size}


def _run_exporter(graph: nn.Module, example: torch.Tensor, out: Path, dynamic: bool, exporter: str,
                  opset: int | None) -> str:
    """Run the chosen exporter (auto: TorchScript, then dynamo); returns a description of the one that worked."""
    errors = []
    for name in (("torchscript", "dynamo") if exporter == "auto" else (exporter,)):
        try:
            if name == "torchscript":
                _export_torchscript(graph, example, out, dynamic, opset or DEFAULT_OPSET)
                return "torchscript (torch.onnx.export, dynamo=False)"
            _export_dynamo(graph, example, out, dynamic, opset)
            return "dynamo (torch.onnx.export, dynamo=True)"
        except ExportError as exc:
            errors.append(str(exc))
        except Exception as exc:  # an exporter's failure: try the next one, report all
            errors.append(f"{name} exporter failed: {type(exc).__name__}: {_first_line(exc)}")
    raise ExportError("; ".join(errors))


def _export_torchscript(graph, example, out: Path, dynamic: bool, opset: int) -> None:
    kwargs = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset,
              "do_constant_folding": True}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:  # torch >= 2.5; 2.4 has only this exporter
        kwargs["dynamo"] = False
    if dynamic:
        axes = {0: "batch", 2: "height", 3: "width"}
        kwargs["dynamic_axes"] = {INPUT_NAME: axes, OUTPUT_NAME: axes}
    with warnings.catch_warnings():
        # the deprecation notice of this exporter, and tracer notes on the models' input checks
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(graph, (example,), str(out), **kwargs)


def _export_dynamo(graph, example, out: Path, dynamic: bool, opset: int | None) -> None:
    require("onnxscript", "the dynamo ONNX exporter")
    params = inspect.signature(torch.onnx.export).parameters
    if "dynamo" not in params or not hasattr(torch.export.Dim, "DYNAMIC"):
        raise ExportError(f"the dynamo ONNX exporter needs torch >= 2.6 (this is {torch.__version__}); "
                          "use --exporter torchscript")
    kwargs = {"dynamo": True, "input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    if "external_data" in params:
        kwargs["external_data"] = False
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic:
        free = torch.export.Dim.DYNAMIC
        kwargs["dynamic_shapes"] = {"images": {0: free, 2: free, 3: free}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), str(out), **kwargs)
    if not out.is_file() and program is not None:  # versions that return the program without saving it
        program.save(str(out))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------ running
class OnnxModel(nn.Module):
    """An ONNX file from `export_onnx` run in ONNX Runtime, called like the PyTorch models.

    `forward(images)`: raw 0-255 RGB `[B, 3, H, W]` (any dtype, any device) -> float32 logits `[B, C, H, W]` on
    the images' device. A file with a fixed input size accepts only that size (one clear `ExportError`
    otherwise); a fixed batch of 1 is fed image by image. `device` cuda picks ONNX Runtime's CUDA provider
    when it has one; `providers` overrides the choice.
    """

    def __init__(self, path: str | Path, device: torch.device | str | None = None, threads: int | None = None,
                 providers: list | None = None):
        super().__init__()
        ort = require("onnxruntime", f"running {path}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX file not found")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads:
            options.intra_op_num_threads = threads
        if providers is None:
            available = ort.get_available_providers()
            cuda = torch.device(device).type == "cuda" if device is not None else False
            providers = (["CUDAExecutionProvider"] if cuda and "CUDAExecutionProvider" in available else []) \
                + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:
            raise ExportError(f"{self.path}: not a model ONNX Runtime can load ({_first_line(exc)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        if len(inputs) != 1 or len(shape) != 4 or shape[1] != 3 or "float" not in inputs[0].type:
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise ExportError(f"{self.path}: expected one float input [B, 3, H, W] of RGB pixels "
                              f"(a file from `python -m rtda.models.export`), found {found}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        fixed = [d if isinstance(d, int) else None for d in shape]
        self.fixed_batch = fixed[0]
        self.fixed_size = (fixed[2], fixed[3]) if fixed[2] and fixed[3] else None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        classes = self.metadata.get("num_classes") or outputs[0].shape[1]
        self.num_classes = int(classes) if str(classes).isdigit() else None
        # the model's resize grid (align_corners_of); files exported before the option had False
        self.align_corners = self.metadata.get("align_corners") == "True"
        self.providers = self.session.get_providers()

    def check_size(self, height: int, width: int) -> None:
        if self.fixed_size and (height, width) != self.fixed_size:
            fh, fw = self.fixed_size
            raise ExportError(f"{self.path}: this ONNX file takes {fh}x{fw} images (exported without --dynamic) "
                              f"but is given {height}x{width}; export again with `--size {height}x{width}` or "
                              f"`--dynamic`, or feed it {fh}x{fw} images")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] of raw RGB pixels, got shape {tuple(images.shape)}")
        self.check_size(*images.shape[-2:])
        x = images.detach().float().cpu().contiguous().numpy()
        if self.fixed_batch is not None and self.fixed_batch != len(x):
            if self.fixed_batch != 1:
                raise ExportError(f"{self.path}: this ONNX file takes batches of exactly {self.fixed_batch}, "
                                  f"given {len(x)}")
            out = np.concatenate([self.run_numpy(x[i : i + 1]) for i in range(len(x))])
        else:
            out = self.run_numpy(x)
        return torch.from_numpy(out).to(images.device)

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        """The raw session call: float32 NCHW numpy in, logits numpy out (no checks, no copies)."""
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def train(self, mode: bool = True):
        return super().train(False)  # an ONNX graph is inference only

    def extra_repr(self) -> str:
        size = "x".join(map(str, self.fixed_size)) if self.fixed_size else "dynamic"
        return f"{self.path}, input {size}, providers {self.providers}"


def is_onnx_file(path: str | Path) -> bool:
    return str(path).lower().endswith(".onnx")


def parity(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """How closely `candidate` logits follow `reference`: max abs difference and argmax agreement (0-1)."""
    reference, candidate = reference.float().cpu(), candidate.float().cpu()
    if reference.shape != candidate.shape:
        raise ExportError(f"outputs differ in shape: {list(candidate.shape)} vs {list(reference.shape)}")
    agreement = (reference.argmax(1) == candidate.argmax(1)).double().mean().item()
    return {"max_abs_diff": float((reference - candidate).abs().max()), "argmax_agreement": agreement}


# ------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rtda.models.export", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the config the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, help="best.pt, last.pt, a snapshot or a state dict")
    parser.add_argument("--out", required=True, help="the ONNX file to write, e.g. model.onnx")
    parser.add_argument("--size", help="HEIGHTxWIDTH of the input (default: the config's data.val.size)")
    parser.add_argument("--dynamic", action="store_true", help="leave batch, height and width free")
    parser.add_argument("--exporter", default="auto", choices=EXPORTERS,
                        help="auto (TorchScript, falling back to dynamo), torchscript or dynamo")
    parser.add_argument("--opset", type=int, help=f"ONNX opset (default {DEFAULT_OPSET}; dynamo: its own)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if this project did not "
                        "write it (a file an earlier export wrote is replaced without it)")
    parser.add_argument("--int8", action="store_true", help="quantise to INT8 (static, QDQ) calibrated on the val "
                        "split, and write that file instead (rtda/models/quantize.py)")
    parser.add_argument("--calibration", type=int, default=300, help="--int8: val images to calibrate on "
                        "(default 300, clamped to the val images not held out)")
    parser.add_argument("--parity-images", type=int, default=50, help="--int8: the last N val images, held out "
                        "for the parity check (default 50)")
    parser.add_argument("--min-agreement", type=float, default=0.97, help="--int8: least argmax agreement with "
                        "the float model on the held-out images (default 0.97)")
    parser.add_argument("--max-miou-drop", type=float, default=2.0, help="--int8: most mIoU points INT8 may lose "
                        "against float on them (default 2.0)")
    parser.add_argument("--force", action="store_true", help="--int8: write the file even below those thresholds")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _export_cli(args)
    except (ConfigError, ExportError, FileNotFoundError, CheckpointError, OverwriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # --out under a file, in a read-only folder, or a full disk (its staged file is removed)
        print(f"error: --out {args.out}: {os_error_line(exc)}", file=sys.stderr)
        return 1


def _export_cli(args) -> int:
    from rtda.models import backbone_name, build_untrained, deploy, load_trained_weights

    out = Path(args.out)
    check_overwrite(out.parent, [out.name], args.overwrite)  # before anything is built or written
    cfg = load_config(args.config, args.overrides)
    width, height = cfg.data.val.size
    size = parse_size(args.size) if args.size else (height, width)
    if args.opset is not None and args.opset < 7:
        raise ExportError(f"--opset {args.opset}: expected an ONNX opset >= 7 (e.g. {DEFAULT_OPSET})")
    require("onnxruntime", "the parity check of the export")
    if args.int8:
        _check_int8_args(args, size, (height, width))
    model = build_untrained(cfg.model)  # the checkpoint has every weight
    checkpoint = load_trained_weights(model, args.checkpoint, cfg.model)
    model.eval()
    metadata = {"model": f"{cfg.model.name}/{backbone_name(cfg.model)}", "num_classes": cfg.model.num_classes,
                "labels": "Cityscapes train ids 0-18" if cfg.model.num_classes == 19 else "train ids",
                "config_name": checkpoint.get("config_name") or cfg.name,
                "iteration": checkpoint.get("iteration", ""), "checkpoint": Path(args.checkpoint).name,
                "input": f"{INPUT_NAME}: float32 [B, 3, H, W], raw RGB pixels 0-255 (normalised inside)",
                "output": f"{OUTPUT_NAME}: float32 [B, {cfg.model.num_classes}, H, W] at the input size"}
    staged = out.with_name(f".{out.name}.checking")
    try:
        info = export_onnx(deploy(model), staged, size, args.dynamic, args.exporter, args.opset, metadata)
        checks = [(1, *size)] + ([(2, max(32, size[0] // 2 + 7), max(32, size[1] // 2 + 5))] if args.dynamic else [])
        onnx_model = OnnxModel(staged)
        results = []
        for shape in checks:
            image = torch.rand(*shape[:1], 3, *shape[1:], generator=torch.Generator().manual_seed(1)) * 255
            with torch.no_grad():
                reference = model(image)
            results.append((shape, parity(reference, onnx_model(image)), float(reference.abs().max())))
        del onnx_model
        shape_text = ", ".join(str(d) for d in info["input_shape"])
        print(f"exporter: {info['exporter']}, opset {info['opset']}; input {INPUT_NAME} float32 [{shape_text}] "
              f"raw RGB 0-255, output {OUTPUT_NAME} [B, {cfg.model.num_classes}, H, W]")
        worst = min(r["argmax_agreement"] for _, r, _ in results)
        for (b, h, w), r, largest in results:
            print(f"parity vs PyTorch (eval mode) on a random {b}x3x{h}x{w} image: max abs diff "
                  f"{r['max_abs_diff']:.2e} (largest |logit| {largest:.3g}), argmax agreement "
                  f"{100 * r['argmax_agreement']:.3f}%")
        if worst < MIN_AGREEMENT:
            raise ExportError(f"{out}: not written, ONNX Runtime's argmax agrees with PyTorch on only "
                              f"{100 * worst:.3f}% of the pixels (need >= {100 * MIN_AGREEMENT:.1f}%)")
        if args.int8:  # the float file is only the quantiser's input
            from rtda.models.quantize import export_int8

            export_int8(staged, out, cfg, args, metadata)
            record_outputs(out.parent, [out.name])
            return 0
        os.replace(staged, out)
        record_outputs(out.parent, [out.name])  # a later export may replace it without --overwrite
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
    print(f"wrote {out} ({info['bytes'] / 2**20:.1f} MiB, one self-contained file)")
    return 0


def _check_int8_args(args, size: tuple[int, int], val_size: tuple[int, int]) -> None:
    """--int8 calibrates and checks on val images as evaluation reads them: one fixed shape, data.val.size."""
    if args.dynamic:
        raise ExportError("--int8 with --dynamic: the INT8 file is calibrated at one fixed shape; drop --dynamic")
    if size != val_size:
        raise ExportError(f"--int8 --size {size[0]}x{size[1]}: INT8 calibrates on the val images at data.val.size "
                          f"({val_size[0]}x{val_size[1]}); drop --size or set data.val.size=[{size[1]},{size[0]}]")
    if not 0 <= args.min_agreement <= 1:
        raise ExportError(f"--min-agreement {args.min_agreement}: expected a fraction in [0, 1], e.g. 0.97")
    if args.max_miou_drop < 0:
        raise ExportError(f"--max-miou-drop {args.max_miou_drop}: expected mIoU points >= 0, e.g. 2.0")


if __name__ == "__main__":
    sys.exit(main())
