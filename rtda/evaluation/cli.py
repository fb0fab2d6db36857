"""`python eval.py`: score checkpoints on a config's validation set, every snapshot of a run, or predict on
your own images and videos. The flags, printed lines and exit codes (0 done, 1 one-line error, 2 usage) are
the command's contract.

    python eval.py --config CONFIG --checkpoint best.pt [--out DIR] [section.key=value ...]
    python eval.py --config CONFIG --checkpoint A.pt B.pt [--each]      # an ensemble (mean softmax), or a column each
    python eval.py --config CONFIG --checkpoint best.pt --save-predictions DIR --format labelids
    python eval.py --run-dir runs/gta5_bisenet/<time>                   # every snapshot: the mIoU curve
    python eval.py --config CONFIG --checkpoint best.pt|model.onnx --images DIR|VIDEO --out DIR
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from rtda.config import Config, ConfigError, load_config
from rtda.datasets.io import DatasetError
from rtda.datasets.labels import CLASS_NAMES
from rtda.datasets.loaders import val_loader
from rtda.evaluation.inference import Inference, evaluate, load_models
from rtda.evaluation.metrics import iou_table, metrics_from_confusion, save_confusion_plot
from rtda.evaluation.predict import (
    VIDEO_SUFFIXES,
    Predictor,
    folder_outputs,
    is_video,
    predict_folder,
    predict_video,
    video_output,
)
from rtda.evaluation.snapshots import run_checkpoints, score_run, snapshot_table
from rtda.evaluation.visual import PREDICTION_FORMATS, prediction_image
from rtda.models.export import ExportError
from rtda.utils.distributed import close_distributed, init_distributed
from rtda.utils.files import (
    CheckpointError,
    OverwriteError,
    atomic_write_text,
    check_overwrite,
    os_error_line,
    output_folder_problem,
    record_outputs,
)

OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")  # section.key=value


def parse_args(argv=None) -> argparse.Namespace:
    """eval.py's arguments, checked: one usage error (exit 2) for a flag combination that cannot work.

    `--checkpoint` takes every word up to the next flag, trailing `section.key=value` overrides included;
    those are moved back to `overrides` (before any given elsewhere), so `--checkpoint A B key=v` works.
    """
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
    parser.add_argument("--overwrite", action="store_true", help="--out, --save-predictions: replace files this "
                        "project did not write (files an earlier eval.py wrote there are replaced without it)")
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
    if args.images and Path(args.images).is_dir() and _inside(Path(args.out), Path(args.images)):
        # the outputs would be read back as inputs by the next run (and could replace an input)
        parser.error(f"--out {args.out} is inside --images {args.images}: choose an --out outside the image folder")
    return args


def _inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or below it (symlinks resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def main(argv=None) -> int:
    """Run eval.py with `argv` (default sys.argv[1:]): 0 when done, 1 after a one-line `error:` on stderr (or
    when --run-dir scored nothing), 2 for a usage error (SystemExit from argparse)."""
    args = parse_args(argv)
    try:
        if args.run_dir:
            run_checkpoints(args.run_dir)  # a missing folder or one without checkpoints: before anything is built
        cfg = load_config(args.config, args.overrides)
        inference = Inference.from_config(cfg.eval)
        if args.images:
            return _main_predict(args, cfg, inference)
        return _main_score(args, cfg, inference)
    except (ConfigError, DatasetError, FileNotFoundError, CheckpointError, ExportError, OverwriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk or an output folder made read-only while predicting
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("eval.py: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    finally:
        close_distributed()


def _main_score(args, cfg: Config, inference: Inference) -> int:
    """Score on the config's validation set, sharded across processes: --run-dir's snapshots or --checkpoint."""
    if args.each and args.save_predictions:
        raise ConfigError("--save-predictions needs one model (or one ensemble); drop --each")
    dist = init_distributed()
    from rtda.datasets import build_dataset

    val_set = build_dataset(cfg.data.val, cfg, "val")
    loader = val_loader(val_set, cfg, dist)
    header = (f"{cfg.name}: {len(val_set)} validation images, labels at "
              f"{'their original size' if cfg.eval.label_size == 'full' else 'the configured size'}; "
              f"{inference.describe()}")
    if args.run_dir:
        return _main_run_dir(args, cfg, loader, dist, inference, header)
    return _main_checkpoints(args, cfg, loader, dist, inference, header)


def _main_checkpoints(args, cfg: Config, loader, dist, inference: Inference, header: str) -> int:
    """One column per --checkpoint with --each, else one for their ensemble; the table printed (and --out)."""
    groups = [[c] for c in args.checkpoint] if args.each else [args.checkpoint]
    names = [run_name(g[0]) if len(g) == 1 else f"ensemble of {len(g)}" for g in groups]
    if args.out:  # before the first model is loaded; on every rank, so that all of them stop
        check_overwrite(args.out, ["iou_table.txt", "metrics.json", *_confusion_files(names).values()],
                        args.overwrite)
    if args.save_predictions:
        check_overwrite(args.save_predictions, [f"{name}.png" for name in loader.dataset.names], args.overwrite)
    on_batch = _prediction_writer(Path(args.save_predictions), args.format) if args.save_predictions else None
    columns, confusions = {}, {}
    for group, name in zip(groups, names):
        models = load_models(cfg, group, dist.device)
        confusion = evaluate(models, loader, dist.device, cfg.model.num_classes, on_batch=on_batch,
                             inference=inference)
        columns[name], confusions[name] = metrics_from_confusion(confusion), confusion
    if dist.is_main:
        print(header)
        table = iou_table(columns)
        print(table)
        if args.save_predictions:
            print(f"predictions ({args.format}) in {args.save_predictions}")
        if args.out:
            _write_scores(Path(args.out), cfg, header, table, columns, confusions, inference)
    return 0


def _prediction_writer(out: Path, fmt: str):
    """An `evaluate` on_batch callback writing `out/<name>.png` in `fmt` per image; `out` is made now."""
    out.mkdir(parents=True, exist_ok=True)

    def on_batch(batch, pred):
        for name, image, p in zip(batch["name"], batch["image"], pred):
            prediction_image(p, image, fmt).save(out / f"{name}.png")
        record_outputs(out, [f"{name}.png" for name in batch["name"]])  # a later run may replace them

    return on_batch


def run_name(checkpoint: str) -> str:
    """A column name: `runs/gta5_bisenet/20260101-120000/best.pt` -> `gta5_bisenet/best`."""
    path = Path(checkpoint)
    return f"{path.parent.parent.name}/{path.stem}" if path.parent.parent.name else path.stem


def _confusion_files(names: list[str]) -> dict[str, str]:
    """column name -> its confusion-matrix PNG's file name in --out."""
    if len(names) == 1:
        return {names[0]: "confusion.png"}
    return {name: f"confusion_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.png" for name in names}


