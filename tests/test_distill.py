"""Distillation of a frozen teacher (`adapt.name: distill`): the KD term against a hand computation, the teacher
frozen and out of the student's checkpoint, its input size and flip, the mix and cached-label options, and the
one-line refusals (missing teacher, other classes, another teacher file on resume)."""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from rtda import adapt
from rtda.adapt import distill, mixing
from rtda.config import ConfigError, from_dict, load_config
from rtda.models import build_untrained
from rtda.utils.files import CheckpointError, file_sha256, load_checkpoint

from conftest import tiny_overrides
from test_adapt import C, FakeContext, KeyRecorder, TinyNet, batches

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_DISTILL = REPO / "configs" / "synthetic" / "gta5_bisenet_distill.yaml"


# ------------------------------------------------------------------------------------------------ KD term
def test_kd_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    T = 2.0
    total = 0.0
    for b in range(2):
        for y in range(2):
            for x in range(2):
                zs = [math.exp(v / T) for v in student[b, :, y, x].tolist()]
                zt = [math.exp(v / T) for v in teacher[b, :, y, x].tolist()]
                ps, pt = [z / sum(zs) for z in zs], [z / sum(zt) for z in zt]
                total += sum(q * math.log(q / p) for q, p in zip(pt, ps))
    expected = T * T * total / 8
    got = distill.kd_loss(student, (teacher / T).softmax(1), T)
    assert got.dtype == torch.float32 and abs(got.item() - expected) < 1e-5
    assert distill.kd_loss(teacher, (teacher / T).softmax(1), T).abs() < 1e-6  # the teacher itself: KL 0


