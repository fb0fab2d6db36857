"""The run-folder format, in one place: where runs go, what their files are called, how to find them again.

    <work dir>/<config name>/<YYYYmmdd-HHMMSS>[-N]/    one training run (-N when two start in the same second)
        config.yaml          the resolved config (rewritten by a resume that applied changes)
        last.pt              everything a resume needs; written at intervals and on a stop
        best.pt              weights only, of the best validation so far
        snapshots/iter_NNNNNNN.pt   weights only, every train.keep_every iterations
        resume_log.jsonl     one line per resume that applied changes
        metrics.json         written when the run finishes: a run folder without it is unfinished
        events.out.tfevents.*   TensorBoard

Folder names sort in start order, so the newest run of a config is the last name in sorted order.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from rtda.utils.files import atomic_write_text

LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.json"
SNAPSHOTS = "snapshots"
SNAPSHOT_NAME = re.compile(r"^iter_(\d+)\.pt$")


def new_run_dir(work_dir: Path, name: str) -> Path:
    """Create and return a new, empty run folder `work_dir/name/<timestamp>` (suffixed -1, -2, ... when taken).

    Safe when several processes start runs of the same config within one second: `mkdir` decides who owns a name.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (work_dir / name).mkdir(parents=True, exist_ok=True)
    run_dir, n = work_dir / name / stamp, 1
    while True:  # two runs started within the same second, in this process or another: mkdir is the arbiter
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            run_dir, n = work_dir / name / f"{stamp}-{n}", n + 1


def snapshot_path(run_dir: Path, iteration: int) -> Path:
    """Where the weights kept at `iteration` go: `run_dir/snapshots/iter_NNNNNNN.pt` (the inverse of
    `snapshot_iteration`)."""
    return run_dir / SNAPSHOTS / f"iter_{iteration:07d}.pt"


def snapshot_iteration(path: Path) -> int | None:
    """The iteration in a snapshot file's name (`iter_0001000.pt` -> 1000); None for any other name."""
    match = SNAPSHOT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every snapshot file of a run, in iteration order; [] when it kept none."""
    folder = Path(run_dir) / SNAPSHOTS
    if not folder.is_dir():
        return []
    found = [(snapshot_iteration(path), path) for path in folder.iterdir()]
    return sorted((iteration, path) for iteration, path in found if iteration is not None and path.is_file())


def newest_unfinished_run(work_dir: Path, name: str) -> tuple[Path | None, str]:
    """What `--resume auto` continues: (the newest run's last.pt, "") when that run is unfinished and has one;
    otherwise (None, why not). Only the newest run of `name` is considered, never an older one."""
    runs = sorted((p for p in (work_dir / name).glob("*") if p.is_dir()), key=lambda p: p.name)
    if not runs:
        return None, f"no run of {name} in {work_dir}"
    if (runs[-1] / METRICS).exists():
        return None, (f"the newest run {runs[-1]} is finished (to extend it, name its last.pt and a larger "
                      f"train.iters with --apply-changes)")
    if not (runs[-1] / LAST).exists():
        return None, f"the newest run {runs[-1]} has no last.pt (it stopped before its first checkpoint)"
    return runs[-1] / LAST, ""


def interrupted_run(work_dir: Path, name: str, seed: int) -> Path | None:
    """The last.pt of the newest unfinished run of `name` whose config.yaml has this seed (older runs included);
    None when there is none."""
    import yaml

    for run in sorted((work_dir / name).glob(f"*/{LAST}"), key=lambda p: p.parent.name, reverse=True):
        config = run.parent / "config.yaml"
        finished = (run.parent / METRICS).exists()
        if not finished and config.is_file() and (yaml.safe_load(config.read_text()) or {}).get("seed") == seed:
            return run
    return None


def write_metrics(run_dir: Path, summary: dict) -> None:
    """Write `run_dir/metrics.json` (schema in docs/architecture.md); its presence marks the run finished."""
    atomic_write_text(run_dir / METRICS, json.dumps(summary, indent=2))


def read_metrics(run_dir: Path) -> dict:
    """The parsed `run_dir/metrics.json` (FileNotFoundError for an unfinished run)."""
    return json.loads((Path(run_dir) / METRICS).read_text())
