"""benchmark.py: parameter and FLOP counts, the timing loop, training-step cost, tables, plot and CLI errors."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math

import pytest
import torch
from PIL import Image
from torch import nn

from rtda import bench as benchmark
from rtda import runs
from rtda.bench import common, latency, plot, train_cost
from rtda.bench import tables as tabulate
from rtda.config import from_dict, load_config, to_dict
from rtda.datasets.synthetic import GENERATOR_VERSION
from rtda.experiments import pretrain_backbone, synthetic_table
from rtda.experiments.common import ExperimentError
from rtda.models import complexity
from rtda.utils.files import file_sha256

CLASSES = ["road", "sidewalk", "building"]


# ------------------------------------------------------------------------------------------ counting
class TinySeg(nn.Module):
    """A frozen stem, a head, an aux head called only in training and a layer nothing calls."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # 3*8*9 + 8 = 224
        self.stem.requires_grad_(False)
        self.head = nn.Conv2d(8, 4, 1)  # 8*4 + 4 = 36
        self.aux = nn.Conv2d(8, 4, 1)  # 36, training only
        self.unused = nn.Linear(10, 10)  # 110, never called

    def forward(self, x):
        f = self.stem(x)
        out = self.head(f + f)  # the add is an op fvcore does not count
        return (out, self.aux(f)) if self.training else out


def test_count_parameters_separates_trainable_and_what_inference_uses():
    model = TinySeg().train()
    counts = complexity.count_parameters(model, torch.rand(1, 3, 8, 8))
    assert counts == {"total": 224 + 36 + 36 + 110, "trainable": 36 + 36 + 110, "inference": 224 + 36}
    assert model.training  # restored


def test_count_flops_counts_two_flops_per_multiply_add_and_cross_checks_fvcore():
    flops = complexity.count_flops(TinySeg(), torch.zeros(1, 3, 16, 16))
    macs = 3 * 8 * 9 * 16 * 16 + 8 * 4 * 16 * 16  # stem + head, one multiply-add each
    assert flops["flops"] == 2 * macs and flops["macs"] == macs
    assert flops["by_operator"] == {"convolution": 2 * macs}
    assert "FlopCounterMode" in flops["convention"] and "2 flops per multiply-add" in flops["convention"]
    fvcore = flops["fvcore"]  # the optional cross-check: the same MACs, and the ops fvcore could not count
    assert fvcore["macs"] == macs and fvcore["by_operator"] == {"conv": macs}
    assert any("add" in op for op in fvcore["skipped_ops"])


