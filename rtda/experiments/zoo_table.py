"""The synthetic per-network table: source-only, DACS and the oracle of every network of the zoo, one seed, against
each network's CPU latency (`benchmark.py zoo --json`), as a markdown table and an mIoU-latency plot.

Contract: the runs are the `configs/synthetic/{gta5_NET, gta5_NET_dacs, oracle_NET}.yaml` that exist, each a
`train.py` process through the adaptation table's queue (`train_runs`: finished runs are reused, an interrupted
one resumes); every network trains from scratch (the synthetic configs' `model.pretrained: none`), so no row has
weights another lacks. WORK_DIR/table.md and WORK_DIR/miou_latency.png are rewritten after every finished run.
"""
from __future__ import annotations

import json
from pathlib import Path

from rtda.experiments.common import SYNTHETIC, ExperimentError
from rtda.experiments.synthetic_table import check_work_dir, finished_runs, train_runs
from rtda.utils.files import atomic_write_text

NETWORKS = ("bisenet", "bisenetv2", "stdc1", "stdc2", "ddrnet23_slim", "ddrnet23", "pidnet_s", "pidnet_m")
ROWS = {"source-only": "gta5_{}", "DACS": "gta5_{}_dacs", "oracle": "oracle_{}"}


def zoo_runs(seed: int) -> list[tuple[str, int, list[str]]]:
    """(config name, seed, []) of every network whose three synthetic configs exist, network by network."""
    return [(row.format(net), seed, []) for net in NETWORKS
            if all((SYNTHETIC / f"{r.format(net)}.yaml").is_file() for r in ROWS.values()) for row in ROWS.values()]


def run_zoo_table(work_dir: Path, seed: int, overrides: list[str], latency_json: Path | None, jobs: int = 1,
                  threads: int | None = None) -> str:
    """Train what is missing of `zoo_runs(seed)` and return the table (also in WORK_DIR/table.md)."""
    latency = read_latency(latency_json)
    check_work_dir(work_dir, overrides)
    results = finished_runs(work_dir)

    def refresh():
        results.update(finished_runs(work_dir))
        write_outputs(work_dir, results, seed, latency)

    todo = [run for run in zoo_runs(seed) if run[:2] not in results]
    failed = train_runs(todo, overrides, work_dir, jobs, threads, refresh)
    refresh()
    if failed:
        raise RuntimeError("\n".join(failed))
    return (work_dir / "table.md").read_text()


def read_latency(path: Path | None) -> dict:
    """config name `cityscapes_NET` -> {"label", "form", "ms", "params_m"} from `benchmark.py zoo --json`
    (deploy form, else eager); {} without a file."""
    if path is None:
        return {}
    try:
        result = json.loads(Path(path).read_text())
        rows = {r["label"]: r for r in result["rows"]}
        out = {}
        for label, forms in result["latency"].items():
            form = "deploy" if "deploy" in forms else "eager"
            out[Path(rows[label]["config"]).stem] = {"label": label, "form": form, "ms": forms[form]["mean_ms"],
                                                     "params_m": rows[label]["params_m"],
                                                     "size": result["size"], "device": result["device"]}
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExperimentError(f"--latency {path}: not the JSON of `benchmark.py zoo --json` ({exc})") from None


def write_outputs(work_dir: Path, results: dict, seed: int, latency: dict) -> None:
    """table.md (one row per network with any finished run) and, with latencies, miou_latency.png."""
    lines = ["| Network | Params (M) | CPU latency (ms) | source-only | DACS | oracle | DACS vs source-only | "
             "of the gap | train time, 3 runs (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    points = []
    for net in NETWORKS:
        runs = {row: results.get((name.format(net), seed)) for row, name in ROWS.items()}
        if not any(runs.values()):
            continue
        miou = {row: m["final"]["mIoU"] if m else None for row, m in runs.items()}
        cells = [f"{v:.1f}" if v is not None else "" for v in miou.values()]
        base, dacs, oracle = miou["source-only"], miou["DACS"], miou["oracle"]
        gain = f"{dacs - base:+.1f}" if None not in (base, dacs) else ""
        share = f"{100 * (dacs - base) / (oracle - base):.0f}%" if None not in (base, dacs, oracle) and oracle > base \
            else ""
        speed = latency.get(f"cityscapes_{net}")
        label, params, ms = (speed["label"], f"{speed['params_m']:.2f}", f"{speed['ms']:.0f}") if speed \
            else (net, "", "")
        wall = sum(m["wall_time_s"] for m in runs.values() if m)
        lines.append(f"| {label} | {params} | {ms} | " + " | ".join(cells) + f" | {gain} | {share} | {wall:.0f} |")
        if speed:
            points.append((speed, miou))
    some = next(iter(latency.values()), None)
    note = (f"\nSYNTHETIC domains, seed {seed} only (one run per cell), every network from scratch. Latency: "
            f"{some['form']} form, batch 1, {some['size'][0]}x{some['size'][1]}, {some['device']} "
            "(`benchmark.py zoo`)." if some else f"\nSYNTHETIC domains, seed {seed} only, every network from scratch.")
    atomic_write_text(work_dir / "table.md", "\n".join(lines) + "\n" + note + "\n")
    if points:
        plot_points(points, work_dir / "miou_latency.png")


def plot_points(points: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for row, marker in (("source-only", "o"), ("DACS", "s"), ("oracle", "^")):
        xs = [s["ms"] for s, m in points if m[row] is not None]
        ys = [m[row] for s, m in points if m[row] is not None]
        ax.scatter(xs, ys, marker=marker, label=row)
    for speed, miou in points:
        top = max(v for v in miou.values() if v is not None)
        ax.annotate(speed["label"], (speed["ms"], top), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"CPU latency (ms, {points[0][0]['form']} form, batch 1)")
    ax.set_ylabel("mIoU on the synthetic target (%)")
    ax.set_title("SYNTHETIC domains, one seed: mIoU vs CPU latency", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