# ------------------------------------------------------------------------------------------- fixtures
def write_teacher(tmp_path: Path, classes: int = C, size=(32, 16), seed: int = 0, name: str = "teacher"):
    """A teacher config (BiSeNet-R18 from scratch, target read at `size`) and a state-dict checkpoint of it."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "bisenet", "backbone": "resnet18", "pretrained": "none",
                                                "num_classes": classes},
                                      "data": {"target": {"size": list(size)}}}))
    torch.manual_seed(seed)
    model = build_untrained(load_config(config).model)
    checkpoint = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


def distill_cfg(config, checkpoint, flip=False, **adapt_keys):
    return from_dict({"model": {"num_classes": C, "aux_weight": 0.1},
                      "adapt": {"name": "distill", "teacher": {"config": str(config), "checkpoint": str(checkpoint),
                                                               "flip": flip}, **adapt_keys},
                      "data": {"source": {"size": [32, 16]}, "target": {"size": [32, 16]}}})


# ------------------------------------------------------------------------------- the teacher, frozen
def test_the_teacher_gets_no_gradient_and_keeps_its_weights(tmp_path):
    config, checkpoint = write_teacher(tmp_path)
    cfg = distill_cfg(config, checkpoint, kd_lambda=0.5, kd_temperature=2.0, mix=True)
    model = TinyNet()
    strategy = adapt.build_strategy(cfg, model)
    teacher = strategy.teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any(k for k in strategy.state_dict() if k != "_extra_state")  # the teacher is not checkpointed
    assert strategy.state_dict()["_extra_state"] == {"teacher_checkpoint": str(checkpoint),
                                                     "teacher_sha256": file_sha256(checkpoint)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for iteration in range(2):
        source, target = batches(seed=iteration)
        ctx = FakeContext(iteration=iteration, watch={"student": model, "teacher": teacher})
        losses = strategy.training_step(model, source, target, ctx)
        optimizer.step()
        assert set(losses) == {"seg", "pseudo", "pseudo_weight", "kd", "mix"}
        assert all(not v.requires_grad for v in losses.values())
        assert all(reached == {"student"} for reached in ctx.reached)  # three backward calls, none into the teacher
    assert all(p.grad is None for p in teacher.parameters())
    saved = torch.load(checkpoint)
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())


def test_the_teacher_reads_the_target_at_its_own_size_and_labels_at_the_student_size(tmp_path):
    config, checkpoint = write_teacher(tmp_path, size=(64, 32))  # twice the student's 32x16
    strategy = adapt.build_strategy(distill_cfg(config, checkpoint), TinyNet())
    seen = []
    strategy.teacher.model.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[-2:]))
    _, target = batches()
    pseudo, probs_t, weight = strategy._teacher_labels(target, FakeContext())
    assert seen == [(32, 64)] and pseudo.shape == (2, 16, 32) and probs_t.shape == (2, C, 16, 32)
    assert 0 <= weight.item() <= 1


def test_flip_averages_the_softmax_of_the_image_and_of_its_flip(tmp_path):
    config, checkpoint = write_teacher(tmp_path)
    strategy = adapt.build_strategy(distill_cfg(config, checkpoint, flip=True), TinyNet())
    teacher = strategy.teacher
    _, target = batches()
    probs, probs_t = teacher(target["image"], FakeContext(), 3.0)
    with torch.no_grad():
        plain, flipped = teacher.model(target["image"].float()), teacher.model(target["image"].float().flip(-1))
    expected = (plain.softmax(1) + flipped.flip(-1).softmax(1)) / 2
    expected_t = ((plain / 3).softmax(1) + (flipped.flip(-1) / 3).softmax(1)) / 2
    assert torch.allclose(probs, expected, atol=1e-6) and torch.allclose(probs_t, expected_t, atol=1e-6)
    assert not torch.allclose(probs, plain.softmax(1), atol=1e-4)  # the flip changed something


def test_mix_trains_on_classmix_labelled_by_the_teacher(tmp_path, monkeypatch):
    config, checkpoint = write_teacher(tmp_path)
    model = TinyNet()
    source, target = batches()
    plain = adapt.build_strategy(distill_cfg(config, checkpoint), model)
    assert "mix" not in plain.training_step(model, source, target, FakeContext())
    strategy = adapt.build_strategy(distill_cfg(config, checkpoint, mix=True), model)
    seen = {}
    real_class_mix = mixing.class_mix

    def spy(source, target_images, pseudo, weight, *rest):
        seen.update(target_images=target_images, pseudo=pseudo, weight=weight)
        return real_class_mix(source, target_images, pseudo, weight, *rest)

    monkeypatch.setattr(mixing, "class_mix", spy)
    ctx = FakeContext(watch={"student": model})
    losses = strategy.training_step(model, source, target, ctx)
    pseudo, _, weight = strategy._teacher_labels(target, FakeContext())
    assert "mix" in losses and len(ctx.reached) == 3 and ctx.reached[-1] == {"student"}
    assert torch.equal(seen["target_images"], target["image"]) and torch.equal(seen["pseudo"], pseudo)
    assert torch.allclose(seen["weight"], weight.expand(2, 16, 32))


def test_cached_labels_train_on_the_file_labels_and_refuse_the_kl(tmp_path):
    cfg = from_dict({"model": {"num_classes": C, "aux_weight": 0.1},
                     "adapt": {"name": "distill", "kd_lambda": 0.0},
                     "data": {"source": {"size": [32, 16]}, "target": {"size": [32, 16], "pseudo_labels": "labels"}}})
    model = TinyNet()
    strategy = adapt.build_strategy(cfg, model)  # no teacher is built: its keys may stay empty
    assert strategy.teacher is None and strategy.state_dict()["_extra_state"]["teacher_sha256"] is None
    source, target = batches()
    target["label"] = source["label"].clone()  # two rows of 255 out of 16
    losses = strategy.training_step(model, source, target, FakeContext())
    assert set(losses) == {"seg", "pseudo", "pseudo_weight"} and losses["pseudo_weight"].item() == 14 / 16
    cfg.adapt.kd_lambda = 1.0
    with pytest.raises(ConfigError, match="adapt.kd_lambda = 1.0.*no teacher logits"):
        adapt.build_strategy(cfg, model)


# ----------------------------------------------------------------------------------- refusals, keys
def test_missing_teacher_or_other_classes_is_one_line(tmp_path):
    config, checkpoint = write_teacher(tmp_path)
    with pytest.raises(ConfigError, match=r"adapt.teacher.checkpoint = .*nope.pt: file not found") as info:
        adapt.build_strategy(distill_cfg(config, tmp_path / "nope.pt"), TinyNet())
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="needs a trained teacher"):
        adapt.build_strategy(from_dict({"adapt": {"name": "distill"}}), TinyNet())
    other_config, other_checkpoint = write_teacher(tmp_path, classes=C + 1, name="other")
    with pytest.raises(ConfigError, match=f"with {C + 1} classes, and the student has {C} classes"):
        adapt.build_strategy(distill_cfg(other_config, other_checkpoint), TinyNet())


def test_distill_reads_only_the_keys_it_declares(tmp_path):
    config, checkpoint = write_teacher(tmp_path)
    cfg = distill_cfg(config, checkpoint, flip=True, mix=True, crop=[16, 8])
    recorder = cfg.adapt = KeyRecorder(cfg.adapt)
    model = TinyNet()
    strategy = adapt.build_strategy(cfg, model)
    type(strategy).label(cfg.adapt)
    for iteration in range(2):
        source, target = batches(seed=iteration)
        strategy.training_step(model, source, target, FakeContext(iteration=iteration))
        strategy.after_step(model, FakeContext(iteration=iteration))
    assert not recorder.read - {"name"} - set(adapt.Distill.keys)


# ------------------------------------------------------------------------------ end to end (train.py)
def test_synthetic_distill_trains_and_a_resume_refuses_another_teacher_file(tmp_path, monkeypatch):
    from rtda.engine import train

    built = []  # the teachers train.py builds, kept for a look after the run
    real_init = distill.FrozenTeacher.__init__
    monkeypatch.setattr(distill.FrozenTeacher, "__init__", lambda self, cfg: real_init(self, cfg) or built.append(self))

    root = tmp_path / "data"
    teacher_cfg = load_config(SYNTHETIC_DISTILL).adapt.teacher.config
    torch.manual_seed(0)
    teacher_file = tmp_path / "teacher.pt"
    torch.save(build_untrained(load_config(REPO / teacher_cfg).model).state_dict(), teacher_file)
    before = file_sha256(teacher_file)
    overrides = tiny_overrides(root, **{"train.iters": 2, "train.vis_images": 0, "adapt.teacher.config":
                                        REPO / teacher_cfg, "adapt.teacher.checkpoint": teacher_file})
    run_dir = train(load_config(SYNTHETIC_DISTILL, overrides), work_dir=tmp_path / "runs")
    assert json.loads((run_dir / "metrics.json").read_text())["adapt"] == "distill"
    (teacher,) = built
    saved = torch.load(teacher_file)
    assert not teacher.model.training and all(p.grad is None and not p.requires_grad
                                              for p in teacher.model.parameters())
    assert all(torch.equal(v.cpu(), saved[k]) for k, v in teacher.model.state_dict().items())
    state = load_checkpoint(run_dir / "last.pt")
    assert list(state["strategy"]) == ["_extra_state"]  # path and checksum only, no teacher tensor
    assert state["strategy"]["_extra_state"]["teacher_sha256"] == before == file_sha256(teacher_file)

    torch.manual_seed(1)  # another teacher under the same name
    torch.save(build_untrained(load_config(REPO / teacher_cfg).model).state_dict(), teacher_file)
    longer = load_config(SYNTHETIC_DISTILL, overrides + ["train.iters=4"])
    with pytest.raises(CheckpointError, match="trained with the teacher .*teacher.pt.*a run keeps its teacher") as info:
        train(longer, work_dir=tmp_path / "runs", resume=str(run_dir / "last.pt"), apply_changes=True)
    assert "\n" not in str(info.value)


def test_a_missing_teacher_stops_train_py_before_a_run_folder(tmp_path, capsys):
    from rtda.engine.cli import main

    overrides = tiny_overrides(tmp_path / "data", **{"train.iters": 1})
    code = main(["--config", str(SYNTHETIC_DISTILL), *overrides, "--work-dir", str(tmp_path / "runs")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # after the
    assert code == 1 and len(errors) == 1  # synthetic domains' generation, which reports on stderr
    assert "adapt.teacher.checkpoint = runs/" in errors[0] and "not found" in errors[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))


# ------------------------------------------------------------------------------------------------ the table
def test_the_table_trains_only_the_rows_asked_for_and_names_an_unknown_row(tmp_path, monkeypatch):
    from rtda.experiments import distill_table
    from rtda.experiments.common import ExperimentError

    trained = []
    monkeypatch.setattr(distill_table, "train_runs",
                        lambda runs, overrides, work_dir, jobs, threads, after_each: trained.extend(runs) or [])
    teacher, student = distill_table.TEACHER, distill_table.STUDENT
    with pytest.raises(RuntimeError, match=f"{student} seed 0 skipped: its teacher"):
        distill_table.run_distill_table(tmp_path, [0], [], only=[teacher, student])
    assert [(name, seed) for name, seed, _ in trained] == [(teacher, 0)]  # no DACS or DAFormer-DACS row
    with pytest.raises(ExperimentError, match="--rows gta5_bisenet_adv: not a row of this table; expected some of "
                                              f"{teacher}, {student}, gta5_bisenet_dacs"):
        distill_table.run_distill_table(tmp_path, [0], [], only=["gta5_bisenet_adv"])
