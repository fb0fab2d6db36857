"""Outputs never replace a file the project did not write (issue 27, group 2), through each command's CLI.

A command replaces only files noted in `.rtda-outputs.jsonl` beside them (what an earlier run of a command wrote,
unchanged since) or with `--overwrite`; `eval.py --images D --out D` is refused; images whose names differ only in
their suffix are refused with the clash listed. Each case asserts the one line, the exit code and the checksums
of what was on disk before and after."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rtda import evaluation as evaluator
from rtda.bench import cli as benchmark
from rtda.config import load_config
from rtda.models import build_model
from rtda.utils.files import OUTPUTS_MANIFEST, save_checkpoint

from conftest import tiny_overrides
from test_benchmark import fake_benchmark, write_run
from test_never_lost import SOURCE_ONLY, checksums

USER_BYTES = b"the user's own file, not the project's\n"


def one_error_line(capsys, *names: str) -> str:
    """The single stderr line (the progress bar aside), which names each of `names` and --overwrite."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert len(err) == 1, err
    assert "--overwrite" in err[0] and all(name in err[0] for name in names), err[0]
    return err[0]


@pytest.fixture(scope="module")
def bisenet(tmp_path_factory):
    """A config (val size 128x64), a BiSeNet-R18 checkpoint of it, and a folder of two images."""
    root = tmp_path_factory.mktemp("outputs")
    config = root / "bisenet.yaml"
    config.write_text("model: {name: bisenet, backbone: resnet18, pretrained: none}\n"
                      "data: {val: {name: cityscapes, size: [128, 64]}}\n")
    torch.manual_seed(0)
    checkpoint = root / "best.pt"
    save_checkpoint({"iteration": 3, "model": build_model({"name": "bisenet"}).state_dict()}, checkpoint)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(images / name)
    return config, checkpoint, images


