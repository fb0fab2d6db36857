"""models.export: one self-contained ONNX file of the deploy form, parity with PyTorch, ONNX Runtime as a model."""
from __future__ import annotations

import sys

import pytest
import torch

from rtda.models import build_model, export
from rtda.utils.files import OUTPUTS_MANIFEST, save_checkpoint

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

HEIGHT, WIDTH = 64, 128


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A config (val size 128x64), a BiSeNet-R18 checkpoint of it and the model itself (eval mode)."""
    root = tmp_path_factory.mktemp("export")
    config = root / "bisenet.yaml"
    config.write_text("model: {name: bisenet, backbone: resnet18, pretrained: none}\n"
                      f"data: {{val: {{name: cityscapes, size: [{WIDTH}, {HEIGHT}]}}}}\n")
    torch.manual_seed(0)
    model = build_model({"name": "bisenet"})
    checkpoint = root / "best.pt"
    save_checkpoint({"iteration": 7, "model": model.state_dict(), "config_name": "bisenet"}, checkpoint)
    return config, checkpoint, model.eval()


@pytest.fixture(scope="module")
def fixed_onnx(trained, tmp_path_factory):
    config, checkpoint, _ = trained
    out = tmp_path_factory.mktemp("fixed") / "model.onnx"
    assert export.main(["--config", str(config), "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def dynamic_onnx(trained, tmp_path_factory):
    config, checkpoint, _ = trained
    out = tmp_path_factory.mktemp("dynamic") / "model.onnx"
    assert export.main(["--config", str(config), "--checkpoint", str(checkpoint), "--out", str(out),
                        "--dynamic", "--size", "32x64"]) == 0
    return out


def test_export_writes_one_self_contained_file_and_reports_parity(trained, tmp_path, capsys):
    config, checkpoint, model = trained
    out = tmp_path / "sub" / "model.onnx"
    assert export.main(["--config", str(config), "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exporter: torchscript" in printed and f"opset {export.DEFAULT_OPSET}" in printed
    assert "max abs diff" in printed and "argmax agreement 100.000%" in printed
    # no .onnx.data, nothing staged left; the manifest notes the file as the project's (a re-export replaces it)
    assert sorted(p.name for p in out.parent.iterdir()) == [OUTPUTS_MANIFEST, "model.onnx"]
    proto = onnx.load(str(out), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["num_classes"] == "19" and meta["model"] == "bisenet/resnet18" and meta["iteration"] == "7"
    assert "0-255" in meta["input"]
    # the default size is the config's data.val.size, batch 1
    onnx_model = export.OnnxModel(out)
    assert onnx_model.fixed_size == (HEIGHT, WIDTH) and onnx_model.fixed_batch == 1
    images = torch.randint(0, 256, (2, 3, HEIGHT, WIDTH), dtype=torch.uint8)  # raw pixels, a batch of 2
    with torch.no_grad():
        expected = model(images)
    got = onnx_model(images)  # fed image by image (fixed batch 1)
    result = export.parity(expected, got)
    assert result["max_abs_diff"] < 1e-3 and result["argmax_agreement"] >= 0.999


def test_dynamic_export_takes_any_batch_and_size(trained, dynamic_onnx):
    _, _, model = trained
    onnx_model = export.OnnxModel(dynamic_onnx)
    assert onnx_model.fixed_size is None and onnx_model.fixed_batch is None
    for shape in [(1, 3, 32, 64), (3, 3, 45, 70)]:
        images = torch.rand(*shape) * 255
        with torch.no_grad():
            expected = model(images)
        got = onnx_model(images)
        assert got.shape == expected.shape
        assert export.parity(expected, got)["argmax_agreement"] >= 0.999


def test_fixed_size_file_given_another_size_is_one_clear_line(fixed_onnx):
    onnx_model = export.OnnxModel(fixed_onnx)
    with pytest.raises(export.ExportError) as info:
        onnx_model(torch.zeros(1, 3, 32, 64))
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert str(fixed_onnx) in message and "64x128" in message and "32x64" in message and "--dynamic" in message


def test_checkpoint_of_another_model_is_one_line(trained, tmp_path, capsys):
    config, _, _ = trained
    other = tmp_path / "deeplab_like.pt"
    save_checkpoint({"model": build_model({"name": "bisenet", "num_classes": 7}).state_dict(),
                             "config_name": "seven_classes"}, other)
    out = tmp_path / "model.onnx"
    assert export.main(["--config", str(config), "--checkpoint", str(other), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(other) in err
    assert "7 classes" in err and "19 classes" in err and "seven_classes" in err
    assert not out.exists()


def test_failed_parity_writes_nothing(trained, tmp_path, capsys, monkeypatch):
    config, checkpoint, _ = trained
    monkeypatch.setattr(export, "parity", lambda a, b: {"max_abs_diff": 3.0, "argmax_agreement": 0.9})
    out = tmp_path / "model.onnx"
    assert export.main(["--config", str(config), "--checkpoint", str(checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "90.000%" in err and "99.9" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_missing_extra_names_the_pip_install(trained, tmp_path, capsys, monkeypatch):
    config, checkpoint, _ = trained
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    assert export.main(["--config", str(config), "--checkpoint", str(checkpoint),
                        "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install onnxruntime" in err


def test_bad_size_and_missing_checkpoint_are_one_line(trained, tmp_path, capsys):
    config, checkpoint, _ = trained
    assert export.main(["--config", str(config), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx"),
                        "--size", "64by128"]) == 1
    assert "64by128" in capsys.readouterr().err
    assert export.main(["--config", str(config), "--checkpoint", str(tmp_path / "none.pt"),
                        "--out", str(tmp_path / "m.onnx")]) == 1
    assert "none.pt: checkpoint not found" in capsys.readouterr().err


def test_dynamo_exporter_gives_the_same_model(trained, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    config, checkpoint, model = trained
    out = tmp_path / "dynamo.onnx"
    assert export.main(["--config", str(config), "--checkpoint", str(checkpoint), "--out", str(out),
                        "--size", "32x64", "--exporter", "dynamo"]) == 0
    assert "exporter: dynamo" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [OUTPUTS_MANIFEST, "dynamo.onnx"]  # one file
    images = torch.rand(1, 3, 32, 64) * 255
    with torch.no_grad():
        expected = model(images)
    assert export.parity(expected, export.OnnxModel(out)(images))["argmax_agreement"] >= 0.999