def test_without_fvcore_the_count_says_how_to_get_the_cross_check(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_fvcore(name, *args, **kwargs):
        if name.startswith("fvcore"):
            raise ImportError("No module named 'fvcore'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fvcore)
    flops = complexity.count_flops(TinySeg(), torch.zeros(1, 3, 16, 16))
    assert flops["fvcore"] is None and flops["macs"] > 0 and "pip install fvcore" in flops["fvcore_note"]
    from rtda.bench.model_cost import _print_fvcore

    _print_fvcore(flops)
    assert capsys.readouterr().out.strip().splitlines() == [flops["fvcore_note"]]


# ------------------------------------------------------------------------------------------ timing
def test_latency_stats_from_known_times():
    s = latency.latency_stats([0.1, 0.2, 0.3, 0.4])
    assert s["iters"] == 4 and s["mean_ms"] == pytest.approx(250.0) and s["min_ms"] == pytest.approx(100.0)
    assert s["std_ms"] == pytest.approx(129.0994, rel=1e-4)  # sample std
    assert s["p50_ms"] == pytest.approx(250.0) and s["p99_ms"] == pytest.approx(397.0)
    assert s["fps"] == pytest.approx(4.0)  # 1 / mean latency
    assert s["fps_mean"] == pytest.approx((10 + 5 + 10 / 3 + 2.5) / 4)  # the course's mean of per-call FPS


def test_time_calls_counts_every_call_and_times_each():
    calls = []
    times = latency.time_calls(lambda x: calls.append(x.shape), torch.zeros(1, 3, 4, 4), iters=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_measure_latency_alternates_eager_and_deploy_rounds():
    model = TinySeg()
    deployed = TinySeg().eval().to(memory_format=torch.channels_last)
    deployed.load_state_dict(model.state_dict())
    seen = []
    deployed.register_forward_pre_hook(lambda m, args: seen.append((torch.is_inference_mode_enabled(),
                                                                   args[0].is_contiguous(
                                                                       memory_format=torch.channels_last))))
    result = latency.measure_latency(model, deployed, (16, 32), torch.device("cpu"), iters=7, warmup=1)
    assert result["eager"]["iters"] == 7 and result["deploy"]["iters"] == 7
    # one parity call, one warm-up call, 7 timed calls
    assert len(seen) == 9 and all(inference and cl for inference, cl in seen)
    assert result["speedup"] == pytest.approx(result["eager"]["mean_ms"] / result["deploy"]["mean_ms"])
    assert result["parity"]["deploy"]["argmax_agreement"] == 1.0  # the same weights, another memory layout
    assert result["parity"]["deploy"]["max_abs_diff"] < 1e-4
    assert result["parity"]["eager"]["max_abs_diff"] == 0.0


def test_forms_are_timed_in_the_same_rounds_with_their_parity_to_eager():
    pytest.importorskip("onnxruntime")
    from rtda import models

    torch.manual_seed(0)
    model = models.build_model({"name": "bisenet"}).eval()
    forms = latency.parse_variants("deploy,onnxruntime,compile", torch.device("cpu"))
    assert forms == ["eager", "deploy", "onnxruntime", "compile"]
    calls = []
    original = latency.time_calls
    latency.time_calls = lambda fn, x, n, w=0: calls.append(n) or original(fn, x, n, w)
    try:  # torch.compile's `eager` backend: the same plumbing as inductor, without its minute of compiling
        result = latency.measure_latency(model, models.deploy(model), (32, 64), torch.device("cpu"), iters=4,
                                           warmup=0, forms=forms, compile_backend="eager")
    finally:
        latency.time_calls = original
    assert calls == [1] * 16  # 4 rounds, each form one call per round, in turn
    for name in forms:
        assert result[name]["iters"] == 4
        assert result["parity"][name]["argmax_agreement"] >= 0.999
        assert result["parity"][name]["max_abs_diff"] < 1e-3
    assert result["vs_deploy"]["deploy"] == 1.0 and result["fastest"] in forms
    assert result["vs_deploy"]["onnxruntime"] == pytest.approx(result["deploy"]["mean_ms"] /
                                                               result["onnxruntime"]["mean_ms"])


def test_forms_of_the_wrong_device_or_unknown_are_one_line():
    cpu = torch.device("cpu")
    assert latency.parse_variants(None, cpu) == ["eager", "deploy"]
    assert latency.parse_variants("all", cpu) == list(latency.CPU_VARIANTS)
    with pytest.raises(benchmark.BenchmarkError, match="'fp16' is a CUDA form"):
        latency.parse_variants("deploy,fp16", cpu)
    with pytest.raises(benchmark.BenchmarkError, match="unknown form 'tflite'"):
        latency.parse_variants("tflite", cpu)
    assert "tensorrt" in latency.parse_variants("all", torch.device("cuda"))


def test_tensorrt_form_without_its_provider_is_skipped_with_the_reason(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorRT")
    from rtda import models

    model = models.build_model({"name": "bisenet"}).eval()
    forms, skipped = latency.build_variants(model, None, ["eager", "tensorrt"], torch.rand(1, 3, 32, 64) * 255,
                                           workdir=tmp_path)
    assert list(forms) == ["eager"] and "TensorrtExecutionProvider" in skipped["tensorrt"]


def test_model_benchmark_end_to_end_json(tmp_path, capsys):
    path = tmp_path / "bisenet.yaml"
    path.write_text("model: {name: bisenet, backbone: resnet18}\n")
    rc = benchmark.main(["--config", str(path), "--size", "64x128", "--iters", "2", "--warmup", "0",
                         "--device", "cpu", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    p = r["params"]
    assert p["trainable"] == p["total"] > p["inference"] > p["deploy"]  # aux heads unused; BN folded
    assert r["flops"]["macs"] > 0 and r["flops"]["fvcore"]["skipped_ops"]
    assert r["size"] == [64, 128] and r["threads"] >= 1 and r["torch"] == torch.__version__
    assert r["latency"]["eager"]["iters"] == r["latency"]["deploy"]["iters"] == 2


def test_train_step_cost_with_a_target_domain_strategy():
    cfg = from_dict({"model": {"name": "bisenet"}, "adapt": {"name": "adversarial"}, "train": {"batch_size": 2}})
    r = train_cost.benchmark_train_step(cfg, torch.device("cpu"), iters=1, warmup=0, size=(32, 64))
    assert r["source_size"] == r["target_size"] == [32, 64] and r["batch_size"] == 2
    assert r["step_s"] > 0 and r["images_per_s"] == pytest.approx(2 / r["step_s"])
    assert r["peak_memory_bytes"] > 0 and r["amp"] == "none"  # CPU trains in float32


# ------------------------------------------------------------------------------------------ subcommands
OWN_OPTIONS = {"model": "--forms", "train-step": "untimed steps", "data": "--workers", "tables": "--plot-form",
               "gpu-check": "--tiny", "adaptation-table": "--seeds", "step-cost": "--rounds",
               "pretrain-synthetic": "FILE.pt"}


@pytest.mark.parametrize("name", list(OWN_OPTIONS))
def test_each_subcommand_help_lists_only_its_own_options(name, capsys):
    with pytest.raises(SystemExit) as stop:
        benchmark.main([name, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: benchmark.py {name}") and OWN_OPTIONS[name] in text
    assert not [option for other, option in OWN_OPTIONS.items() if other != name and option in text]


def test_top_level_help_lists_the_subcommands_and_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in OWN_OPTIONS) and "Exit codes" in text


def test_the_old_spelling_and_the_subcommand_print_the_same_tables(runs_dir, capsys):
    assert benchmark.main(["--runs", str(runs_dir), "--format", "csv", "--table", "domain-shift"]) == 0
    old = capsys.readouterr()
    assert benchmark.main(["tables", "--runs", str(runs_dir), "--format", "csv", "--table", "domain-shift"]) == 0
    new = capsys.readouterr()
    assert (new.out, new.err) == (old.out, old.err) and "domain-shift" in new.out


def test_model_subcommand_gives_the_model_report(tmp_path, capsys):
    path = tmp_path / "bisenet.yaml"
    path.write_text("model: {name: bisenet, backbone: resnet18}\n")
    assert benchmark.main(["model", "--config", str(path), "--size", "64x128", "--iters", "1", "--warmup", "0",
                           "--device", "cpu", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["size"] == [64, 128] and r["latency"]["eager"]["iters"] == 1
    assert benchmark.main(["model", "--config", str(path), "--size", "512by1024"]) == 2  # its errors: exit 2
    assert "512by1024" in capsys.readouterr().err


def test_options_of_another_subcommand_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        benchmark.main(["tables", "--runs", str(tmp_path), "--tiny"])
    assert stop.value.code == 2 and "--tiny" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("text", ["512", "512x", "x1024", "512*1024", "0x10", "-5x10", "a x b"])
def test_parse_size_rejects_what_is_not_hxw(text):
    with pytest.raises(benchmark.BenchmarkError, match="expected HEIGHTxWIDTH"):
        common.parse_size(text)
    assert common.parse_size("512x1024") == (512, 1024)


def test_unknown_model_and_bad_size_are_one_line_each(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: unet}\n")
    assert benchmark.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unet" in err and "bad.yaml" in err
    good = tmp_path / "good.yaml"
    good.write_text("model: {name: bisenet}\n")
    assert benchmark.main(["--config", str(good), "--size", "512by1024"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "512by1024" in err


# ------------------------------------------------------------------------------------------ tables
def write_run(root, folder, config: dict, seed: int, miou: float, ious: list, benchmark_json: dict | None = None):
    """A run folder as train.py leaves it: config.yaml and metrics.json (and optionally benchmark.json)."""
    cfg = to_dict(from_dict({**config, "seed": seed}))
    run = root / folder / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("# written by the test\n")
    iou = dict(zip(CLASSES, ious))
    synthetic = cfg["data"]["source"]["name"] == "synthetic"
    (run / "metrics.json").write_text(json.dumps({
        "config_name": cfg["name"], "synthetic": synthetic, "seed": seed, "model": cfg["model"]["name"],
        "backbone": cfg["model"]["backbone"], "adapt": cfg["adapt"]["name"], "iterations": 10, "wall_time_s": 1.0,
        "final": {"mIoU": miou, "IoU": iou}, "best": {"mIoU": miou + 1, "iteration": 5, "IoU": iou},
        "classes": CLASSES, "config": cfg}))
    if benchmark_json is not None:
        (run / "benchmark.json").write_text(json.dumps(benchmark_json))
    return run


GTA = {"data": {"source": {"name": "gta5"}}}


def fake_benchmark(model: dict, fps: float) -> dict:
    model_cfg = to_dict(from_dict({"model": model}))["model"]
    return {"model": model_cfg, "size": [512, 1024], "device_name": "Test GPU", "threads": 4, "torch": "2.11",
            "params": {"inference": 12_054_042}, "flops": {"gmacs": 25.59},
            "latency": {"eager": {"mean_ms": 1000 / fps, "fps": fps}}}


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    # table 3: two seeds of the same config collapse into one row
    write_run(root, "gta5_bisenet", {**GTA, "name": "gta5_bisenet"}, 0, 30.0, [80.0, 20.0, None])
    write_run(root, "gta5_bisenet", {**GTA, "name": "gta5_bisenet"}, 1, 34.0, [84.0, 30.0, None])
    # table 4: an augmentation setting; its folder name claims something else (rows come from the config)
    write_run(root, "cityscapes_oops", {"data": {"source": {"name": "gta5"}, "augment": {"hflip": 0.5}}},
              0, 33.0, [82.0, 25.0, 10.0])
    # table 5: FDA, and two adversarial runs that differ in the learning rate only
    write_run(root, "fda", {**GTA, "adapt": {"name": "fda", "beta": 0.05}}, 0, 31.0, [81.0, 21.0, 5.0])
    write_run(root, "adv_a", {**GTA, "adapt": {"name": "adversarial"}, "train": {"lr": 0.01}}, 0, 32.0, [1, 2, 3])
    write_run(root, "adv_b", {**GTA, "adapt": {"name": "adversarial"}, "train": {"lr": 0.001}}, 0, 29.0, [1, 2, 3])
    # tables 1-2 with a benchmark.json
    write_run(root, "cs_bisenet", {"data": {"source": {"name": "cityscapes"}}}, 0, 50.0, [95.0, 70.0, 85.0],
              fake_benchmark({"name": "bisenet"}, 50.0))
    # synthetic data mimicking the GTA5 domain
    write_run(root, "synth", {"data": {"source": {"name": "synthetic", "domain": "source"}}}, 0, 40.0, [90, 30, 0])
    # no metrics.json: unfinished
    (root / "unfinished" / "t0").mkdir(parents=True)
    (root / "unfinished" / "t0" / "config.yaml").write_text("seed: 0\n")
    # broken metrics.json
    (root / "broken" / "t0").mkdir(parents=True)
    (root / "broken" / "t0" / "metrics.json").write_text("{not json")
    return root


def by_key(tables, key, synthetic=False):
    (table,) = [t for t in tables if t.key == key and t.synthetic == synthetic]
    return table


def test_seeds_collapse_into_mean_and_std(runs_dir):
    runs, problems = tabulate.find_runs([runs_dir])
    tables = tabulate.build_tables(runs, "all", problems=problems)
    (row,) = by_key(tables, "domain-shift").rows
    assert row[0] == "BiSeNet-R18" and row[1] == 2
    miou, road, sidewalk, building = row[2:]
    assert (miou.mean, miou.n) == (32.0, 2) and miou.std == pytest.approx(math.sqrt(8))
    assert road.mean == 82.0 and sidewalk.mean == 25.0
    assert building.mean is None and tabulate._cell_text(building) == "—"  # absent class, never averaged as 0


def test_rows_are_classified_from_the_config_not_the_folder(runs_dir):
    runs, problems = tabulate.find_runs([runs_dir])
    tables = tabulate.build_tables(runs, "all", problems=problems)
    aug = by_key(tables, "augmentations")
    assert [r[1] for r in aug.rows] == ["none", "hflip 0.5"]  # the source-only baseline first
    adaptation = by_key(tables, "adaptation")
    methods = sorted(r[1] for r in adaptation.rows)
    assert "FDA (β=0.05)" in methods
    adv = [r for r in adaptation.rows if r[1].startswith("Adversarial")]
    assert len(adv) == 2 and {r[0] for r in adv} == {"BiSeNet-R18 [lr=0.01]", "BiSeNet-R18 [lr=0.001]"}
    (cs,) = by_key(tables, "cityscapes").rows
    assert cs[0] == "BiSeNet-R18" and cs[2].mean == 50.0 and cs[3] == pytest.approx(20.0) and cs[4] == 50.0
    # FlopCounterMode empty: this benchmark.json predates it, so its count is fvcore's
    assert cs[5] is None and cs[6] == 25.59 and cs[7] == pytest.approx(12.054042) and cs[8] == "512x1024"


def test_every_method_is_named_in_the_adaptation_table_and_the_plot(runs_dir, tmp_path):
    # MinEnt, AdvEnt and MIC runs were once labelled "Source only": each strategy now names itself
    from rtda.adapt import STRATEGIES
    assert all("label" in vars(cls) for cls in STRATEGIES.values()), "every strategy names itself"
    expected = {"minent": "MinEnt (single-level, λ=0.001)", "advent": "AdvEnt (single-level, λ=0.001)",
                "mic": "MIC", "dacs": "DACS"}
    for name in expected:
        write_run(runs_dir, name, {**GTA, "adapt": {"name": name}}, 0, 35.0, [1, 2, 3])
    runs, problems = tabulate.find_runs([runs_dir])
    methods = {r[1] for r in by_key(tabulate.build_tables(runs, "adaptation", problems=problems), "adaptation").rows}
    assert set(expected.values()) <= methods and "Source only" not in methods
    labels = []
    original = plot.distinguish
    plot.distinguish = lambda names, groups: labels.extend(names) or original(names, groups)
    try:
        plot.plot_miou_fps(runs, tmp_path / "plot.png")
    finally:
        plot.distinguish = original
    for label in expected.values():
        assert any(f"· {label}" in text for text in labels), label


def test_synthetic_runs_get_their_own_marked_tables(runs_dir):
    runs, problems = tabulate.find_runs([runs_dir])
    tables = tabulate.build_tables(runs, "domain-shift", problems=problems)
    real, synth = by_key(tables, "domain-shift"), by_key(tables, "domain-shift", synthetic=True)
    assert "SYNTHETIC" in synth.title and "SYNTHETIC" not in real.title
    assert [r[2].mean for r in synth.rows] == [40.0] and [r[2].mean for r in real.rows] == [32.0]
    rows = list(csv.reader(io.StringIO(tabulate.format_csv(tables))))
    header = rows[0]
    assert header[:6] == ["table", "data", "Model", "Seeds", "mIoU", "mIoU std"]
    data_of = {r[4]: r[1] for r in rows if r and r[0] == "domain-shift"}  # mIoU -> data kind
    assert data_of == {"32.00": "real", "40.00": "synthetic"}


def test_missing_and_broken_metrics_are_reported_and_the_rest_tabulated(runs_dir, capsys):
    assert benchmark.main(["--runs", str(runs_dir), "--table", "all", "--format", "md"]) == 0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert any("unfinished" in line and "no metrics.json" in line for line in lines)
    assert any("broken" in line and "not readable JSON" in line for line in lines)
    assert "### Table 3: GTA5 → Cityscapes, source only" in out and "32.0 ± 2.8" in out
    assert "### Table 2: BiSeNet on Cityscapes" in out and "### Table 5" in out


def test_plot_says_which_form_each_fps_comes_from(runs_dir, tmp_path):
    runs, _ = tabulate.find_runs([runs_dir])
    labels = []
    original = plot.distinguish
    plot.distinguish = lambda names, groups: labels.extend(names) or original(names, groups)
    try:
        drawn = plot.plot_miou_fps(runs, tmp_path / "eager.png")
        problems = []
        missing = plot.plot_miou_fps(runs, tmp_path / "ort.png", problems=problems, form="onnxruntime")
    finally:
        plot.distinguish = original
    assert drawn > 0 and all(label.endswith("[eager]") for label in labels[:drawn])
    # the benchmark.json here has only eager and deploy: nothing drawn, and the reason is given
    assert missing == 0 and problems and all("no 'onnxruntime' form" in p for p in problems)


def test_plot_is_a_png_with_one_marker_per_config_that_has_a_speed(runs_dir, tmp_path):
    # give the GTA5 BiSeNet rows their speed through the Cityscapes run's benchmark.json (same model)
    runs, problems = tabulate.find_runs([runs_dir])
    path = tmp_path / "miou_fps.png"
    drawn = plot.plot_miou_fps(runs, path, problems=problems)
    groups = tabulate.group_runs(runs)
    assert drawn == len(groups)  # every config here is BiSeNet-R18, whose speed is known
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_a_run_resumed_with_changes_is_noted_under_its_table(runs_dir):
    (run,) = (runs_dir / "fda").iterdir()
    entry = {"iteration": 500, "time": "2026-12-01 12:00:00", "changes": {"train.lr": [0.025, 0.01]}}
    (run / "resume_log.jsonl").write_text(json.dumps(entry) + "\n")
    runs, problems = tabulate.find_runs([runs_dir])
    adaptation = by_key(tabulate.build_tables(runs, "adaptation", problems=problems), "adaptation")
    (note,) = [n for n in adaptation.notes if "resumed with changes" in n]
    assert str(run) in note and "iteration 500: train.lr 0.025 -> 0.01" in note
    assert "resumed" in tabulate.format_markdown([adaptation])


# ------------------------------------------------------------------------------------------ adaptation table
def _table_run(tmp_path, name, seed, miou):
    run = tmp_path / name / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"config_name": name, "seed": seed, "wall_time_s": 10.0 + seed,
                                                  "final": {"mIoU": miou}}))


def test_adaptation_table_gives_each_method_its_share_of_the_oracle_gap(tmp_path):
    for seed, (src, ora, dacs) in enumerate([(10.0, 50.0, 30.0), (12.0, 52.0, 34.0), (11.0, 51.0, 35.0)]):
        _table_run(tmp_path, "gta5_bisenet", seed, src)
        _table_run(tmp_path, "oracle_bisenet", seed, ora)
        _table_run(tmp_path, "gta5_bisenet_dacs", seed, dacs)
    _table_run(tmp_path, "gta5_bisenet_mic", 0, 9.0)
    synthetic_table.write_table(tmp_path, synthetic_table.finished_runs(tmp_path))
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in (tmp_path / "table.md").read_text().splitlines()[2:]}
    assert list(rows) == ["gta5_bisenet", "oracle_bisenet", "gta5_bisenet_dacs", "gta5_bisenet_mic"]
    # DACS: mean 33 over source-only's 11 and the oracle's 51 -> +22.0, 22 / 40 = 55% of the gap; std of 30/34/35
    assert rows["gta5_bisenet_dacs"][2:5] == ["33.0 ± 2.6", "+22.0", "55%"]
    assert rows["gta5_bisenet_mic"][1:5] == ["1", "9.0", "-2.0", "-5%"]  # one seed: no std; below source-only
    assert rows["oracle_bisenet"][3:5] == ["+40.0", ""] and rows["gta5_bisenet"][3:5] == ["", ""]


def test_adaptation_table_trains_its_rows_two_at_a_time_and_then_reuses_them(tmp_path, synthetic_root, monkeypatch):
    from conftest import tiny_overrides

    # the references, FDA's three bands (the multi-band mean and the SSL round build on them) and one method: every
    # row's config trains end to end in test_adapt/test_sota, so the runner's queue needs no more than these
    configs = ("gta5_bisenet", "oracle_bisenet", *synthetic_table.FDA_BANDS, "gta5_bisenet_dacs")
    monkeypatch.setattr(synthetic_table, "BENCHMARK_CONFIGS", configs)
    work = tmp_path / "bench"
    overrides = tiny_overrides(synthetic_root, **{"train.iters": 2})
    table = synthetic_table.run_adaptation_table(work, [0], overrides, ssl=True, jobs=2, threads=1)
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]]
    expected = {*configs, synthetic_table.MBT, "gta5_bisenet_fda_ssl"}  # the multi-band mean and the SSL round too
    assert rows == [row for row in synthetic_table.TABLE_ROWS if row in expected]
    assert table == (work / "table.md").read_text()
    trained = {m["config_name"] for m in synthetic_table.finished_runs(work).values()} - {synthetic_table.MBT}
    assert trained == {*synthetic_table.BENCHMARK_CONFIGS, "gta5_bisenet_fda_ssl"}
    assert sorted(p.name for p in (work / "logs").iterdir()) == sorted(f"{name}_seed0.log" for name in trained)
    stamp = json.loads((work / "generator.json").read_text())
    assert stamp["generator"] == GENERATOR_VERSION and "train.iters=2" in stamp["overrides"]
    assert not any(o.startswith(("data.source.root", "train.workers")) for o in stamp["overrides"])

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("subprocess.Popen", no_training)
    assert synthetic_table.run_adaptation_table(work, [0], overrides, ssl=True, jobs=2, threads=1) == table


def test_runs_on_another_version_of_the_synthetic_domains_are_not_reused(tmp_path):
    work = tmp_path / "bench"
    (work / "gta5_bisenet" / "20261101-120000").mkdir(parents=True)
    (work / "gta5_bisenet" / "20261101-120000" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ExperimentError, match=r"--work-dir .*bench: its runs trained on synthetic domains "
                                                       r"of generator version unrecorded .* choose another --work-dir"):
        synthetic_table.run_adaptation_table(work, [0], [], ssl=False)
    (work / "generator.json").write_text(json.dumps({"generator": GENERATOR_VERSION - 1}))
    with pytest.raises(ExperimentError, match=rf"generator version {GENERATOR_VERSION - 1}, and this "
                                                       rf"code generates version {GENERATOR_VERSION}"):
        synthetic_table.run_adaptation_table(work, [0], [], ssl=False)


def test_runs_trained_with_other_overrides_are_not_reused(tmp_path):
    work = tmp_path / "bench"
    (work / "gta5_bisenet" / "20261101-120000").mkdir(parents=True)
    (work / "gta5_bisenet" / "20261101-120000" / "config.yaml").write_text("seed: 0\n")
    (work / "generator.json").write_text(json.dumps({"generator": GENERATOR_VERSION}))  # from scratch, no overrides
    synthetic_table.check_work_dir(work, ["train.workers=0", "data.source.root=elsewhere"])  # changes nothing learnt
    with pytest.raises(ExperimentError, match=r"its runs trained with the overrides none, and this call "
                                                       r"asks for model.pretrained=backbone.pt; choose another"):
        synthetic_table.check_work_dir(work, ["model.pretrained=backbone.pt", "train.workers=0"])


def test_a_backbone_file_replaced_under_the_same_name_is_not_reused(tmp_path):
    backbone, work = tmp_path / "backbone.pt", tmp_path / "bench"
    backbone.write_bytes(b"first recipe")
    synthetic_table.check_work_dir(work, [f"model.pretrained={backbone}"])  # stamps the new work dir
    stamp = json.loads((work / "generator.json").read_text())
    assert stamp["overrides"][1] == f"model.pretrained:sha256={hashlib.sha256(b'first recipe').hexdigest()}"
    synthetic_table.check_work_dir(work, [f"model.pretrained={backbone}"])  # the same file: its runs are reused
    backbone.write_bytes(b"second recipe")
    with pytest.raises(ExperimentError, match=r"model.pretrained:sha256=\w+; choose another --work-dir"):
        synthetic_table.check_work_dir(work, [f"model.pretrained={backbone}"])


def test_pretrain_synthetic_writes_a_backbone_the_rows_load(tmp_path, capsys):
    from rtda.datasets.synthetic import render_scene
    from rtda.models import build_model

    image, _ = render_scene("randomised", 0, 0, 64, 128)
    assert not (image == render_scene("source", 0, 0, 64, 128)[0]).all()
    out = tmp_path / "pre" / "r18.pt"
    small = ["data.synthetic.height=32", "data.synthetic.width=64", "data.source.size=[64,32]"]
    recipe = pretrain_backbone.pretrain_synthetic_backbone(out, small, steps=3, images=4, batch=2)
    assert out.is_file() and not (tmp_path / "pre" / "r18.pt.partial").exists()
    assert json.loads(out.with_name("r18.pt.json").read_text()) == recipe
    assert recipe["generator"] == GENERATOR_VERSION and recipe["size"] == [64, 32] and recipe["steps"] == 3
    assert "1x2 grid" in recipe["task"] and math.isfinite(recipe["loss_last50"])
    machine = recipe["machine"]
    assert machine["torch"] == torch.__version__ and machine["threads"] == torch.get_num_threads()
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    cfg = load_config(synthetic_table.SYNTHETIC / "gta5_bisenet.yaml", [f"model.pretrained={out}"])
    model = build_model(cfg.model)  # every backbone tensor present, none left over (load_backbone_weights)
    state = torch.load(out, weights_only=True)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    assert "loaded 120 backbone tensors" in capsys.readouterr().out
    assert recipe["sha256"] == file_sha256(out)
    again = pretrain_backbone.pretrain_synthetic_backbone(tmp_path / "again" / "r18.pt", small, steps=3, images=4, batch=2)
    assert again["loss_last50"] == recipe["loss_last50"]  # seeded: the same file from the same recipe ...
    assert again["sha256"] == recipe["sha256"]  # ... byte for byte (torch.save names its archive after the file)
    with pytest.raises(ExperimentError, match="steps 0: expected a positive integer"):
        pretrain_backbone.pretrain_synthetic_backbone(out, small, steps=0)


def test_a_failed_run_is_reported_with_its_log_after_the_others_finish(tmp_path, synthetic_root):
    from conftest import tiny_overrides

    work, finished = tmp_path / "bench", []
    runs = [("gta5_bisenet", 0, ["train.lr=-1"]), ("oracle_bisenet", 0, [])]
    failed = synthetic_table.train_runs(runs, tiny_overrides(synthetic_root, **{"train.iters": 1}), work, 2, 1,
                                   lambda: finished.append(1))
    assert len(failed) == 1 and failed[0].startswith("gta5_bisenet seed 0 failed (exit ")
    assert "train.lr" in failed[0] and str(work / "logs" / "gta5_bisenet_seed0.log") in failed[0]
    assert len(finished) == 2 and [m["config_name"] for m in synthetic_table.finished_runs(work).values()] == ["oracle_bisenet"]


def test_an_interrupted_run_is_resumed_from_its_own_last_checkpoint(tmp_path, synthetic_root, capsys):
    """A session that ended mid-benchmark: the next call carries on the run of that config and seed, no other."""
    from rtda import engine as train
    from rtda.utils.files import load_checkpoint

    from conftest import tiny_overrides

    work = tmp_path / "bench"
    config = synthetic_table.SYNTHETIC / "gta5_bisenet.yaml"
    stopped = {seed: train.train(load_config(config, tiny_overrides(synthetic_root, **{
        "seed": seed, "train.iters": 4, "train.max_wall_time": 1e-6})), work_dir=work) for seed in (0, 1)}
    assert all(load_checkpoint(d / "last.pt")["iteration"] == 1 for d in stopped.values())
    assert runs.interrupted_run(work, "gta5_bisenet", 0) == stopped[0] / "last.pt"
    failed = synthetic_table.train_runs([("gta5_bisenet", 0, [])], tiny_overrides(synthetic_root, **{"train.iters": 4}),
                                   work, 1, 1, lambda: None)
    assert failed == [] and "resuming gta5_bisenet seed 0" in capsys.readouterr().err
    assert load_checkpoint(stopped[0] / "last.pt")["iteration"] == 4 and (stopped[0] / "metrics.json").is_file()
    assert sorted(p.name for p in (work / "gta5_bisenet").iterdir()) == sorted(d.name for d in stopped.values())
    assert runs.interrupted_run(work, "gta5_bisenet", 0) is None
    assert runs.interrupted_run(work, "gta5_bisenet", 1) == stopped[1] / "last.pt"  # untouched


def test_complexity_tables_name_the_flop_counter(runs_dir):
    runs, problems = tabulate.find_runs([runs_dir])
    table = by_key(tabulate.build_tables(runs, "cityscapes", problems=problems), "cityscapes")
    columns = dict(zip(table.columns, table.rows[0]))
    # this benchmark.json predates FlopCounterMode: its count is fvcore's, and the table says so
    assert columns["FLOPs (G MACs, FlopCounterMode)"] is None and columns["FLOPs (G MACs, fvcore)"] == 25.59
    assert any("FlopCounterMode" in note and "fvcore" in note for note in table.notes)
    assert tabulate._flop_cells({"flops": 2, "gmacs": 25.4, "fvcore": {"gmacs": 25.6}}) == (25.4, 25.6)
    assert tabulate._flop_cells({"flops": 2, "gmacs": 25.4, "fvcore": None}) == (25.4, None)


def test_into_is_accepted_and_only_says_where_the_table_is(tmp_path, capsys):
    work, doc = tmp_path / "bench", tmp_path / "doc.md"
    (work / "gta5_bisenet" / "20261101-120000").mkdir(parents=True)
    (work / "gta5_bisenet" / "20261101-120000" / "config.yaml").write_text("seed: 0\n")  # refused: stops at once
    doc.write_text("<!-- adaptation-table:start -->\n<!-- adaptation-table:end -->\n")
    assert benchmark.main(["--adaptation-table", "--work-dir", str(work), "--into", str(doc)]) == 2
    note, error = capsys.readouterr().err.strip().splitlines()
    assert note == (f"benchmark.py: --into {doc} is no longer written: the table is in {work / 'table.md'} and the "
                    "docs quote it")
    assert error.startswith("benchmark.py: --work-dir") and "generator version unrecorded" in error
    assert doc.read_text() == "<!-- adaptation-table:start -->\n<!-- adaptation-table:end -->\n"
