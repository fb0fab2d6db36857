"""The mIoU-FPS plot of finished runs."""
from __future__ import annotations

from pathlib import Path

from rtda.bench.common import model_label
from rtda.bench.tables import (
    Run,
    Stat,
    augment_label,
    benchmark_json_for,
    distinguish,
    group_runs,
    method_label,
    result_metrics,
    source_domain,
)


def plot_miou_fps(runs: list[Run], path: str | Path, metric: str = "final", problems: list[str] | None = None,
                  form: str = "eager") -> int:
    """mIoU against FPS, one labelled marker per config (mean over seeds); real and synthetic data in
    separate panels. FPS comes from benchmark.json (any run with the same model): its `form` entry (eager,
    deploy, onnxruntime, ... or `fastest`: the fastest form that file timed), named in each marker's label
    and on the axis. Returns the markers drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = problems if problems is not None else []
    drawn, labels, devices = [], [], set()
    for group in group_runs(runs):
        cfg = group[0].cfg
        bench = benchmark_json_for(cfg.model, group + runs)
        latency = (bench or {}).get("latency", {})
        used = latency.get("fastest", "eager") if form == "fastest" else form
        timed = latency.get(used)
        if not isinstance(timed, dict) or "fps" not in timed:
            why = "no benchmark.json" if bench is None else f"its benchmark.json has no {used!r} form (rerun " \
                  f"benchmark.py with --forms {used})"
            problems.append(f"{group[0].path}: not plotted, {why} for model {model_label(cfg.model)}")
            continue
        devices.add(bench.get("device_name", "?"))
        label = model_label(cfg.model)
        if source_domain(cfg) == "gta5":
            label += f" · {method_label(cfg)}" + (f" · {augment_label(cfg)}" if augment_label(cfg) != "none" else "")
        else:
            label += " · trained on Cityscapes"
        drawn.append((group, timed["fps"]))
        labels.append(f"{label} [{used}]")
    points = {False: [], True: []}
    for (group, fps), label, suffix in zip(drawn, labels, distinguish(labels, [g for g, _ in drawn])):
        points[group[0].synthetic].append((fps, Stat.of(result_metrics(r, metric)["mIoU"] for r in group), label + suffix))
    panels = [kind for kind in (False, True) if points[kind]]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6.5 * max(len(panels), 1), 4.8), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        for fps, miou, label in points[kind]:
            ax.errorbar(fps, miou.mean, yerr=miou.std or 0.0, fmt="o", capsize=3)
            ax.annotate(label, (fps, miou.mean), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xlabel("FPS (batch 1; the form in [brackets], fastest timed)" if form == "fastest"
                      else f"FPS (batch 1, {form} form)")
        ax.set_ylabel(f"mIoU (%, {metric})")
        ax.set_title("synthetic data" if kind else "real data")
        ax.grid(alpha=0.3)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no run with a benchmark.json", ha="center", va="center")
    if devices:
        fig.suptitle("mIoU vs speed on " + ", ".join(sorted(devices)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return sum(len(p) for p in points.values())

