"""The synthetic adaptation table: every method against source-only and the oracle, over seeds.

Contract: each run is its own `train.py` process (a small subprocess queue); finished runs (metrics.json) are
reused and an interrupted one resumes from its last.pt; the table is written to WORK_DIR/table.md after every
finished run. The work dir is stamped with the synthetic generator's version and the learning overrides, and a
work dir of another version or other overrides is refused.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from rtda.config import NOT_RESULT_KEYS, load_config
from rtda.experiments.common import REPO_ROOT, SYNTHETIC, ExperimentError
from rtda.runs import METRICS, interrupted_run, read_metrics, write_metrics
from rtda.utils.files import atomic_write_text, file_sha256

# Runs of one seed in the order they train: the two references, one of each method, then the variants.
# (FDA beta 0.09 is the one that fits 128x64: a band of floor(64 * 0.09) = 5 pixels; 0.01 swaps nothing there.)
BENCHMARK_CONFIGS = ("gta5_bisenet", "oracle_bisenet", "gta5_bisenet_fda_b0.09", "gta5_bisenet_dacs",
                     "gta5_bisenet_minent", "gta5_bisenet_adv", "gta5_bisenet_daformer_dacs", "gta5_bisenet_mic",
                     "gta5_bisenet_advent", "gta5_bisenet_adv_multi", "gta5_bisenet_fda_b0.01", "gta5_bisenet_fda_b0.05")
MBT = "FDA multi-band (mean softmax of the 3 betas)"
TABLE_ROWS = ("gta5_bisenet", "oracle_bisenet", "gta5_bisenet_adv", "gta5_bisenet_adv_multi", "gta5_bisenet_fda_b0.01",
              "gta5_bisenet_fda_b0.05", "gta5_bisenet_fda_b0.09", MBT, "gta5_bisenet_fda_ssl", "gta5_bisenet_dacs",
              "gta5_bisenet_minent", "gta5_bisenet_advent", "gta5_bisenet_daformer_dacs", "gta5_bisenet_mic")
FDA_BANDS = ("gta5_bisenet_fda_b0.01", "gta5_bisenet_fda_b0.05", "gta5_bisenet_fda_b0.09")


def run_adaptation_table(work_dir: Path, seeds: list[int], overrides: list[str], ssl: bool,
                         jobs: int = 1, threads: int | None = None) -> str:
    """Every synthetic method against source-only and the oracle: each run is a `train.py` process, `jobs` at a
    time with `threads` torch threads each, in seed order (all rows of seed 0 first, so a partial benchmark is
    already a comparison). Finished runs (metrics.json) are reused and an interrupted one carries on from its
    last.pt, so the command resumes where it stopped; a failed run is reported with its log once the others
    have finished. Returns the markdown table, also written to work_dir/table.md after every finished run (the
    docs quote that file; this runner never edits them)."""
    from torch.utils.data import DataLoader

    from rtda.adapt.pseudo_labels import write_pseudo_labels
    from rtda.datasets import build_dataset
    from rtda.evaluation import evaluate, load_models, metrics_from_confusion
    from rtda.utils.distributed import init_distributed

    check_work_dir(work_dir, overrides)
    results = finished_runs(work_dir)

    def refresh():
        results.update(finished_runs(work_dir))
        write_table(work_dir, results)

    todo = [(name, seed, []) for seed in seeds for name in BENCHMARK_CONFIGS if (name, seed) not in results]
    failed = train_runs(todo, overrides, work_dir, jobs, threads, refresh)
    ssl_runs = []
    for seed in seeds:
        if any((name, seed) not in results for name in FDA_BANDS):
            continue  # a band failed: reported below
        checkpoints = [str(results[name, seed]["run_dir"] / "last.pt") for name in FDA_BANDS]
        if (MBT, seed) not in results:  # multi-band transfer: score the three FDA models' mean softmax
            cfg = load_config(SYNTHETIC / "gta5_bisenet_fda_b0.09.yaml", [f"seed={seed}", *overrides])
            device = init_distributed().device
            loader = DataLoader(build_dataset(cfg.data.val, cfg, "val"), batch_size=cfg.eval.batch_size)
            confusion = evaluate(load_models(cfg, checkpoints, device), loader, device, cfg.model.num_classes)
            metrics = {"final": metrics_from_confusion(confusion), "seed": seed, "wall_time_s": 0.0}
            mbt_dir = work_dir / "fda_mbt" / f"seed{seed}"
            mbt_dir.mkdir(parents=True, exist_ok=True)
            write_metrics(mbt_dir, {**metrics, "config_name": MBT})
        if ssl and ("gta5_bisenet_fda_ssl", seed) not in results:  # FDA's self-supervised round on MBT labels
            cfg = load_config(SYNTHETIC / "gta5_bisenet_fda_ssl.yaml", [f"seed={seed}", *overrides])
            labels = write_pseudo_labels(cfg, checkpoints, work_dir / "pseudo_labels" / f"seed{seed}")
            ssl_runs.append(("gta5_bisenet_fda_ssl", seed, [f"data.target.pseudo_labels={labels}"]))
    refresh()  # the multi-band rows; each SSL run refreshes again as it ends
    failed += train_runs(ssl_runs, overrides, work_dir, jobs, threads, refresh)
    if failed:
        raise RuntimeError("\n".join(failed))
    return (work_dir / "table.md").read_text()


def check_work_dir(work_dir: Path, overrides: list[str]) -> None:
    """Refuse a work dir whose runs trained on another version of the synthetic domains, or with other config
    overrides (say another model.pretrained): they would be reused as if they were this call's. A new work dir is
    stamped (generator.json) with the version and the overrides that change what a run learns."""
    from rtda.datasets.synthetic import GENERATOR_VERSION, version_name

    stamp = work_dir / "generator.json"
    wanted = sorted(o for o in overrides if o.split("=", 1)[0] not in NOT_RESULT_KEYS)
    wanted += [f"{key}:sha256={file_sha256(Path(value))}" for key, value in (o.split("=", 1) for o in wanted)
               if key == "model.pretrained" and Path(value).is_file()]  # another file under the same name
    if stamp.is_file():
        recorded = json.loads(stamp.read_text())
        found = recorded.get("generator")
    elif any(work_dir.glob("*/*/config.yaml")):
        recorded, found = {}, None  # runs from before the version was recorded
    else:
        work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, json.dumps({"generator": GENERATOR_VERSION, "overrides": wanted}) + "\n")
        return
    if found != GENERATOR_VERSION:
        raise ExperimentError(f"--work-dir {work_dir}: its runs trained on synthetic domains of generator version "
                             f"{version_name(found)}, and this code generates version "
                             f"{GENERATOR_VERSION}; choose another --work-dir, or delete it (and the old data root, "
                             "which train.py refuses too) to retrain the table")
    if recorded.get("overrides", []) != wanted:
        had = " ".join(recorded.get("overrides", [])) or "none"
        raise ExperimentError(f"--work-dir {work_dir}: its runs trained with the overrides {had}, and this call "
                             f"asks for {' '.join(wanted) or 'none'}; choose another --work-dir for these (or "
                             "delete it to retrain the table)")


def train_runs(runs: list[tuple[str, int, list[str]]], overrides: list[str], work_dir: Path, jobs: int,
               threads: int | None, after_each) -> list[str]:
    """Train each (synthetic config name, seed, extra overrides) as its own `train.py` process, `jobs` at a
    time, each with `threads` torch threads (default: the cores shared out; on 2 cores two one-thread runs side
    by side beat one two-thread run after the other, docs/results/log.md), logging to
    work_dir/logs/NAME_seedN.log. Calls `after_each()` when a run ends; returns one line per failed run."""
    import subprocess

    jobs = max(1, jobs)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    logs = work_dir / "logs"
    pending, running, failed = list(runs), {}, []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, seed, extra = pending.pop(0)
                logs.mkdir(parents=True, exist_ok=True)
                log = logs / f"{name}_seed{seed}.log"
                command = [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(SYNTHETIC / f"{name}.yaml"),
                           f"seed={seed}", *overrides, *extra, "--work-dir", str(work_dir)]
                interrupted = interrupted_run(work_dir, name, seed)
                if interrupted is not None:  # a session that ended mid-run: carry on from its last checkpoint
                    command += ["--resume", str(interrupted)]
                print(f"benchmark: {'resuming' if interrupted else 'training'} {name} seed {seed} (log: {log})",
                      file=sys.stderr)
                with log.open("w") as out:
                    running[subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out,
                                             stderr=subprocess.STDOUT)] = (name, seed, log)
            time.sleep(1.0)  # runs take minutes: polling each second costs nothing
            for proc in [p for p in running if p.poll() is not None]:
                name, seed, log = running.pop(proc)
                if proc.returncode:
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
                    failed.append(f"{name} seed {seed} failed (exit {proc.returncode}): {tail[0]} [log: {log}]")
                after_each()
    except KeyboardInterrupt:  # the runs got the Ctrl-C too: let each save its checkpoint before stopping
        for proc in running:
            proc.wait()
        raise
    return failed


def finished_runs(work_dir: Path) -> dict:
    """(config name, seed) -> metrics.json (plus its run_dir) of every finished run under `work_dir`."""
    results = {}
    for path in sorted(work_dir.glob(f"**/{METRICS}")):
        m = {**read_metrics(path.parent), "run_dir": path.parent}
        results[m["config_name"], m["seed"]] = m
    return results


def write_table(work_dir: Path, results: dict) -> None:
    """Per row: mean ± sample std of the final mIoU over seeds, the gain over source-only, the share of the
    oracle - source-only gap that gain recovers, the seeds' values and the mean wall time of a run."""
    import statistics

    by_row = {row: sorted((seed, m) for (name, seed), m in results.items() if name == row) for row in TABLE_ROWS}
    means = {row: statistics.mean(m["final"]["mIoU"] for _, m in runs) for row, runs in by_row.items() if runs}
    base, oracle = means.get("gta5_bisenet"), means.get("oracle_bisenet")
    lines = ["| Run | Seeds | mIoU (mean ± std) | vs source-only | of the gap | per seed | train time per run (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in TABLE_ROWS:
        runs = by_row[row]
        if not runs:
            continue
        vals = [m["final"]["mIoU"] for _, m in runs]
        mean = means[row]
        std = f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
        gain = f"{mean - base:+.1f}" if base is not None and row != "gta5_bisenet" else ""
        share = (f"{100 * (mean - base) / (oracle - base):.0f}%" if base is not None and oracle is not None
                 and oracle > base and row not in ("gta5_bisenet", "oracle_bisenet") else "")
        wall = statistics.mean(m["wall_time_s"] for _, m in runs)  # 0 for the multi-band mean: no training
        lines.append(f"| {row} | {len(vals)} | {mean:.1f}{std} | {gain} | {share} | "
                     f"{', '.join(f'{v:.1f}' for v in vals)} | {f'{wall:.0f}' if wall else ''} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(work_dir / "table.md", text)

