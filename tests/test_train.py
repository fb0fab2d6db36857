"""The trainer end to end on tiny synthetic domains: run folder, both models, resume exactness, faults, 2-process gloo."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rtda.config import load_config
from rtda.datasets.samplers import EpochSampler
from rtda.engine import TrainingDiverged, train
from rtda.utils.files import CheckpointError, load_checkpoint, save_checkpoint
from rtda.utils.seed import rng_state, seed_everything, set_rng_state

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
SOURCE_ONLY = REPO / "configs" / "synthetic" / "gta5_bisenet.yaml"


ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def final_weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "last.pt")["model"]


def test_bisenet_run_folder_and_metrics(synthetic_root, tmp_path):
    cfg = load_config(SOURCE_ONLY, tiny_overrides(synthetic_root, **{"train.eval_interval": 2}))
    run_dir = train(cfg, work_dir=tmp_path)
    assert run_dir.parent == tmp_path / "gta5_bisenet"
    assert load_config(run_dir / "config.yaml") == cfg  # the resolved config, readable again
    assert list(run_dir.glob("events.out.tfevents.*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config_name"] == "gta5_bisenet" and metrics["synthetic"] is True
    assert (metrics["model"], metrics["backbone"], metrics["adapt"]) == ("bisenet", "resnet18", "none")
    assert metrics["iterations"] == 4 and metrics["wall_time_s"] > 0
    assert len(metrics["classes"]) == 19 and metrics["classes"][0] == "road"
    assert set(metrics["final"]["IoU"]) == set(metrics["classes"])
    assert 0 <= metrics["final"]["mIoU"] <= 100
    assert metrics["best"]["iteration"] in (2, 4) and metrics["best"]["mIoU"] >= metrics["final"]["mIoU"]
    best, last = (load_checkpoint(run_dir / n) for n in ("best.pt", "last.pt"))
    assert last["iteration"] == 4 and best["iteration"] == metrics["best"]["iteration"]
    assert set(last) >= {"model", "optimizer", "scheduler", "scaler", "strategy", "rng", "best"}
    # the poly schedule reached its last step: lr = base * (1 - 3/4) ** 0.9 during the last iteration
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0)


def test_deeplabv2_one_iteration(synthetic_root, tmp_path):
    cfg = load_config(REPO / "configs" / "synthetic" / "gta5_bisenet.yaml", tiny_overrides(
        synthetic_root, **{"model.name": "deeplabv2", "model.backbone": "resnet101", "model.freeze_bn": "true",
                           "train.iters": 1, "train.lr": 2.5e-4, "train.head_lr_mult": 10,
                           "data.source.size": "[64,32]", "data.val.size": "[64,32]"}))
    run_dir = train(cfg, work_dir=tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "deeplabv2" and metrics["iterations"] == 1
    optimizer = load_checkpoint(run_dir / "last.pt")["optimizer"]
    lrs = [group["initial_lr"] for group in optimizer["param_groups"]]
    assert lrs == pytest.approx([2.5e-4, 2.5e-3])  # the head learns 10x faster


def test_sigkill_and_resume_gives_the_same_weights(synthetic_root, tmp_path):
    overrides = tiny_overrides(synthetic_root, **{"train.iters": 8})
    reference = train(load_config(SOURCE_ONLY, overrides), work_dir=tmp_path / "straight")

    work_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(SOURCE_ONLY), *overrides,
                             "--work-dir", str(work_dir)], cwd=REPO, env=ONE_THREAD_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(work_dir.glob("gta5_bisenet/*/last.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (checkpoint,) = work_dir.glob("gta5_bisenet/*/last.pt")
    assert load_checkpoint(checkpoint)["iteration"] < 8, "the run finished before it could be killed"

    resumed = train(load_config(SOURCE_ONLY, overrides), work_dir=work_dir, resume="auto")
    assert resumed == checkpoint.parent
    expected, got = final_weights(reference), final_weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_ctrl_c_saves_last_and_stops_cleanly(synthetic_root, tmp_path, monkeypatch, capsys):
    from rtda import adapt

    original = adapt.SourceOnly.training_step

    def interrupted_step(self, model, source, target, ctx):
        if ctx.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to the trainer's handler
        return original(self, model, source, target, ctx)

    monkeypatch.setattr(adapt.SourceOnly, "training_step", interrupted_step)
    cfg = load_config(SOURCE_ONLY, tiny_overrides(synthetic_root, **{"train.iters": 50,
                                                                    "train.checkpoint_interval": 1000}))
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run in the background (nohup ... &)
    run_dir = train(cfg, work_dir=tmp_path)
    assert "stopped at iteration 3" in capsys.readouterr().out
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 3
    assert not (run_dir / "metrics.json").exists()  # an unfinished run has no final metrics
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_root, tmp_path):
    cfg = load_config(SOURCE_ONLY, tiny_overrides(synthetic_root, **{
        "train.lr": 1e30, "train.iters": 20, "train.log_interval": 1, "train.checkpoint_interval": 1}))
    with pytest.raises(TrainingDiverged, match="NaN/inf by iteration"):
        train(cfg, work_dir=tmp_path)
    (checkpoint,) = tmp_path.glob("gta5_bisenet/*/last.pt")
    state = load_checkpoint(checkpoint)
    assert state["iteration"] < 20
    assert all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point())
    assert not list(checkpoint.parent.glob("metrics.json"))


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),  # the OS's word for it
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")])
def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    path = tmp_path / "last.pt"
    save_checkpoint({"iteration": 1, "w": torch.ones(3)}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise failure  # torch's zip writer says "unexpected pos" when the disk fills under it

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: could not write the checkpoint "
                                                      r"\(.+\); \d+ MiB free in .+; the previous last\.pt is "
                                                      r"untouched") as caught:
        save_checkpoint({"iteration": 2, "w": torch.zeros(3)}, path)
    assert caught.value.__cause__ is failure
    with pytest.raises(CheckpointError, match="no earlier one was written"):
        save_checkpoint({"iteration": 2}, tmp_path / "best.pt")
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_epoch_sampler_shards_and_skips():
    full = list(EpochSampler(10, seed=3))
    assert sorted(full) == list(range(10))
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != full  # a new order each epoch
    sampler.set_epoch(0, skip=4)
    assert list(sampler) == full[4:]
    shards = [list(EpochSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 3 for s in shards) and len(set(sum(shards, []))) == 9


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    seed_everything(5)
    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    seed_everything(6)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_two_processes_with_gloo(synthetic_root, tmp_path):
    # batch 4 = 2 per process (BiSeNet's global-pool BN needs 2 samples)
    overrides = tiny_overrides(synthetic_root, **{"train.iters": 2, "train.batch_size": 4})
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train.py", "--config", str(SOURCE_ONLY), *overrides, "--work-dir", str(tmp_path)],
                            cwd=REPO, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (run_dir,) = tmp_path.glob("gta5_bisenet/*")  # rank 0 alone made a run folder
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["iterations"] == 2
    state = load_checkpoint(run_dir / "last.pt")
    assert len(state["rng"]) == 2  # both ranks' RNG states


TERM_RANK_1 = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from rtda import adapt, engine
original = adapt.SourceOnly.training_step
def step(self, model, source, target, ctx):
    if ctx.iteration == 3 and os.environ["RANK"] == "1":  # a SIGTERM to one rank mid-run (SLURM's, or a kill)
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, model, source, target, ctx)
adapt.SourceOnly.training_step = step
sys.exit(engine.main(sys.argv[1:]))
"""


