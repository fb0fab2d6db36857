"""Scoring every snapshot of a run folder: the mIoU curve of `eval.py --run-dir`.

A run folder holds `snapshots/iter_NNNNNNN.pt` (written with `train.keep_every`) and `last.pt`; each is
scored on the same loader, in iteration order.
"""
from __future__ import annotations

from pathlib import Path

import torch

from rtda import runs
from rtda.config import Config
from rtda.evaluation.inference import Inference, evaluate, load_model
from rtda.evaluation.metrics import metrics_from_confusion
from rtda.utils.files import CheckpointError


def run_checkpoints(run_dir: str | Path) -> list[tuple[int | None, Path]]:
    """`RUN/snapshots/iter_NNNNNNN.pt` (iteration from the name) in iteration order, then `RUN/last.pt`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    found: list[tuple[int | None, Path]] = list(runs.snapshots(run_dir))
    if (run_dir / runs.LAST).is_file():
        found.append((None, run_dir / runs.LAST))  # its iteration is read from the file
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
    """`score_run`'s result as a text table: iteration, checkpoint (with `(= other)` for a file at the same iteration), mIoU,
    the best row marked `<- best`."""
    lines = [f"{'iteration':>10}  {'checkpoint':<28}{'mIoU':>8}"]
    for r in result["snapshots"]:
        it = "?" if r["iteration"] is None else str(r["iteration"])
        name = r["checkpoint"] + (f" (= {r['also']})" if r.get("also") else "")
        miou = "-" if r["mIoU"] is None else f"{r['mIoU']:.2f}"
        mark = "  <- best" if r is result["best"] else ""
        lines.append(f"{it:>10}  {name:<28}{miou:>8}{mark}")
    return "\n".join(lines)
