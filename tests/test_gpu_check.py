"""`benchmark.py --gpu-check` / `make gpu-check` exercised on CPU, so that a GPU session (15 minutes, start-up
included) does not find its bugs: the one-line refusals, every protocol config's overrides and data on the
written layouts, the whole check at tiny sizes through the CLI, and the 2-processes-on-one-GPU set-up."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rtda import bench as benchmark
from rtda.bench import gpu_check, reports
from rtda.config import load_config
from rtda.datasets import fake_layout
from rtda.utils.distributed import init_distributed

REPO = Path(__file__).resolve().parents[1]
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


# ------------------------------------------------------------------------------------------ refusals
@needs_no_cuda
def test_without_cuda_gpu_check_is_one_line(capsys):
    assert benchmark.main(["--gpu-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CUDA GPU" in err


def test_cpu_without_tiny_is_one_line(capsys):
    assert benchmark.main(["--gpu-check", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tiny" in err


def test_gpu_check_options_without_gpu_check_are_one_line(tmp_path, capsys):
    assert benchmark.main(["--runs", str(tmp_path), "--tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "benchmark.py: --tiny is an option of --gpu-check"


def test_missing_cityscapesscripts_names_the_wheels(monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cityscapesscripts" else find_spec(name, *a))
    with pytest.raises(benchmark.BenchmarkError, match="cityscapesscripts is missing.*make gpu-wheels"):
        gpu_check.gpu_check(tmp_path / "out.json", torch.device("cpu"), tiny=True)


@needs_no_cuda
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_without_cuda_stops_with_one_line():
    result = subprocess.run(["make", "--no-print-directory", "gpu-check", f"GPU_PYTHON={sys.executable}"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if not line.startswith("make")]  # make adds its own
    assert len(ours) == 1 and "needs a CUDA GPU" in ours[0], result.stderr
    assert result.stdout == ""


# ------------------------------------------------------------------------------ pieces, for every config
def test_memory_fit_rule():
    gib = 2**30
    assert gpu_check.memory_fits(int(12 * gib)) == {"16GB": True, "24GB": True}  # 13.7 GiB needed
    assert gpu_check.memory_fits(int(14 * gib)) == {"16GB": False, "24GB": True}  # 15.9 > 15.0
    assert gpu_check.memory_fits(int(20 * gib)) == {"16GB": False, "24GB": False}  # 22.5 > 22.49


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> dict:
    return fake_layout.write_layout_tree(tmp_path_factory.mktemp("layouts"), 4, 2, gpu_check.TINY_STORED_HW)


def test_every_protocol_config_reads_the_written_layouts(tiny_tree, tmp_path):
    """Each config's train.py overrides validate, its three data sets load an item from the written files
    (pseudo-labels for the SSL round included), and its strategy accepts the tiny sizes (distill's with the
    stand-in teachers the check writes)."""
    from rtda.adapt import build_strategy
    from rtda.datasets import build_dataset
    from rtda.models import build_model

    configs = gpu_check.protocol_configs()
    tiny_tree = {**tiny_tree, "teachers": gpu_check.write_standin_teachers(tmp_path, configs, tiny=True)}
    assert {p.stem for p in configs} >= {"cityscapes_bisenet", "gta5_bisenet_fda_ssl", "gta5_deeplabv2_dacs"}
    assert not any("synthetic" in str(p) or "_base_" in str(p) for p in configs)
    models = {}  # one model per distinct model section (each costs up to a second to build)
    for path in configs:
        cfg = load_config(path)
        assert cfg.train.amp == "auto", path
        full = load_config(path, gpu_check.trainer_overrides(cfg, tiny_tree, 2, tiny=False))
        assert full.model.pretrained == "none" and full.train.iters == 2
        assert full.data.source.size == cfg.data.source.size  # the protocol size is kept
        run_cfg = load_config(path, gpu_check.trainer_overrides(cfg, tiny_tree, 1, tiny=True))
        for role in ("source", "target", "val"):
            item = build_dataset(getattr(run_cfg.data, role), run_cfg, role)[0]
            assert item["image"].shape == (3, 32, 64), (path.stem, role)
            assert ("label" in item) == (role != "target" or cfg.data.target.pseudo_labels is not None)
        key = repr(run_cfg.model)
        if key not in models:
            models[key] = build_model(run_cfg.model)
        build_strategy(run_cfg, models[key])  # e.g. DACS's crop must fit the tiny sizes


def test_init_distributed_shares_one_gpu_over_gloo(monkeypatch):
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("set_device", index))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.setdefault("group", kw))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    for key, value in {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    d = init_distributed()
    assert calls["set_device"] == 0 and d.device == torch.device("cuda", 0) and d.local_rank == 1
    assert calls["group"] == {"backend": "gloo", "device_id": None}  # NCCL refuses two ranks on one GPU

    calls.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # one GPU each: NCCL, as before
    d = init_distributed()
    assert calls["set_device"] == 1 and d.device == torch.device("cuda", 1)
    assert calls["group"] == {"backend": "nccl", "device_id": torch.device("cuda", 1)}


def test_a_hanging_ddp_run_is_ended_with_its_ranks(tmp_path, tiny_tree):
    import time

    started = time.perf_counter()
    entry = gpu_check.check_ddp(torch.device("cpu"), tiny_tree, tmp_path, tiny=True, timeout=1.0)
    assert time.perf_counter() - started < 30
    assert entry["ok"] is False and entry["returncode"] is None and "did not finish within 1 s" in entry["error"]


def test_budget_skips_configs_and_fails_the_check(monkeypatch, tmp_path, tiny_tree):
    monkeypatch.setattr(gpu_check, "check_latency", lambda *a, **k: {})
    monkeypatch.setattr(gpu_check, "check_fp16", lambda *a, **k: {"ok": True, "step_s": 1.0, "peak_memory_bytes": 1})
    monkeypatch.setattr(gpu_check, "check_ddp", lambda *a, **k: {"ok": True, "processes": 2, "backend": "stub",
                                                                  "wall_s": 0.0})
    configs = gpu_check.protocol_configs()[:2]
    result = gpu_check.gpu_check(tmp_path / "out.json", torch.device("cpu"), configs, tiny=True, budget_s=0.0)
    assert result["skipped"] == [p.stem for p in configs] and not result["configs"] and result["ok"] is False
    assert json.loads((tmp_path / "out.json").read_text())["skipped"] == result["skipped"]


# ------------------------------------------------------------------------------ the whole check, tiny
def test_tiny_gpu_check_through_the_cli(monkeypatch, tmp_path, capsys):
    """All parts at tiny sizes on CPU: a BiSeNet config whose FDA round reads pseudo-labels, and DeepLabV2 + DACS
    with its recipe crop; the latency of both models; torchrun with 2 processes."""
    chosen = [REPO / "configs" / "gta5_bisenet_fda_ssl.yaml", REPO / "configs" / "gta5_deeplabv2_dacs.yaml"]
    monkeypatch.setattr(gpu_check, "protocol_configs", lambda: chosen)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the torchrun ranks
    out = tmp_path / "check" / "gpu_check.json"
    assert benchmark.main(["--gpu-check", "--device", "cpu", "--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gpu-check passed" in printed and "gta5_deeplabv2_dacs" in printed
    result = json.loads(out.read_text())
    assert result["ok"] and result["tiny"] and result["environment"]["amp_auto"] == "none"
    assert set(result["configs"]) == {"gta5_bisenet_fda_ssl", "gta5_deeplabv2_dacs"}
    for name, entry in result["configs"].items():
        assert entry["ok"] and entry["step_s"] > 0 and entry["peak_memory_bytes"] > 0, name
        assert entry["trainer"] == {**entry["trainer"], "ok": True, "iterations": 1}
        assert entry["source_size"] == [32, 64] and entry["batch_size"] == 2
    from rtda.bench.gpu_check import LATENCY_MODELS, REPO_ROOT
    assert set(result["latency"]) == {n for n, c in LATENCY_MODELS.items() if (REPO_ROOT / "configs" / c).is_file()}
    assert {"bisenet_r18", "deeplabv2_r101"} <= set(result["latency"])
    for r in result["latency"].values():
        assert r["eager"]["iters"] == r["deploy"]["iters"] == 2 and r["speedup_deploy"] > 0
    ddp = result["ddp"]
    assert ddp["ok"] and ddp["iterations"] == 1 and ddp["rng_states"] == 2, ddp
    assert result["fp16"]["ok"] and result["fp16"]["amp"] == "float16", result["fp16"]  # CPU autocast here
    table = reports.gpu_check_markdown(result)
    assert table in printed and "| `gta5_deeplabv2_dacs` | DeepLabV2-R101 + dacs | 2 | 32x64 |" in table