def test_sigterm_to_one_rank_stops_every_rank_an_iteration_later(synthetic_root, tmp_path):
    # log_interval and checkpoint_interval far beyond the run: the stop must not wait for either
    overrides = tiny_overrides(synthetic_root, **{"train.iters": 40, "train.batch_size": 4, "train.log_interval": 100,
                                                  "train.checkpoint_interval": 100, "train.eval_interval": 100})
    script = tmp_path / "term_rank_1.py"
    script.write_text(TERM_RANK_1.format(repo=str(REPO)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), "--config", str(SOURCE_ONLY), *overrides, "--work-dir",
                             str(tmp_path / "runs")], cwd=REPO, env=ONE_THREAD_ENV, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    # both ranks exited 143, neither with a traceback (torchrun's failure report lists each rank's exit code, under
    # the one traceback torchrun prints itself, of its ChildFailedError)
    assert re.findall(r"exitcode\s+: (-?\d+)", output) == ["143", "143"], output[-3000:]
    assert output.count("Traceback") == 1 and "ChildFailedError" in output
    (run_dir,) = (tmp_path / "runs").glob("gta5_bisenet/*")
    assert "stopped at iteration 5;" in output  # requested during iteration 4, agreed after iteration 5
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 5
    assert not (run_dir / "metrics.json").exists()
