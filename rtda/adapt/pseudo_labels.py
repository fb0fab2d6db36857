"""FDA's pseudo-labels for its self-supervised round: per-class confidence thresholds over the target train set,
from the mean softmax of one or more checkpoints (multi-band transfer).

    python -m rtda.adapt.pseudo_labels --config CONFIG --checkpoint CKPT [CKPT ...] --out DIR [key=value ...]

Reads `adapt.pseudo_percentile` and `adapt.pseudo_cap` (declared by the FDA strategy, which trains on the
result through `data.target.pseudo_labels`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rtda.config import Config, ConfigError, load_config
from rtda.datasets.labels import IGNORE_INDEX
from rtda.utils.distributed import Distributed
from rtda.utils.files import os_error_line, output_folder_problem

OLD_COMMAND = "pseudo-labels"  # `python adapt.py pseudo-labels ...`, the spelling before rtda/


def confidence_histogram(pred: torch.Tensor, confidence: torch.Tensor, num_classes: int, bins: int) -> torch.Tensor:
    """Counts [num_classes, bins] of the confidences of the pixels predicted as each class (one bincount)."""
    bin_index = (confidence * bins).long().clamp_(max=bins - 1)
    return torch.bincount((pred * bins + bin_index).reshape(-1), minlength=num_classes * bins).view(num_classes, bins)


def class_thresholds(histogram: torch.Tensor, percentile: float, cap: float) -> torch.Tensor:
    """Per class: the confidence at `percentile` of its pixels (FDA: sorted[round(n * 0.66)]), capped at `cap`.

    From the histogram the threshold is the lower edge of the bin holding that pixel, so at most one bin's
    width (1 / bins) below the exact value; a class never predicted gets 0, as in FDA's getSudoLabel_multi.py.
    """
    bins = histogram.shape[1]
    total = histogram.sum(1)
    rank = torch.round(total.double() * percentile).clamp(max=(total - 1).clamp(min=0).double())
    bin_of_rank = (histogram.cumsum(1) <= rank[:, None]).sum(1)  # first bin whose cumulative count exceeds rank
    threshold = bin_of_rank.double() / bins
    return torch.where(total > 0, threshold.clamp(max=cap), torch.zeros_like(threshold))


def apply_thresholds(pred: torch.Tensor, confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Pseudo-labels: the prediction where its confidence reaches its class's threshold, 255 elsewhere."""
    keep = confidence >= thresholds.to(confidence.dtype)[pred]
    return torch.where(keep, pred, torch.full_like(pred, IGNORE_INDEX))


def write_pseudo_labels(cfg: Config, checkpoints: list[str], out: str | Path, bins: int = 10_000) -> Path:
    """FDA's pseudo-labels for the target train set from the mean softmax of `checkpoints` (multi-band transfer).

    Two passes over the target set: the first gathers per-class confidence histograms on the device, the second
    predicts again and writes `out/{city}/{stem}.png` (train ids, 255 = not kept), which
    `data.target.pseudo_labels: out` reads. Predicting twice avoids holding every confidence map in memory.
    Prints one summary line; returns `out`.
    """
    from PIL import Image

    from rtda.utils.distributed import init_distributed

    num_classes = cfg.model.num_classes
    device = init_distributed().device
    dataset, predictions = _target_predictions(cfg, checkpoints, device)
    histogram = torch.zeros(num_classes, bins, dtype=torch.int64, device=device)
    for _, pred, confidence in predictions():
        histogram += confidence_histogram(pred, confidence, num_classes, bins)
    thresholds = class_thresholds(histogram, cfg.adapt.pseudo_percentile, cfg.adapt.pseudo_cap)

    out = Path(out)
    kept = torch.zeros((), dtype=torch.int64, device=device)
    for names, pred, confidence in predictions():
        labels = apply_thresholds(pred, confidence, thresholds)
        kept += (labels != IGNORE_INDEX).sum()
        for name, label in zip(names, labels.to(torch.uint8).cpu().numpy()):
            city = name.rsplit("_", 2)[0]  # Cityscapes stems are {city}_{seq}_{frame}
            (out / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(label).save(out / city / f"{name}.png")
    share = 100 * float(kept) / max(1, int(histogram.sum()))
    print(f"pseudo-labels for {len(dataset)} target images in {out} ({share:.1f}% of pixels kept); "
          f"per-class thresholds: {', '.join(f'{t:.3f}' for t in thresholds.tolist())}")
    return out


def _target_predictions(cfg: Config, checkpoints: list[str], device: torch.device):
    """The target train set (images only) and a function that yields (names, prediction, confidence) per batch
    of it, from the mean softmax of `checkpoints`; each call predicts the whole set again."""
    import dataclasses

    from rtda.datasets import build_dataset
    from rtda.datasets.loaders import val_loader
    from rtda.evaluation import load_models, predict_probs

    images_only = dataclasses.replace(cfg.data.target, pseudo_labels=None)
    dataset = build_dataset(images_only, cfg, "target")
    loader = val_loader(dataset, cfg, Distributed(device=device))  # one process: every image, in order
    models = load_models(cfg, checkpoints, device)

    def predictions():
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            # float32 whatever train.amp says: bf16 logits (8-bit mantissa) would move confidences across the
            # per-class thresholds, which sit near the 0.9 cap. The logits are upsampled on the checkpoints' grid
            # (model.align_corners, which load_models builds them with), as FDA's getSudoLabel_multi.py does.
            confidence, pred = predict_probs(models, images, images.shape[-2:], amp_dtype=None).max(1)
            yield batch["name"], pred, confidence

    return dataset, predictions


def build_parser(old_spelling: bool) -> argparse.ArgumentParser:
    """The command's options. The old spelling keeps the usage line `adapt.py pseudo-labels ...`."""
    if old_spelling:
        parser = argparse.ArgumentParser(prog=f"{Path(sys.argv[0]).name} {OLD_COMMAND}")
    else:
        parser = argparse.ArgumentParser(prog="python -m rtda.adapt.pseudo_labels", description=(
            "FDA pseudo-labels for the target train set from the mean softmax of one or more checkpoints"))
    parser.add_argument("--config", required=True, help="YAML config (its data.target, model and adapt sections)")
    parser.add_argument("--checkpoint", required=True, nargs="+", help="checkpoints whose softmax is averaged")
    parser.add_argument("--out", required=True, help="folder for {city}/{stem}.png train-id pseudo-labels")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser


def main(argv=None) -> int:
    """Write the pseudo-labels; 0 on success, 1 with one `error: ...` line on stderr. A leading `pseudo-labels`
    argument (the old `adapt.py pseudo-labels` spelling) is accepted and dropped."""
    argv = list(sys.argv[1:] if argv is None else argv)
    old_spelling = argv[:1] == [OLD_COMMAND]
    args = build_parser(old_spelling).parse_args(argv[1:] if old_spelling else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        for path in args.checkpoint:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--checkpoint {path}: file not found")
        problem = output_folder_problem(Path(args.out))  # before the two passes over the target set
        if problem:
            raise ConfigError(f"--out {args.out}: {problem}")
        write_pseudo_labels(cfg, args.checkpoint, args.out)
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, or --out made read-only meanwhile
        print(f"error: --out {args.out}: {os_error_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
