"""`benchmark.py zoo` (every network's forms timed in one run) and the synthetic per-network table's outputs."""
from __future__ import annotations

import json

from rtda.bench import cli as benchmark
from rtda.experiments import zoo_table

CONFIG = "configs/cityscapes_bisenet.yaml"


def test_zoo_times_every_network_and_form_in_one_run_and_reports_ratios(capsys, tmp_path):
    args = ["zoo", "--configs", CONFIG, CONFIG, "--size", "32x64", "--iters", "2", "--warmup", "0",
            "--forms", "eager,deploy", "--device", "cpu"]
    assert benchmark.main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["BiSeNet-R18", "BiSeNet-R18 (cityscapes_bisenet)"]  # the same network twice, told apart
    for row in result["rows"]:
        assert row["parity"] == {"eager": 1.0, "deploy": 1.0} and row["params_m"] > 10
        assert set(result["latency"][row["label"]]) == {"eager", "deploy"}
        assert all(s["iters"] == 2 for s in result["latency"][row["label"]].values())
    (tmp_path / "zoo.json").write_text(json.dumps(result))
    latency = zoo_table.read_latency(tmp_path / "zoo.json")
    assert latency["cityscapes_bisenet"]["form"] == "deploy" and latency["cityscapes_bisenet"]["ms"] > 0
    assert benchmark.main(args) == 0
    printed = capsys.readouterr().out
    assert "| BiSeNet-R18 | 12." in printed and "1.00x |" in printed


def test_zoo_table_rows_gains_and_plot(tmp_path):
    assert zoo_table.zoo_runs(0)[:3] == [("gta5_bisenet", 0, []), ("gta5_bisenet_dacs", 0, []),
                                         ("oracle_bisenet", 0, [])]

    def metrics(miou):
        return {"final": {"mIoU": miou}, "wall_time_s": 10.0}

    results = {("gta5_bisenet", 0): metrics(20.0), ("gta5_bisenet_dacs", 0): metrics(30.0),
               ("oracle_bisenet", 0): metrics(60.0), ("gta5_stdc1", 0): metrics(15.0)}
    latency = {"cityscapes_bisenet": {"label": "BiSeNet-R18", "form": "deploy", "ms": 250.0, "params_m": 12.05,
                                      "size": [512, 1024], "device": "cpu"}}
    zoo_table.write_outputs(tmp_path, results, 0, latency)
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[2] == "| BiSeNet-R18 | 12.05 | 250 | 20.0 | 30.0 | 60.0 | +10.0 | 25% | 30 |"
    assert lines[3] == "| stdc1 |  |  | 15.0 |  |  |  |  | 10 |"  # a network half-way: what finished
    assert "SYNTHETIC" in lines[-1] and "seed 0 only" in lines[-1]
    assert (tmp_path / "miou_latency.png").stat().st_size > 1000
