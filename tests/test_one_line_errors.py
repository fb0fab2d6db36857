"""One line instead of a traceback (issue 27, group 6): full disks, unwritable or looping paths, Ctrl-C in eval.py,
config files that are not UTF-8, a `_base_` that is not a list of paths.

Each case runs a command's `main` as its CLI does and asserts the one `error:` line, the exit code, and that nothing
was left half-written (checksums of the folders involved before and after)."""
from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch

from rtda import engine
from rtda.utils.files import save_checkpoint

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
SOURCE_ONLY = REPO / "configs" / "synthetic" / "gta5_bisenet.yaml"


def checksums(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders if folder.exists() for p in sorted(folder.rglob("*")) if p.is_file()}


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and "%|" not in line]


def train_cli(capsys, config: Path, *args: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = engine.main(["--config", str(config), *args])
    return code, lines(capsys.readouterr().err)


def symlink_loop(folder: Path) -> Path:
    (folder / "loop_a").symlink_to(folder / "loop_b")
    (folder / "loop_b").symlink_to(folder / "loop_a")
    return folder / "loop_a"


# ------------------------------------------------------------------------------------------ config files
@pytest.mark.parametrize("encoding, bom", [("latin-1", ""), ("utf-16", " (a UTF-16 byte-order mark)")])
def test_a_config_that_is_not_utf8_is_one_line_naming_the_file(encoding, bom, tmp_path, capsys):
    config = tmp_path / "zurich.yaml"
    config.write_bytes("# Zürich\ntrain: {iters: 2}\n".encode(encoding))
    code, err = train_cli(capsys, config, "--work-dir", str(tmp_path / "runs"))
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {config}: not UTF-8 text: byte 0x") and f"{bom}; expected a UTF-8 file" in err[0]
    assert not (tmp_path / "runs").exists()


def test_a_base_that_is_not_a_list_of_paths_is_one_line(tmp_path, capsys):
    config = tmp_path / "leaf.yaml"
    config.write_text("_base_: [1]\n")
    code, err = train_cli(capsys, config, "--work-dir", str(tmp_path / "runs"))
    assert code == 1 and err == [f"error: {config}: `_base_` must be a list of YAML paths, got [1]"]


# ---------------------------------------------------------------------------------------------- train.py
def test_a_full_disk_when_the_run_starts_is_one_line_and_leaves_no_run_folder(synthetic_root, tmp_path, capsys,
                                                                             monkeypatch):
    from rtda.engine import runlog

    def disk_full(cfg, path):
        Path(path).write_text("half a con")  # what a write cut short leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(runlog, "dump_config", disk_full)
    work = tmp_path / "runs"
    code, err = train_cli(capsys, SOURCE_ONLY, *tiny_overrides(synthetic_root), "--work-dir", str(work))
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: ") and "config.yaml: No space left on device (" in err[0] and "MiB free" in err[0]
    assert checksums(work) == {} and list((work / "gta5_bisenet").iterdir()) == []  # the new run folder is removed


def test_a_synthetic_root_that_is_a_symlink_loop_is_one_line_before_generating(tmp_path, capsys):
    loop = symlink_loop(tmp_path)
    code, err = train_cli(capsys, SOURCE_ONLY, *tiny_overrides(loop), "--work-dir", str(tmp_path / "runs"))
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {loop}: a symbolic link that cannot be followed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop_a", "loop_b"]  # no tree generated beside it


# ----------------------------------------------------------------------------------------------- eval.py
def test_ctrl_c_during_eval_is_one_line_and_exit_130(synthetic_root, tmp_path, capsys, monkeypatch):
    import rtda.datasets
    from rtda.evaluation import cli as eval_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread, here while the val set is read

    monkeypatch.setattr(rtda.datasets, "build_dataset", interrupted)
    capsys.readouterr()
    code = eval_cli.main(["--config", str(SOURCE_ONLY), "--checkpoint", str(tmp_path / "best.pt"),
                          *tiny_overrides(synthetic_root)])
    assert code == 130 and lines(capsys.readouterr().err) == ["eval.py: interrupted (Ctrl-C)"]


# ------------------------------------------------------------------------- prepare, generator, outputs
def test_prepare_into_a_cache_under_a_file_or_on_a_full_disk_is_one_line(synthetic_root, tmp_path, capsys,
                                                                        monkeypatch):
    from rtda.datasets.__main__ import main_prepare

    (tmp_path / "a_file").write_text("mine\n")
    before = checksums(tmp_path)
    args = ["--config", str(SOURCE_ONLY), "--workers", "1", "--quiet", *tiny_overrides(synthetic_root)]
    assert main_prepare([*args, f"data.cache={tmp_path / 'a_file' / 'cache'}"]) == 1
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'a_file'}") and "Not a directory" in err[0], err
    assert checksums(tmp_path) == before

    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", disk_full)  # the cache's items are written with os.pwrite
    assert main_prepare([*args, f"data.cache={tmp_path / 'cache'}"]) == 1
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: No space left on device (") and "MiB free" in err[0], err
    assert not list((tmp_path / "cache").rglob("manifest.json"))  # no entry claims to be complete


@pytest.mark.parametrize("where", ["under a file", "symlink loop"])
def test_the_generator_refuses_an_out_under_a_file_or_a_symlink_loop(where, tmp_path, capsys):
    from rtda.datasets.synthetic import main as generate

    (tmp_path / "a_file").write_text("mine\n")
    out = tmp_path / "a_file" / "tree" if where == "under a file" else symlink_loop(tmp_path) / "tree"
    before = checksums(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        generate(["--out", str(out), "--num-source", "1", "--num-target", "1", "--height", "32", "--width", "64"])
    err = lines(capsys.readouterr().err)
    assert exit_.value.code == 2 and err[-1].startswith(f"synthetic.py: error: --out {out}: "), err
    assert ("is a file, expected a folder" if where == "under a file" else "symbolic link that cannot be") in err[-1]
    assert checksums(tmp_path) == before


def test_pseudo_labels_out_under_a_file_is_one_line_before_predicting(tmp_path, capsys):
    from rtda.adapt import pseudo_labels

    (tmp_path / "a_file").write_text("mine\n")
    (tmp_path / "best.pt").write_bytes(b"never read")
    before = checksums(tmp_path)
    out = tmp_path / "a_file" / "pseudo"
    assert pseudo_labels.main(["--config", str(SOURCE_ONLY), "--checkpoint", str(tmp_path / "best.pt"),
                               "--out", str(out)]) == 1
    err = lines(capsys.readouterr().err)
    assert err == [f"error: --out {out}: {tmp_path / 'a_file'} is a file, expected a folder (nothing was written)"]
    assert checksums(tmp_path) == before


def test_export_out_under_a_file_is_one_line(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from rtda.models import build_model, export

    config = tmp_path / "bisenet.yaml"
    config.write_text("model: {name: bisenet, backbone: resnet18, pretrained: none}\n"
                      "data: {val: {name: cityscapes, size: [64, 32]}}\n")
    torch.manual_seed(0)
    save_checkpoint({"iteration": 1, "model": build_model({"name": "bisenet"}).state_dict(), "config_name": "b"},
                    tmp_path / "best.pt")
    (tmp_path / "a_file").write_text("mine\n")
    before = checksums(tmp_path)
    out = tmp_path / "a_file" / "model.onnx"
    capsys.readouterr()
    assert export.main(["--config", str(config), "--checkpoint", str(tmp_path / "best.pt"), "--out", str(out)]) == 1
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: --out {out}: ") and "Not a directory" in err[0], err
    assert checksums(tmp_path) == before
