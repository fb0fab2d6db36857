"""INT8 export (rtda.models.quantize through `python -m rtda.models.export --int8`), eval with it, its benchmark form."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from rtda.config import load_config
from rtda.models import build_model, export
from rtda.utils.files import save_checkpoint
from tests.conftest import tiny_overrides

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "oracle_bisenet.yaml"


@pytest.fixture(scope="module")
def tiny(synthetic_root, tmp_path_factory):
    """The tiny synthetic oracle config's overrides (4 val images of 128x64) and an untrained checkpoint of it."""
    overrides = tiny_overrides(synthetic_root)
    cfg = load_config(CONFIG, overrides)
    torch.manual_seed(0)
    checkpoint = tmp_path_factory.mktemp("int8") / "best.pt"
    save_checkpoint({"iteration": 3, "model": build_model(cfg.model).state_dict(), "config_name": cfg.name},
                    checkpoint)
    return overrides, checkpoint


def run_export(tiny, out, *extra):
    overrides, checkpoint = tiny
    return export.main(["--config", str(CONFIG), "--checkpoint", str(checkpoint), "--out", str(out), "--int8",
                        "--calibration", "2", "--parity-images", "2", *extra, *overrides])


@pytest.fixture(scope="module")
def int8_file(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8_out") / "model_int8.onnx"
    # an untrained model's logits are near-ties, so its INT8 argmax may differ a lot: thresholds off here
    assert run_export(tiny, out, "--min-agreement", "0", "--max-miou-drop", "100") == 0
    return out


def test_int8_export_writes_one_file_with_its_metadata(int8_file, tiny):
    model = onnx.load(str(int8_file), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["precision"] == "int8" and props["calibration_images"] == "2"
    assert props["calibration_method"] == "MinMax" and "split val" in props["calibration_split"]
    assert props["checkpoint"] == tiny[1].name and props["num_classes"] == "19"
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # no staged or side files: the file, and the outputs manifest that lets a later export replace it
    assert sorted(p.name for p in int8_file.parent.iterdir()) == [".rtda-outputs.jsonl", int8_file.name]


def test_int8_parity_below_threshold_writes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "model_int8.onnx"
    assert run_export(tiny, out, "--max-miou-drop", "0", "--min-agreement", "1") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not written" in err and "--force" in err
    assert list(tmp_path.iterdir()) == []
    assert run_export(tiny, out, "--max-miou-drop", "0", "--min-agreement", "1", "--force") == 0
    assert out.is_file()


def test_int8_bad_arguments_are_one_line(tiny, tmp_path, capsys):
    for extra, named in ((["--dynamic"], "--dynamic"), (["--size", "32x64"], "--size 32x64"),
                         (["--min-agreement", "97"], "--min-agreement 97"), (["--parity-images", "4"], "at most 3"),
                         (["--calibration", "0"], "--calibration 0")):
        assert run_export(tiny, tmp_path / "m.onnx", *extra) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
    assert list(tmp_path.iterdir()) == []


def test_int8_missing_onnxruntime_names_the_pip_install(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert run_export(tiny, tmp_path / "m.onnx") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install onnxruntime" in err


def test_eval_scores_the_int8_file(int8_file, tiny, tmp_path):
    from rtda.evaluation.cli import main as eval_main

    overrides, _ = tiny
    assert eval_main(["--config", str(CONFIG), "--checkpoint", str(int8_file), "--out", str(tmp_path / "ev"),
                      *overrides]) == 0


def test_benchmark_times_the_int8_form_beside_the_others():
    from rtda import models
    from rtda.bench import latency

    torch.manual_seed(0)
    model = models.build_model({"name": "bisenet"}).eval()
    forms = latency.parse_variants("onnxruntime,onnxruntime_int8", torch.device("cpu"))
    assert forms == ["eager", "onnxruntime", "onnxruntime_int8"]
    result = latency.measure_latency(model, models.deploy(model), (32, 64), torch.device("cpu"), iters=2, warmup=0,
                                     forms=forms)
    assert result["onnxruntime_int8"]["iters"] == 2 and "onnxruntime_int8" in result["parity"]
    assert "skipped" not in result