def _write_scores(out: Path, cfg: Config, header: str, table: str, columns: dict, confusions: dict,
                  inference: Inference) -> None:
    """iou_table.txt, metrics.json and one row-normalised confusion-matrix PNG per column, in `out`, each noted
    in out/.rtda-outputs.jsonl (a later eval.py may replace them)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "iou_table.txt", header + "\n" + table + "\n")
    plots = {}
    for name, confusion in confusions.items():
        file = _confusion_files(list(confusions))[name]
        miou = columns[name]["mIoU"]
        save_confusion_plot(confusion, out / file, title=f"{name} on {cfg.name} val: mIoU "
                            f"{'-' if miou is None else f'{miou:.2f}'} (rows normalised, %)")
        plots[name] = file
    atomic_write_text(out / "metrics.json", json.dumps(
        {"config_name": cfg.name, "label_size": cfg.eval.label_size, "inference": inference.describe(),
         "classes": list(CLASS_NAMES), "columns": columns, "confusion_plots": plots,
         "confusion": {name: c.cpu().tolist() for name, c in confusions.items()}}, indent=1))
    record_outputs(out, ["iou_table.txt", "metrics.json", *plots.values()])
    print(f"wrote {out / 'iou_table.txt'}, {out / 'metrics.json'} and {', '.join(str(out / f) for f in plots.values())}")


def _main_run_dir(args, cfg: Config, loader, dist, inference: Inference, header: str) -> int:
    """Score every snapshot of --run-dir; the table printed, the curve in RUN/snapshot_miou.json (written
    whole or not at all). 1 when no snapshot could be scored."""
    run_dir = Path(args.run_dir)
    result = score_run(cfg, run_dir, loader, dist.device, inference,
                       log=lambda line: print(line, file=sys.stderr) if dist.is_main else None)
    if dist.is_main:
        print(header)
        print(snapshot_table(result))
        target = run_dir / "snapshot_miou.json"
        payload = {"config_name": cfg.name, "label_size": cfg.eval.label_size, "inference": inference.describe(),
                   "classes": list(CLASS_NAMES), **result}
        atomic_write_text(target, json.dumps(payload, indent=1))
        best = result["best"]
        if best is not None:
            print(f"best: iteration {best['iteration']} ({best['checkpoint']}), mIoU {best['mIoU']:.2f}; "
                  f"curve written to {target}")
    return 0 if result["snapshots"] else 1


def _main_predict(args, cfg: Config, inference: Inference) -> int:
    """--images: colour maps and overlays for a folder, or an overlaid video, in --out (one process)."""
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
    # every output name checked before a model is loaded: no clash between inputs, no file the project did not write
    files, outputs = folder_outputs(source) if source.is_dir() else (None, [video_output(source)])
    check_overwrite(out, outputs, args.overwrite)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = load_models(cfg, args.checkpoint, device)
    predictor = Predictor(models, device, input_size, inference)
    size_text = "each image's own size" if input_size is None else f"{input_size[0]}x{input_size[1]}"
    print(f"{', '.join(map(str, args.checkpoint))} on {source} at {size_text} ({inference.describe()}), "
          f"device {device}", file=sys.stderr)
    if source.is_dir():
        report = predict_folder(predictor, source, out, not args.no_progress, files)
        print(report.summary("images"))
        print(f"colour maps (*_color.png) and overlays (*_overlay.png) in {out}")
    else:
        report = predict_video(predictor, source, out, not args.no_progress)
        print(report.summary("frames"))
        print(f"overlaid video: {report.outputs[0]}")
    return 0
