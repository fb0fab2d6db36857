"""Nothing lost, one line per mistake (issue 15): safe resume, stops that save, errors before the first step.

Each CLI case asserts the one-line message, the exit code, and that no file outside a new run folder changed
(checksums of the whole work folder and data before and after)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rtda import engine as train
from rtda.config import load_config
from rtda.datasets.samplers import EpochSampler
from rtda.utils.files import load_checkpoint

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
SOURCE_ONLY = REPO / "configs" / "synthetic" / "gta5_bisenet.yaml"
DACS = REPO / "configs" / "synthetic" / "gta5_bisenet_dacs.yaml"
FDA = REPO / "configs" / "synthetic" / "gta5_bisenet_fda_b0.09.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def data_root(synthetic_root) -> Path:
    return synthetic_root  # read only here: tests that break a file copy the tree first


def checksums(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders if folder.exists() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, config: Path, *args: str) -> tuple[int, list[str], str]:
    """Exit code, the non-empty lines of stderr (the progress bar aside), and stdout."""
    capsys.readouterr()  # what earlier steps of the test printed
    code = train.main(["--config", str(config), *args])
    out, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.strip() and "%|" not in line], out


def finished_run(data_root: Path, work: Path, config: Path = SOURCE_ONLY, **extra) -> Path:
    return train.train(load_config(config, tiny_overrides(data_root, **{"train.iters": 2, **extra})), work_dir=work)


def unfinished_run(data_root: Path, work: Path, config: Path = SOURCE_ONLY, **extra) -> Path:
    """A run stopped by train.max_wall_time after its first iteration: last.pt at iteration 1, no metrics.json."""
    run_dir = train.train(load_config(config, tiny_overrides(data_root, **{"train.iters": 4,
                                                                           "train.max_wall_time": 1e-6, **extra})),
                          work_dir=work)
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 1
    assert not (run_dir / "metrics.json").exists()
    return run_dir


# ------------------------------------------------------------------------------------------- resume
def test_resume_auto_never_continues_an_older_or_finished_run(data_root, tmp_path, capsys):
    work = tmp_path / "runs"
    done = finished_run(data_root, work)
    killed = work / "gta5_bisenet" / "29990101-000000"  # what a run killed before its first checkpoint leaves
    killed.mkdir()
    (killed / "config.yaml").write_text((done / "config.yaml").read_text())
    before = checksums(work)
    code, _, out = run_cli(capsys, SOURCE_ONLY, *tiny_overrides(data_root, **{"train.iters": 4}),
                           "--work-dir", str(work), "--resume", "auto")
    assert code == 0
    assert f"the newest run {killed} has no last.pt" in out and "starting a new run" in out
    after = checksums(work)
    assert {k: v for k, v in after.items() if k in before} == before  # the finished run is untouched
    new_runs = sorted(set(p.parent for p in map(Path, after)) - set(p.parent for p in map(Path, before)))
    assert len(new_runs) == 1 and new_runs[0].parent == work / "gta5_bisenet"


def test_resume_auto_after_a_finished_newest_run_starts_a_new_one(data_root, tmp_path, capsys):
    work = tmp_path / "runs"
    done = finished_run(data_root, work)
    before = checksums(work)
    cfg = load_config(SOURCE_ONLY, tiny_overrides(data_root, **{"train.iters": 2}))
    run_dir = train.train(cfg, work_dir=work, resume="auto")
    assert run_dir != done and "is finished" in capsys.readouterr().out
    assert {k: v for k, v in checksums(work).items() if k in before} == before


def test_resume_with_other_learning_keys_stops_with_one_line_and_changes_nothing(data_root, tmp_path, capsys):
    work = tmp_path / "runs"
    run_dir = unfinished_run(data_root, work)
    before = checksums(work, data_root)
    code, err, _ = run_cli(capsys, SOURCE_ONLY, *tiny_overrides(data_root, **{"train.iters": 40, "train.lr": 0.5}),
                        "--work-dir", str(work), "--resume", "auto")
    assert code == 1 and len(err) == 1
    assert "train.lr: 0.002 in the run, 0.5 now" in err[0] and "train.iters: 4 in the run, 40 now" in err[0]
    assert "--apply-changes" in err[0]
    assert checksums(work, data_root) == before

    code, err, _ = run_cli(capsys, SOURCE_ONLY, *tiny_overrides(data_root, **{"train.iters": 0}),
                        "--work-dir", str(work), "--resume", str(run_dir / "last.pt"))
    assert code == 1 and len(err) == 1 and "`train.iters` = 0 is out of range" in err[0]
    assert checksums(work, data_root) == before


def test_apply_changes_recomputes_the_schedule_and_logs_the_change(data_root, tmp_path, capsys):
    work = tmp_path / "runs"
    run_dir = unfinished_run(data_root, work)
    cfg = load_config(SOURCE_ONLY, tiny_overrides(data_root, **{"train.iters": 6, "train.lr": 0.5,
                                                                "train.max_wall_time": 1e-6}))  # one more step
    train.train(cfg, work_dir=work, resume="auto", apply_changes=True)
    log = [json.loads(line) for line in (run_dir / "resume_log.jsonl").read_text().splitlines()]
    assert log[0]["iteration"] == 1 and log[0]["changes"]["train.lr"] == [0.002, 0.5]
    assert log[0]["changes"]["train.iters"] == [4, 6]
    assert load_config(run_dir / "config.yaml").train.lr == 0.5
    state = load_checkpoint(run_dir / "last.pt")
    backbone = state["optimizer"]["param_groups"][0]
    assert backbone["initial_lr"] == 0.5 and state["iteration"] == 2
    assert backbone["lr"] == pytest.approx(0.5 * (1 - 2 / 6) ** 0.9)  # the new base and horizon at iteration 2


@pytest.mark.parametrize("case", ["best", "model", "strategy"])
def test_resume_from_the_wrong_checkpoint_names_what_it_holds(case, data_root, tmp_path, capsys):
    work = tmp_path / "runs"
    if case == "best":
        checkpoint, config, extra = finished_run(data_root, work) / "best.pt", SOURCE_ONLY, {}
        expected = "holds weights only (bisenet/resnet18 with 19 classes, strategy none, at iteration 2)"
    elif case == "model":
        checkpoint, config = unfinished_run(data_root, work) / "last.pt", SOURCE_ONLY
        extra = {"model.name": "deeplabv2", "model.backbone": "resnet101"}
        expected = "holds bisenet/resnet18 with 19 classes, strategy none, at iteration 1"
    else:
        checkpoint, config, extra = unfinished_run(data_root, work) / "last.pt", FDA, {}
        expected = "holds bisenet/resnet18 with 19 classes, strategy none, at iteration 1"
    before = checksums(work)
    code, err, _ = run_cli(capsys, config, *tiny_overrides(data_root, **extra), "--work-dir", str(work),
                        "--resume", str(checkpoint))
    assert code == 1 and len(err) == 1 and expected in err[0], err
    assert checksums(work) == before


# --------------------------------------------------------------------------- one line before the first step
BAD = {
    "iters 0": ({"train.iters": 0}, "`train.iters` = 0 is out of range"),
    "batch 0": ({"train.batch_size": 0}, "`train.batch_size` = 0 is out of range"),
    "eval batch 0": ({"eval.batch_size": 0}, "`eval.batch_size` = 0 is out of range"),
    "log interval 0": ({"train.log_interval": 0}, "`train.log_interval` = 0 is out of range"),
    "checkpoint interval -1": ({"train.checkpoint_interval": -1}, "`train.checkpoint_interval` = -1 is out of range"),
    "negative lr": ({"train.lr": -0.1}, "`train.lr` = -0.1 is out of range"),
    "bisenet batch 1": ({"train.batch_size": 1}, "bisenet trains on at least 2 images"),
    "aux head on bisenet": ({"model.aux_head": "true"}, "model.aux_head is a DeepLabV2 option"),
    "pretrained not a state dict": ({"model.pretrained": "NOT_A_STATE_DICT"}, "not a readable PyTorch state dict"),
    "accumulate not dividing": ({"train.accumulate": 3}, "not divisible by train.accumulate = 3"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_leaves_no_run_folder(case, data_root, tmp_path, capsys):
    overrides, expected = BAD[case]
    if overrides.get("model.pretrained") == "NOT_A_STATE_DICT":
        (tmp_path / "weights.pth").write_text("not torch")
        overrides = {"model.pretrained": tmp_path / "weights.pth"}
    work = tmp_path / "runs"
    before = checksums(data_root)
    code, err, _ = run_cli(capsys, SOURCE_ONLY, *tiny_overrides(data_root, **overrides), "--work-dir", str(work))
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not work.exists() or not any(work.rglob("*")), "a failed start left files behind"
    assert checksums(data_root) == before


def test_dacs_with_different_sizes_and_fda_with_an_empty_band(data_root, tmp_path, capsys):
    code, err, _ = run_cli(capsys, DACS, *tiny_overrides(data_root, **{"data.target.size": "[64,32]"}),
                        "--work-dir", str(tmp_path / "runs"))
    assert code == 1 and len(err) == 1 and "must be equal, or set adapt.crop" in err[0]
    code, err, _ = run_cli(capsys, FDA, *tiny_overrides(data_root, **{"adapt.beta": 0.01}),
                        "--work-dir", str(tmp_path / "runs"))
    assert code == 1 and len(err) == 1 and "adapt.beta = 0.01: its band" in err[0] and "128x64" in err[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_imagenet_weights_offline_is_one_line(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code, err, _ = run_cli(capsys, SOURCE_ONLY, *tiny_overrides(data_root, **{"model.pretrained": "imagenet"}),
                        "--work-dir", str(tmp_path / "runs"))
    assert code == 1 and len(err) == 1 and "could not get the torchvision resnet18 weights" in err[0]


def test_work_dir_that_is_a_file_is_refused(data_root, tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("my notes")
    code, err, _ = run_cli(capsys, SOURCE_ONLY, *tiny_overrides(data_root), "--work-dir", str(blocker / "sub"))
    assert code == 1 and len(err) == 1 and "is a file, expected a folder" in err[0]
    assert blocker.read_text() == "my notes"


def test_duplicate_yaml_key_names_both_lines(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("train:\n  lr: 0.1\n  iters: 5\n  lr: 0.2\n")
    with pytest.raises(ValueError, match=r"key `lr` appears twice in one section \(lines 2 and 4\)"):
        load_config(config)


# ----------------------------------------------------------------------------------- stops that save
def test_data_error_mid_run_saves_last_and_is_one_line(data_root, tmp_path):
    """A label broken after the pre-flight check, read by a DataLoader worker at iteration >= 1."""
    from rtda.datasets import build_dataset

    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(data_root), str(data)], check=True)
    overrides = tiny_overrides(data, **{"train.iters": 6, "train.workers": 1, "train.checkpoint_interval": 1000})
    cfg = load_config(SOURCE_ONLY, overrides)
    source = build_dataset(cfg.data.source, cfg, "source")
    order = list(EpochSampler(len(source), cfg.seed))
    broken = source.labels[order[2]]  # in the second batch of the first epoch
    raw = bytearray(broken.read_bytes())  # headers and end chunk intact (the pre-flight check passes), pixels not
    start = raw.index(b"IDAT") + 6
    raw[start:start + 24] = bytes(range(24))
    broken.write_bytes(bytes(raw))
    work = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "train.py", "--config", str(SOURCE_ONLY), *overrides,
                           "--work-dir", str(work)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    err = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("  0%", "\r"))]
    assert proc.returncode == 1
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and str(broken) in errors[0] and "at iteration 1" in errors[0], proc.stderr
    assert "python -m rtda.datasets --config" in proc.stderr and "--check" in proc.stderr
    assert "Traceback" not in proc.stderr
    (last,) = work.glob("gta5_bisenet/*/last.pt")
    assert load_checkpoint(last)["iteration"] == 1


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_and_exits_with_its_code(sig, code, data_root, tmp_path):
    work = tmp_path / "runs"
    overrides = tiny_overrides(data_root, **{"train.iters": 200, "train.checkpoint_interval": 1000})
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(SOURCE_ONLY), *overrides,
                             "--work-dir", str(work)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # the run has started once it prints its folder
        if line.startswith("run folder:"):
            break
    time.sleep(0.5)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code
    (last,) = work.glob("gta5_bisenet/*/last.pt")
    assert 1 <= load_checkpoint(last)["iteration"] < 200


KILL_DURING_SAVE = """
import sys, time, torch
real_save, saves = torch.save, []
def save(obj, handle, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:  # the second last.pt: die with half a file written
        handle.write(b"half a checkpoint")
        handle.flush()
        print("SAVING", flush=True)
        time.sleep(300)
    return real_save(obj, handle, *args, **kwargs)
torch.save = save
from rtda import engine as train
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigkill_during_a_save_then_resume_is_bit_exact(data_root, tmp_path):
    overrides = tiny_overrides(data_root, **{"train.iters": 6})
    reference = train.train(load_config(SOURCE_ONLY, overrides), work_dir=tmp_path / "straight")
    work = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, "--config", str(SOURCE_ONLY), *overrides,
                             "--work-dir", str(work)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.strip() == "SAVING":
            break
    proc.kill()
    proc.wait()
    (run_dir,) = work.glob("gta5_bisenet/*")
    assert list(run_dir.glob(".last.pt.*.tmp")), "the kill did not land inside the save"
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 2  # the previous file is intact

    resumed = train.train(load_config(SOURCE_ONLY, overrides), work_dir=work, resume="auto")
    assert resumed == run_dir and not list(run_dir.glob(".last.pt.*.tmp"))  # the stale temporary is gone
    expected, got = (load_checkpoint(r / "last.pt")["model"] for r in (reference, resumed))
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_max_wall_time_stops_with_last_saved_and_resume_auto_finishes(data_root, tmp_path):
    work = tmp_path / "runs"
    run_dir = unfinished_run(data_root, work)
    resumed = train.train(load_config(SOURCE_ONLY, tiny_overrides(data_root, **{"train.iters": 4})), work_dir=work,
                          resume="auto")
    assert resumed == run_dir and json.loads((run_dir / "metrics.json").read_text())["iterations"] == 4


def test_resume_with_another_data_cache_folder_carries_on(data_root, tmp_path):
    # The cache gives byte-identical items, and Colab/Kaggle users set it per session: not a learning difference
    work = tmp_path / "runs"
    run_dir = unfinished_run(data_root, work)
    cfg = load_config(SOURCE_ONLY, tiny_overrides(data_root, **{"data.cache": tmp_path / "session2_cache"}))
    assert train.train(cfg, work_dir=work, resume="auto") == run_dir
    assert json.loads((run_dir / "metrics.json").read_text())["iterations"] == 4


def test_a_truncated_label_is_found_before_the_first_step(data_root, tmp_path, capsys):
    """The pre-flight check reads every file's header and end chunk: a cut file fails in seconds, not hours in."""
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(data_root), str(data)], check=True)
    broken = sorted((data / "GTA5" / "labels").glob("*.png"))[-1]
    broken.write_bytes(broken.read_bytes()[:-20])
    work = tmp_path / "runs"
    code, err, _ = run_cli(capsys, SOURCE_ONLY, *tiny_overrides(data), "--work-dir", str(work))
    assert code == 1 and err[0].startswith("error: ") and str(broken) in err[0] and "truncated" in err[0]
    assert "python -m rtda.datasets --config" in err[1] and "--check" in err[1]
    assert not work.exists() or not any(work.rglob("*"))


@pytest.mark.parametrize("flag", ["--save-predictions", "--out"])
def test_eval_output_that_is_a_file_is_refused(flag, tmp_path, capsys):
    from rtda import evaluation as evaluator

    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    with pytest.raises(SystemExit) as stop:
        evaluator.main(["--config", str(SOURCE_ONLY), "--checkpoint", str(tmp_path / "x.pt"), flag, str(blocker)])
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(err) == 1 and "is a file, expected a folder" in err[0]
    assert blocker.read_text() == "keep me"
