"""Finished run folders -> the thesis tables (Markdown or CSV).

Contract: tables read `metrics.json` from run folders; latency is a property of the machine, so it only comes
from a `benchmark.json` (the `model --json` output) left in a run folder, never measured while tabulating.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rtda.bench.common import BenchmarkError, model_label, without_pretrained
from rtda.bench.model_cost import complexity_from_config
from rtda.config import AUGMENTATIONS, NOT_RESULT_KEYS, Config, ConfigError, flatten, from_dict

TABLES = ("cityscapes", "domain-shift", "augmentations", "adaptation")
FLOPS_NOTE = ("FLOPs: G MACs (multiply-adds, the convention of the course's reference numbers) counted by "
              "torch.utils.flop_counter.FlopCounterMode (its GFLOPs / 2), and by fvcore as a cross-check where it imports")


@dataclass
class Run:
    path: Path
    metrics: dict
    cfg: Config
    benchmark: dict | None  # RUN/benchmark.json, when one was left there
    resume_changes: list[dict] = field(default_factory=list)  # RUN/resume_log.jsonl: changes applied on resume
    duplicates: list[Path] = field(default_factory=list)  # older runs of its config and seed, not counted (group_runs)

    @property
    def synthetic(self) -> bool:
        names = {self.cfg.data.source.name, self.cfg.data.val.name}
        return bool(self.metrics.get("synthetic")) or "synthetic" in names


@dataclass
class Stat:
    """A number over seeds: mean, sample std, count (None when no run has it)."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values) -> Stat:
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return cls(None, None, 0)
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        return cls(float(np.mean(vals)), std, len(vals))


@dataclass
class Table:
    key: str  # one of TABLES
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)  # cells: str, int, float, Stat or None
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)


def find_runs(roots: list[str | Path]) -> tuple[list[Run], list[str]]:
    """Every run folder under `roots` (a folder holding metrics.json or config.yaml), and one line per problem."""
    runs, problems = [], []
    for root in map(Path, roots):
        if not root.is_dir():
            problems.append(f"{root}: not a directory")
            continue
        folders = {p.parent for name in ("metrics.json", "config.yaml") for p in root.rglob(name)}
        if not folders:
            problems.append(f"{root}: no run folders (folders with metrics.json) found")
        for folder in sorted(folders):
            try:
                runs.append(load_run(folder))
            except BenchmarkError as exc:
                problems.append(str(exc))
    return runs, problems