# ------------------------------------------------------------------------------------------ export
def test_export_replaces_only_its_own_file_or_with_overwrite(bisenet, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from rtda.models import export

    config, checkpoint, _ = bisenet
    out = tmp_path / "existing.onnx"
    out.write_bytes(USER_BYTES)
    argv = ["--config", str(config), "--checkpoint", str(checkpoint), "--out", str(out)]
    before = checksums(tmp_path)
    assert export.main(argv) == 1
    one_error_line(capsys, str(out))
    assert checksums(tmp_path) == before  # nothing written, nothing staged left

    assert export.main([*argv, "--overwrite"]) == 0
    assert out.read_bytes() != USER_BYTES
    first = checksums(tmp_path)
    assert export.main(argv) == 0  # its own file: replaced without --overwrite
    assert "wrote" in capsys.readouterr().out
    assert checksums(tmp_path)[str(out)] == first[str(out)]  # the same export, bit for bit


# ------------------------------------------------------------------------------------------ benchmark --plot
def test_tables_plot_replaces_only_its_own_file_or_with_overwrite(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, "cs_bisenet", {"data": {"source": {"name": "cityscapes"}}}, 0, 50.0, [95.0, 70.0, 85.0],
              fake_benchmark({"name": "bisenet"}, 50.0))
    plot = tmp_path / "plots" / "miou_fps.png"
    plot.parent.mkdir()
    plot.write_bytes(USER_BYTES)
    argv = ["tables", "--runs", str(runs), "--table", "cityscapes", "--plot", str(plot)]
    before = checksums(tmp_path)
    assert benchmark.main(argv) == 2
    assert one_error_line(capsys, str(plot)).startswith("benchmark.py: --plot ")
    assert checksums(tmp_path) == before

    assert benchmark.main([*argv, "--overwrite"]) == 0
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert benchmark.main(argv) == 0  # its own plot: replaced without --overwrite
    assert (plot.parent / OUTPUTS_MANIFEST).is_file()


# ------------------------------------------------------------------------------------------ eval.py --out
def test_eval_out_replaces_only_its_own_scores_or_with_overwrite(synthetic_root, tmp_path, capsys):
    cfg = load_config(SOURCE_ONLY, tiny_overrides(synthetic_root))
    checkpoint = tmp_path / "gta5_bisenet" / "run" / "best.pt"
    save_checkpoint({"model": build_model(cfg.model).state_dict()}, checkpoint)
    out = tmp_path / "scores"
    out.mkdir()
    (out / "metrics.json").write_bytes(USER_BYTES)
    argv = ["--config", str(SOURCE_ONLY), "--checkpoint", str(checkpoint), *tiny_overrides(synthetic_root),
            "--out", str(out), "--no-progress"]
    before = checksums(tmp_path)
    assert evaluator.main(argv) == 1
    assert one_error_line(capsys, str(out / "metrics.json")).startswith("error: ")
    assert checksums(tmp_path) == before

    assert evaluator.main([*argv, "--overwrite"]) == 0
    written = checksums(out)
    assert {"iou_table.txt", "metrics.json", "confusion.png"} <= {p.rsplit("/", 1)[-1] for p in written}
    assert evaluator.main(argv) == 0  # its own files: replaced without --overwrite
    (out / "iou_table.txt").write_text("edited by hand\n")  # no longer what eval.py wrote
    assert evaluator.main(argv) == 1
    one_error_line(capsys, str(out / "iou_table.txt"))


def test_eval_save_predictions_replace_only_their_own_pngs_or_with_overwrite(synthetic_root, tmp_path, capsys):
    cfg = load_config(SOURCE_ONLY, tiny_overrides(synthetic_root))
    checkpoint = tmp_path / "gta5_bisenet" / "run" / "best.pt"
    save_checkpoint({"model": build_model(cfg.model).state_dict()}, checkpoint)
    argv = ["--config", str(SOURCE_ONLY), "--checkpoint", str(checkpoint), *tiny_overrides(synthetic_root),
            "--save-predictions", str(tmp_path / "pred"), "--format", "trainids", "--no-progress"]
    assert evaluator.main(argv) == 0
    first = sorted((tmp_path / "pred").glob("*.png"))
    assert first and evaluator.main(argv) == 0  # its own PNGs: replaced without --overwrite
    first[0].write_bytes(USER_BYTES)  # now the user's file
    before = checksums(tmp_path)
    assert evaluator.main(argv) == 1
    one_error_line(capsys, str(first[0]))
    assert checksums(tmp_path) == before
    assert evaluator.main([*argv, "--overwrite"]) == 0 and first[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ eval.py --images
def test_images_outputs_replace_only_their_own_files_or_with_overwrite(bisenet, tmp_path, capsys):
    config, checkpoint, images = bisenet
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_color.png").write_bytes(USER_BYTES)
    argv = ["--config", str(config), "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out),
            "--no-progress"]
    before = checksums(tmp_path, images)
    assert evaluator.main(argv) == 1
    one_error_line(capsys, str(out / "a_color.png"))
    assert checksums(tmp_path, images) == before

    assert evaluator.main([*argv, "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"a_color.png", "a_overlay.png", "b_color.png", "b_overlay.png", OUTPUTS_MANIFEST}
    assert (out / "a_color.png").read_bytes() != USER_BYTES
    assert evaluator.main(argv) == 0  # its own files: replaced without --overwrite


@pytest.mark.parametrize("inside", ["", "preds"])
def test_images_out_among_the_inputs_is_refused(bisenet, tmp_path, capsys, inside):
    config, checkpoint, images = bisenet
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes((images / "a.png").read_bytes())
    (folder / "a_color.png").write_bytes(USER_BYTES)  # the user's own, named like an output
    before = checksums(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        evaluator.main(["--config", str(config), "--checkpoint", str(checkpoint), "--images", str(folder),
                        "--out", str(folder / inside)])
    assert exit_info.value.code == 2
    assert f"--out {folder / inside} is inside --images {folder}" in capsys.readouterr().err.splitlines()[-1]
    assert checksums(tmp_path) == before and not (folder / "preds").exists()


def test_images_differing_only_in_suffix_are_refused_with_the_clash_listed(bisenet, tmp_path, capsys):
    config, checkpoint, images = bisenet
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "a.jpg", "a.webp", "b.png"):
        Image.open(images / "a.png").save(folder / name)
    before = checksums(tmp_path)
    assert evaluator.main(["--config", str(config), "--checkpoint", str(checkpoint), "--images", str(folder),
                           "--out", str(tmp_path / "out")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "a.jpg and a.png and a.webp" in err[0] and "b.png" not in err[0], err
    assert checksums(tmp_path) == before and not (tmp_path / "out").exists()
