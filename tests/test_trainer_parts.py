"""The trainer's pieces on their own: the divergence guard, the loss meter, checkpoints of the parts, the
stop flag, and the experiment runners that moved to benchmark.py."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rtda import bench as benchmark
from rtda import engine as train
from rtda.config import load_config
from rtda.models import build_model
from rtda.utils.distributed import Distributed
from rtda.utils.files import load_checkpoint
from rtda.utils.seed import seed_everything

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
SOURCE_ONLY = REPO / "configs" / "synthetic" / "gta5_bisenet.yaml"


def test_loss_meter_averages_since_the_last_pop():
    meter = train.LossMeter()
    meter.update({"seg": torch.tensor(1.0), "adv": torch.tensor(0.5)})
    meter.update({"seg": torch.tensor(3.0), "adv": torch.tensor(1.5)})
    assert meter.pop_means() == {"seg": 2.0, "adv": 1.0}
    meter.update({"seg": torch.tensor(5.0), "adv": torch.tensor(0.0)})
    assert meter.pop_means() == {"seg": 5.0, "adv": 0.0}


def test_divergence_guard_names_the_iteration_and_the_checkpoint(tmp_path):
    cfg = load_config(SOURCE_ONLY)
    model = torch.nn.Linear(2, 2)
    guard = train.DivergenceGuard(cfg, model, tmp_path / "last.pt", torch.device("cpu"))
    guard.update({"seg": torch.tensor(1.0)})
    guard.check(1, weights=True)  # finite: nothing happens
    guard.update({"seg": torch.tensor(math.nan)})
    guard.update({"seg": torch.tensor(1.0)})  # a later finite loss does not clear it
    with pytest.raises(train.TrainingDiverged, match="by iteration 7 .*no checkpoint was written"):
        guard.check(7)

    guard = train.DivergenceGuard(cfg, model, tmp_path / "last.pt", torch.device("cpu"))
    (tmp_path / "last.pt").write_bytes(b"")
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    guard.check(3)  # losses only: weights are not looked at
    with pytest.raises(train.TrainingDiverged, match="last good checkpoint is .*last.pt"):
        guard.check(3, weights=True)


def test_parts_round_trip_through_the_checkpointer(tmp_path):
    cfg = load_config(SOURCE_ONLY, tiny_overrides(tmp_path))
    dist = Distributed()
    seed_everything(0)
    parts = train.build_parts(cfg, dist, max_iters=10)
    parts.optimizer.step()
    parts.scheduler.step()  # state that differs from a fresh build
    checkpointer = train.Checkpointer(cfg, tmp_path, parts, dist)
    progress = train.Progress(iteration=5, best={"mIoU": 12.5, "iteration": 4, "IoU": {}})
    checkpointer.save_last(progress)
    checkpointer.save_weights(checkpointer.best, progress)

    seed_everything(1)
    fresh = train.build_parts(cfg, dist, max_iters=10)
    state = load_checkpoint(checkpointer.last)
    fresh.load_state_dict(state)
    assert state["iteration"] == 5 and state["best"]["mIoU"] == 12.5 and state["config_name"] == cfg.name
    for name, value in parts.model.state_dict().items():
        assert torch.equal(value, fresh.model.state_dict()[name]), name
    assert fresh.scheduler.last_epoch == 1
    best = load_checkpoint(checkpointer.best)
    assert set(best) == {"iteration", "model", "best", "config_name"}  # weights only


def test_stop_request_without_ddp_is_the_flag_itself():
    stop = train.StopRequest()
    assert not stop.agreed(Distributed())
    stop.requested = True
    assert stop.agreed(Distributed())


def test_step_cost_runs_from_benchmark_py(capsys):
    small = ["data.source.size=[64,32]", "data.target.size=[64,32]", "train.batch_size=2"]
    configs = [str(SOURCE_ONLY), str(REPO / "configs" / "synthetic" / "gta5_bisenet_fda_b0.09.yaml")]
    assert benchmark.main(["--step-cost", *configs, "--rounds", "1", "--iters", "1", *small]) == 0
    out = capsys.readouterr().out
    assert "| gta5_bisenet | " in out and "| gta5_bisenet_fda_b0.09 | " in out and "1.00 |" in out


def _parts_and_batches(config: Path, accumulate: int, tmp_path: Path):
    # SGD: its step is linear in the gradient, so equal gradients give equal weights (Adam's first step is about
    # lr * sign(g), which turns float noise in near-zero gradients into whole steps)
    cfg = load_config(config, tiny_overrides(tmp_path, **{"train.batch_size": 4, "train.accumulate": accumulate,
                                                          "train.optimizer": "sgd", "train.lr": 0.01}))
    seed_everything(0)
    parts = train.build_parts(cfg, Distributed(), max_iters=10)
    for module in parts.model.modules():  # per-sample BN (running statistics): micro-batches then add up exactly
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    gen = torch.Generator().manual_seed(0)
    source = benchmark.random_batch((32, 64), 4, cfg.model.num_classes, torch.device("cpu"), True, gen)
    target = benchmark.random_batch((32, 64), 4, cfg.model.num_classes, torch.device("cpu"), False, gen)
    return parts, source, target if parts.strategy.needs_target else None


@pytest.mark.parametrize("config", ["gta5_bisenet", "gta5_bisenet_adv"])
def test_gradient_accumulation_equals_one_big_batch(config, tmp_path):
    path = REPO / "configs" / "synthetic" / f"{config}.yaml"
    results = []
    for accumulate in (1, 2):
        parts, source, target = _parts_and_batches(path, accumulate, tmp_path)
        losses = train.train_step(parts.model, parts.strategy, parts.optimizer, parts.scheduler, source, target,
                                  parts.ctx)
        results.append((parts, losses))
    (big, big_losses), (acc, acc_losses) = results
    assert big_losses.keys() == acc_losses.keys()
    for name in big_losses:
        assert float(acc_losses[name]) == pytest.approx(float(big_losses[name]), rel=1e-4), name
    for (name, a), b in zip(big.model.state_dict().items(), acc.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), name
    # The discriminator: the same accumulated gradient, one Adam step (its parameters are compared through the
    # gradient: Adam's first step is about lr * sign(g), which amplifies float noise where g is near 0).
    for a, b in zip(big.strategy.parameters(), acc.strategy.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-7, rtol=1e-4)
    if config == "gta5_bisenet_adv":
        steps = [int(state["step"]) for state in acc.strategy.d_optimizer.state.values()]
        assert steps and set(steps) == {1}


def test_snapshots_every_keep_every_iterations(tmp_path):
    from rtda.datasets import build_dataset

    root = tmp_path / "data"
    cfg = load_config(SOURCE_ONLY, tiny_overrides(root, **{"train.keep_every": 2}))
    build_dataset(cfg.data.source, cfg, "source")
    run_dir = train.train(cfg, work_dir=tmp_path / "runs")
    snapshots = sorted(p.name for p in (run_dir / "snapshots").iterdir())
    assert snapshots == ["iter_0000002.pt", "iter_0000004.pt"]
    state = load_checkpoint(run_dir / "snapshots" / "iter_0000002.pt")
    assert set(state) == {"iteration", "model", "best", "config_name"} and state["iteration"] == 2


def test_adamw_for_the_daformer_recipes():
    cfg = load_config(REPO / "configs" / "gta5_bisenet_daformer_dacs.yaml", ["model.pretrained=none"])
    optimizer = train.build_optimizer(build_model(cfg.model), cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([6e-5, 6e-4])  # the head at 10x
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.01}


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    from rtda import runs

    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20261202-010203")
    (tmp_path / "gta5_bisenet" / "20261202-010203").mkdir(parents=True)  # taken, as by another process
    dirs = [runs.new_run_dir(tmp_path, "gta5_bisenet") for _ in range(2)]
    assert [d.name for d in dirs] == ["20261202-010203-1", "20261202-010203-2"] and all(d.is_dir() for d in dirs)


def test_snapshot_names_round_trip_through_the_run_format(tmp_path):
    from rtda import runs

    paths = [runs.snapshot_path(tmp_path, it) for it in (1000, 20, 300)]
    assert paths[1] == tmp_path / "snapshots" / "iter_0000020.pt"
    for path in paths:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    (tmp_path / "snapshots" / "notes.pt").write_bytes(b"")  # not a snapshot name: ignored
    assert runs.snapshots(tmp_path) == [(20, paths[1]), (300, paths[2]), (1000, paths[0])]
    assert runs.snapshot_iteration(paths[0]) == 1000 and runs.snapshot_iteration(tmp_path / "last.pt") is None


def test_resume_auto_looks_at_the_newest_run_only(tmp_path):
    from rtda import runs

    assert runs.newest_unfinished_run(tmp_path, "cfg") == (None, f"no run of cfg in {tmp_path}")
    old, new = tmp_path / "cfg" / "20261201-000000", tmp_path / "cfg" / "20261202-000000"
    for run in (old, new):
        run.mkdir(parents=True)
        (run / "last.pt").write_bytes(b"")
    assert runs.newest_unfinished_run(tmp_path, "cfg") == (new / "last.pt", "")
    runs.write_metrics(new, {"iterations": 2})
    last, reason = runs.newest_unfinished_run(tmp_path, "cfg")
    assert last is None and reason.startswith(f"the newest run {new} is finished")
    assert runs.read_metrics(new) == {"iterations": 2}