def load_run(folder: Path) -> Run:
    path = folder / "metrics.json"
    if not path.is_file():
        raise BenchmarkError(f"{folder}: no metrics.json (unfinished run?), skipped")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchmarkError(f"{path}: not readable JSON ({exc}), skipped") from None
    if not isinstance(metrics, dict):
        raise BenchmarkError(f"{path}: expected a JSON object, skipped")
    for keys in (("config",), ("classes",), ("final", "mIoU"), ("final", "IoU")):
        node = metrics
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                raise BenchmarkError(f"{path}: missing key `{'.'.join(keys)}` (schema: docs/architecture.md), skipped")
            node = node[k]
    try:
        cfg = from_dict(metrics["config"], source=f"{path}: config")
    except ConfigError as exc:
        raise BenchmarkError(f"{exc}, skipped") from None
    bench = None
    bench_path = folder / "benchmark.json"
    if bench_path.is_file():
        try:
            bench = json.loads(bench_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchmarkError(f"{bench_path}: not readable JSON ({exc}); delete or regenerate it") from None
    changes = []
    log_path = folder / "resume_log.jsonl"
    if log_path.is_file():
        try:
            changes = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchmarkError(f"{log_path}: not readable JSON lines ({exc}), skipped") from None
    return Run(folder, metrics, cfg, bench, changes)


def _resume_notes(groups: list[list[Run]]) -> list[str]:
    """One note per run whose recipe changed on a resume (`--apply-changes`): its row is not one recipe."""
    notes = []
    for run in (r for g in groups for r in g if r.resume_changes):
        applied = "; ".join(f"iteration {e['iteration']}: " + ", ".join(f"{k} {v[0]!r} -> {v[1]!r}"
                                                                       for k, v in e["changes"].items())
                            for e in run.resume_changes)
        notes.append(f"{run.path} was resumed with changes ({applied})")
    return notes


def _duplicate_notes(groups: list[list[Run]]) -> list[str]:
    """One note per seed that ran more than once in a row's config: which run counts, which are left out."""
    return [f"seed {run.cfg.seed} of one configuration ran {len(run.duplicates) + 1} times: {run.path} (the newest) "
            f"counts, not {', '.join(map(str, run.duplicates))}" for g in groups for run in g if run.duplicates]


def source_domain(cfg: Config) -> str:
    """What the model was trained on: `cityscapes` or `gta5` (a synthetic domain counts as the one it mimics)."""
    src = cfg.data.source
    if src.name == "synthetic":
        return "cityscapes" if src.domain == "target" else "gta5"
    return src.name


def augment_label(cfg: Config) -> str:
    on = [f"{name} {getattr(cfg.data.augment, name):g}" for name in AUGMENTATIONS
          if getattr(cfg.data.augment, name) > 0]
    return " + ".join(on) or "none"


def method_label(cfg: Config) -> str:
    from rtda.adapt import STRATEGIES
    return STRATEGIES[cfg.adapt.name].label(cfg.adapt)


def tables_of(run: Run) -> list[str]:
    """The tables a run belongs in, from its config (never from its folder name)."""
    domain, adapt = source_domain(run.cfg), run.cfg.adapt.name
    augmented = augment_label(run.cfg) != "none"
    if domain == "cityscapes":
        return ["cityscapes"] if adapt == "none" else []
    if adapt != "none":
        return ["adaptation"]
    # The un-augmented source-only run is table 3 and the baseline row of table 4.
    return ["augmentations"] if augmented else ["domain-shift", "augmentations"]


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs of the same config (up to the seed and bookkeeping keys) and data kind, in first-seen order, with one
    run per seed: a seed run twice is one sample, not two, so of the runs of one config and seed only the newest
    (metrics.json written last) counts and lists the others in its `duplicates` (named in a note by the tables)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        flat = flatten(dataclasses.asdict(run.cfg))
        key = json.dumps({k: v for k, v in flat.items() if k not in NOT_RESULT_KEYS} | {"_synthetic": run.synthetic},
                         sort_keys=True)
        groups.setdefault(key, []).append(run)
    return [_one_run_per_seed(group) for group in groups.values()]


def _one_run_per_seed(group: list[Run]) -> list[Run]:
    """The newest run of each seed of a group, seeds in first-seen order; each keeps the older ones' paths."""
    by_seed: dict[int, list[Run]] = {}
    for run in group:
        by_seed.setdefault(run.cfg.seed, []).append(run)
    kept = []
    for same in by_seed.values():
        *older, newest = sorted(same, key=_finished_at)
        newest.duplicates = [run.path for run in older]
        kept.append(newest)
    return kept


def _finished_at(run: Run) -> tuple[int, str]:
    """When a run's metrics.json was written (its modification time; the path breaks ties)."""
    try:
        return (run.path / "metrics.json").stat().st_mtime_ns, str(run.path)
    except OSError:
        return 0, str(run.path)


def distinguish(labels: list[str], groups: list[list[Run]]) -> list[str]:
    """A suffix naming the differing config keys for rows that would otherwise look the same ("" if unique)."""
    suffixes = [""] * len(labels)
    for label in set(labels):
        same = [i for i, lab in enumerate(labels) if lab == label]
        if len(same) < 2:
            continue
        flats = [flatten(dataclasses.asdict(groups[i][0].cfg)) for i in same]
        differ = [k for k in flats[0] if k not in NOT_RESULT_KEYS and len({json.dumps(f.get(k)) for f in flats}) > 1]
        for i, flat in zip(same, flats):
            suffixes[i] = " [" + ", ".join(f"{k.rsplit('.', 1)[-1]}={flat[k]}" for k in differ[:3]) + "]"
    return suffixes


def result_metrics(run: Run, which: str) -> dict:
    """`which` (final or best) metrics of a run; runs without a best entry give their final ones."""
    return run.metrics.get(which) or run.metrics["final"]


def benchmark_json_for(model_cfg, runs: list[Run]) -> dict | None:
    """The benchmark.json of any run whose model section equals `model_cfg` (weights aside): speed is a
    property of the model and the machine, not of how the weights were trained."""
    model = dataclasses.asdict(without_pretrained(model_cfg))
    return next((r.benchmark for r in runs
                 if r.benchmark and r.benchmark.get("model", {}) | {"pretrained": "none"} == model), None)


def complexity_for(group: list[Run], all_runs: list[Run], cache: dict, problems: list[str]) -> dict | None:
    """Params/FLOPs/latency for a row: a benchmark.json of a run with the same model, else params and
    FLOPs computed from the model config at the thesis size (latency then stays empty)."""
    found = benchmark_json_for(group[0].cfg.model, group + all_runs)
    if found is not None:
        return found
    key = json.dumps(dataclasses.asdict(without_pretrained(group[0].cfg.model)), sort_keys=True)
    if key not in cache:
        try:
            cache[key] = complexity_from_config(group[0].cfg.model, source=str(group[0].path / "metrics.json"))
        except BenchmarkError as exc:
            problems.append(f"{exc}; params and FLOPs left empty")
            cache[key] = None
    return cache[key]


def build_tables(runs: list[Run], which: str = "all", metric: str = "final",
                 problems: list[str] | None = None) -> list[Table]:
    """The thesis tables (1-5) over `runs`, real and synthetic data in separate tables."""
    problems = problems if problems is not None else []
    wanted = TABLES if which == "all" else (which,)
    classes = next((r.metrics["classes"] for r in runs), [])
    usable = []
    for run in runs:
        if run.metrics["classes"] != classes:
            problems.append(f"{run.path}: classes differ from the other runs' ({len(run.metrics['classes'])} vs "
                            f"{len(classes)}), skipped")
        else:
            usable.append(run)
    cache: dict = {}
    tables = []
    for synthetic in (False, True):
        kind_runs = [r for r in usable if r.synthetic == synthetic]
        for key in wanted:
            groups = group_runs([r for r in kind_runs if key in tables_of(r)])
            if not groups:
                continue
            if key == "cityscapes":
                for title, model_groups in _complexity_groups(groups):
                    tables.append(_complexity_table(key, title, model_groups, usable, cache, metric, synthetic,
                                                    problems))
                    tables[-1].notes += _resume_notes(model_groups) + _duplicate_notes(model_groups)
            else:
                tables.append(_class_table(key, groups, classes, metric, synthetic))
                tables[-1].notes += _resume_notes(groups) + _duplicate_notes(groups)
    return tables


def _complexity_groups(groups: list[list[Run]]) -> list[tuple[str, list[list[Run]]]]:
    """The Cityscapes tables: 1 DeepLabV2, 2 BiSeNet (the course's), 2b every other (real-time) network."""
    by_name = {name: [g for g in groups if g[0].cfg.model.name == name] for name in ("deeplabv2", "bisenet")}
    others = [g for g in groups if g[0].cfg.model.name not in by_name]
    titled = [("Table 1: DeepLabV2", by_name["deeplabv2"]), ("Table 2: BiSeNet", by_name["bisenet"]),
              ("Table 2b: real-time networks", others)]
    return [(f"{title} on Cityscapes", found) for title, found in titled if found]


def _data_note(synthetic: bool) -> str:
    return " — SYNTHETIC data, not comparable with real-data numbers" if synthetic else ""


def _flop_cells(flops: dict) -> tuple[float | None, float | None]:
    """(FlopCounterMode G MACs, fvcore G MACs); a benchmark.json written before FlopCounterMode holds fvcore's."""
    if "flops" not in flops:
        return None, flops.get("gmacs")
    return flops["gmacs"], (flops.get("fvcore") or {}).get("gmacs")


def _complexity_table(key, title, groups, all_runs, cache, metric, synthetic, problems) -> Table:
    table = Table(key, f"{title}{_data_note(synthetic)}",
                  ["Model", "Seeds", "mIoU", "Latency (ms)", "FPS", "FLOPs (G MACs, FlopCounterMode)",
                   "FLOPs (G MACs, fvcore)", "Params (M)", "Input"],
                  synthetic=synthetic)
    labels = [model_label(g[0].cfg.model) for g in groups]
    labels = [label + suffix for label, suffix in zip(labels, distinguish(labels, groups))]
    devices = set()
    for label, group in zip(labels, groups):
        info = complexity_for(group, all_runs, cache, problems) or {}
        eager = info.get("latency", {}).get("eager")
        if eager:
            devices.add(f"{info.get('device_name')} ({info.get('threads')} threads, torch {info.get('torch')})")
        params = info.get("params", {}).get("inference")
        size = info.get("size")
        table.rows.append([label, len(group), Stat.of(result_metrics(r, metric)["mIoU"] for r in group),
                           eager["mean_ms"] if eager else None, eager["fps"] if eager else None,
                           *_flop_cells(info.get("flops", {})),
                           params / 1e6 if params else None,
                           f"{size[0]}x{size[1]}" if size else None])
    table.notes.append(FLOPS_NOTE)
    table.notes.append("Latency: batch 1, eager model, from benchmark.json on " + "; ".join(sorted(devices))
                       if devices else "Latency: no benchmark.json in these runs (see docs/benchmarks.md)")
    return table


_CLASS_TABLE_TITLES = {
    "domain-shift": "Table 3: GTA5 → Cityscapes, source only",
    "augmentations": "Table 4: GTA5 → Cityscapes with augmentations",
    "adaptation": "Table 5: GTA5 → Cityscapes, domain adaptation",
}


def _class_table(key, groups, classes, metric, synthetic) -> Table:
    first = {"domain-shift": ["Model"], "augmentations": ["Model", "Augmentation"],
             "adaptation": ["Model", "Method", "Augmentation"]}[key]
    table = Table(key, _CLASS_TABLE_TITLES[key] + _data_note(synthetic), first + ["Seeds", "mIoU"] + list(classes),
                  synthetic=synthetic)
    if key == "augmentations":  # the baseline first
        groups = sorted(groups, key=lambda g: augment_label(g[0].cfg) != "none")
    names = [[model_label(g[0].cfg.model), method_label(g[0].cfg), augment_label(g[0].cfg)] for g in groups]
    names = [{"domain-shift": n[:1], "augmentations": [n[0], n[2]], "adaptation": n}[key] for n in names]
    suffixes = distinguish([" | ".join(n) for n in names], groups)
    for name, suffix, group in zip(names, suffixes, groups):
        results = [result_metrics(r, metric) for r in group]
        table.rows.append([name[0] + suffix] + name[1:] + [len(group), Stat.of(m["mIoU"] for m in results)]
                          + [Stat.of(m["IoU"].get(c) for m in results) for c in classes])
    table.notes.append(f"IoU in %, `{metric}` metrics; mean ± sample std over seeds; — = class never present")
    return table


def _cell_text(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, Stat):
        if value.mean is None:
            return "—"
        return f"{value.mean:.1f} ± {value.std:.1f}" if value.std is not None else f"{value.mean:.1f}"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_markdown(tables: list[Table]) -> str:
    out = []
    for t in tables:
        out += [f"### {t.title}", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
        out += ["| " + " | ".join(_cell_text(c) for c in row) + " |" for row in t.rows]
        out += [""] + [f"{note}." for note in t.notes] + [""]
    return "\n".join(out)


def format_csv(tables: list[Table]) -> str:
    """One block per table (blank line between): `table`, `data` columns, then a mean and a std column per Stat."""
    buf = io.StringIO()
    for i, t in enumerate(tables):
        if i:
            buf.write("\n")
        writer = csv.writer(buf, lineterminator="\n")
        header, stat_cols = ["table", "data"], set()
        for j, name in enumerate(t.columns):
            if any(isinstance(row[j], Stat) for row in t.rows):
                header += [name, f"{name} std"]
                stat_cols.add(j)
            else:
                header.append(name)
        writer.writerow(header)
        for row in t.rows:
            cells = [t.key, "synthetic" if t.synthetic else "real"]
            for j, value in enumerate(row):
                if j in stat_cols:
                    cells += [_csv_number(value.mean), _csv_number(value.std)]
                else:
                    cells.append(_csv_number(value) if isinstance(value, float) else ("" if value is None else value))
            writer.writerow(cells)
    return buf.getvalue()


def _csv_number(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}" if abs(x) < 1 else f"{x:.2f}"

