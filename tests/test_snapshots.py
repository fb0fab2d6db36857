"""eval.py --run-dir: every snapshot of a run folder (and last.pt) scored in iteration order, the curve printed."""
from __future__ import annotations

import json

import pytest
import torch

from rtda import evaluation as evaluator
from rtda.config import dump_config, load_config
from rtda.models import build_model
from rtda.utils.files import save_checkpoint

from conftest import tiny_overrides
from test_train import SOURCE_ONLY


def write_run(root, cfg, iterations: list[int], last: int | None):
    """A run folder as the trainer leaves it with train.keep_every: config.yaml, snapshots/iter_NNNNNNN.pt, last.pt."""
    run = root / "gta5_bisenet" / "20260101-000000"
    run.mkdir(parents=True)
    dump_config(cfg, run / "config.yaml")
    for it in iterations:
        torch.manual_seed(it)  # different weights per snapshot
        save_checkpoint({"iteration": it, "model": build_model(cfg.model).state_dict(),
                                 "config_name": cfg.name}, run / "snapshots" / f"iter_{it:07d}.pt")
    if last is not None:
        torch.manual_seed(last)
        save_checkpoint({"iteration": last, "model": build_model(cfg.model).state_dict(), "optimizer": {},
                                 "config_name": cfg.name}, run / "last.pt")
    return run


def test_every_snapshot_is_scored_in_iteration_order(synthetic_root, tmp_path, capsys):
    cfg = load_config(SOURCE_ONLY, tiny_overrides(synthetic_root))
    run = write_run(tmp_path, cfg, [20, 3, 10], last=25)  # written out of order on purpose
    assert evaluator.main(["--run-dir", str(run)]) == 0  # the config defaults to RUN/config.yaml
    printed = capsys.readouterr().out
    lines = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in lines] == ["3", "10", "20", "25"]
    assert [row[1] for row in lines] == ["snapshots/iter_0000003.pt", "snapshots/iter_0000010.pt",
                                         "snapshots/iter_0000020.pt", "last.pt"]
    assert "<- best" in printed and "best: iteration" in printed
    curve = json.loads((run / "snapshot_miou.json").read_text())
    assert [r["iteration"] for r in curve["snapshots"]] == [3, 10, 20, 25]
    assert curve["best"]["mIoU"] == max(r["mIoU"] for r in curve["snapshots"])
    assert set(curve["snapshots"][0]["IoU"]) == set(curve["classes"]) and curve["config_name"] == "gta5_bisenet"
    # each snapshot is scored like `eval.py --checkpoint` scores it
    assert evaluator.main(["--config", str(run / "config.yaml"), "--checkpoint",
                           str(run / "snapshots" / "iter_0000010.pt")]) == 0
    single = capsys.readouterr().out
    assert f"{curve['snapshots'][1]['mIoU']:.2f}" in single.splitlines()[-1]


def test_last_at_a_snapshot_iteration_is_scored_once_and_broken_files_are_skipped(synthetic_root, tmp_path, capsys):
    cfg = load_config(SOURCE_ONLY, tiny_overrides(synthetic_root))
    run = write_run(tmp_path, cfg, [2, 4], last=None)
    save_checkpoint({"iteration": 4, "model": build_model(cfg.model).state_dict()}, run / "last.pt")
    (run / "snapshots" / "iter_0000003.pt").write_bytes(b"not a checkpoint")
    assert evaluator.main(["--run-dir", str(run), "--config", str(SOURCE_ONLY), *tiny_overrides(synthetic_root)]) == 0
    captured = capsys.readouterr()
    assert "skipped:" in captured.err and "iter_0000003.pt" in captured.err
    curve = json.loads((run / "snapshot_miou.json").read_text())
    assert [r["iteration"] for r in curve["snapshots"]] == [2, 4]
    assert curve["snapshots"][1]["also"] == "last.pt" and curve["skipped"] == [str(run / "snapshots" / "iter_0000003.pt")]


def test_run_without_snapshots_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: bisenet}\n")
    assert evaluator.main(["--run-dir", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.keep_every" in err
    assert evaluator.main(["--run-dir", str(tmp_path / "absent")]) == 1
    assert "absent: run folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluator.parse_args(["--run-dir", str(run), "--checkpoint", "x.pt"])
