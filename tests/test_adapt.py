"""The adaptation strategies: FDA's spectrum swap, ClassMix, the EMA teacher, the adversarial losses' reach,
pseudo-label thresholds, and (through train.py) a few iterations of every synthetic adaptation config."""
import contextlib
import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rtda import adapt
from rtda.adapt import pseudo_labels
from rtda.config import AdaptConfig, from_dict, load_config
from rtda.models.base import SegmentationModel, SegOutput
from rtda.utils.files import load_checkpoint

from conftest import straight_and_resumed, tiny_overrides

C = 5  # classes of the stand-in network


class TinyNet(nn.Module):
    """A stand-in segmentation model: SegOutput at stride 2 in training, upsampled logits in eval."""

    # the supervised loss of a real model, with the test configs' aux_weight
    aux_weight, ohem, supervised_loss = 0.1, None, SegmentationModel.supervised_loss

    def __init__(self, aux: bool = True):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, C, 1)
        self.aux_head = nn.Conv2d(8, C, 1) if aux else None

    def forward(self, images):
        x = F.relu(self.bn(self.body(images.float() / 255)))
        logits = self.head(x)
        if not self.training:
            return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return SegOutput(logits, {"aux": self.aux_head(x)} if self.aux_head is not None else {})


class FakeContext:
    """What train.StepContext offers a strategy; records which parameters each backward call reaches."""

    def __init__(self, iteration=0, max_iters=10, watch=None):
        self.iteration, self.max_iters = iteration, max_iters
        self.watch = watch or {}  # name -> module whose gradients are recorded per backward
        self.reached = []

    @property
    def lr_factor(self):
        return (1 - self.iteration / self.max_iters) ** 0.9

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        before = {name: [None if p.grad is None else p.grad.clone() for p in m.parameters()]
                  for name, m in self.watch.items()}
        loss.backward()
        reached = set()
        for name, module in self.watch.items():
            for old, p in zip(before[name], module.parameters()):
                new = p.grad
                if new is not None and (old is None or not torch.equal(old, new)):
                    reached.add(name)
        self.reached.append(reached)

    micro_step, last_micro_step = 0, True  # no gradient accumulation

    def zero_grad(self, optimizer):
        optimizer.zero_grad(set_to_none=True)

    def step(self, optimizer):
        optimizer.step()


def make_cfg(name, **adapt_keys):
    return from_dict({"model": {"num_classes": C, "aux_weight": 0.1}, "adapt": {"name": name, **adapt_keys},
                      "data": {"source": {"size": [32, 16]}, "target": {"size": [32, 16]}}})


def batches(b=2, h=16, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    source = {"image": torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g),
              "label": torch.randint(0, C, (b, h, w), generator=g)}
    source["label"][:, :2] = 255
    target = {"image": torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)}
    return source, target


# ------------------------------------------------------------------------------------------------ FDA
def test_fda_beta_zero_returns_the_source():
    source, target = batches()
    out = adapt.fda.fda_source_to_target(source["image"], target["image"], 0.0)
    assert out.dtype == torch.float32 and torch.equal(out, source["image"].float())


def test_fda_swaps_low_band_amplitude_and_keeps_source_phase():
    source, target = batches(h=24, w=40)
    beta = 0.125  # b = floor(24 * 0.125) = 3: frequencies |f| < 3 on both axes
    out = adapt.fda.fda_source_to_target(source["image"], target["image"], beta).double()
    spec_out, spec_s = torch.fft.fft2(out), torch.fft.fft2(source["image"].double())
    spec_t = torch.fft.fft2(target["image"].double())
    fy, fx = torch.fft.fftfreq(24, 1 / 24).abs(), torch.fft.fftfreq(40, 1 / 40).abs()
    band = (fy[:, None] < 3) & (fx[None, :] < 3)
    assert band.sum() == 25
    scale = spec_s.abs().max()
    # in the band: target amplitude, source phase; outside: the source spectrum untouched
    expected = torch.where(band, torch.polar(spec_t.abs(), spec_s.angle()), spec_s)
    assert (spec_out - expected).abs().max() / scale < 1e-6
    assert not torch.allclose(spec_out.abs()[..., band], spec_s.abs()[..., band])


def test_entropy_loss_matches_the_formula():
    logits = torch.randn(2, C, 4, 6)
    p = logits.softmax(1)
    ent = -(p * p.log()).sum(1) / math.log(C)
    expected = ((ent ** 2 + 1e-8) ** 2.0).mean()
    assert torch.allclose(adapt.fda.entropy_loss(logits, 2.0, 1e-8), expected)


def test_fda_entropy_switches_on_at_entropy_start():
    cfg = make_cfg("fda", beta=0.1, entropy_start=3)
    model = TinyNet()
    strategy = adapt.build_strategy(cfg, model)
    source, target = batches()
    assert "entropy" not in strategy.training_step(model, source, target, FakeContext(iteration=2))
    losses = strategy.training_step(model, source, target, FakeContext(iteration=3))
    assert set(losses) == {"seg", "entropy"} and all(not v.requires_grad for v in losses.values())


# ------------------------------------------------------------------------------------------- ClassMix
def test_class_mix_mask_covers_exactly_the_chosen_classes_and_never_255():
    labels = torch.full((4, 12, 10), 255)
    labels[0, :6], labels[0, 6:9] = 0, 3               # classes {0, 3} + 255 -> 1 chosen
    labels[1] = torch.arange(120).view(12, 10) % 5      # {0..4} -> 3 chosen
    labels[2, :, :5] = 2                                # {2} -> 1 chosen
    # image 3: nothing but 255 -> nothing chosen
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        masks = adapt.mixing.class_mix_masks(labels, C, 0.5, g)
        for label, mask, n in zip(labels, masks, (2, 5, 1, 0)):
            chosen = label[mask].unique()
            assert len(chosen) == math.ceil(n / 2)
            assert 255 not in chosen.tolist()
            assert torch.equal(mask, torch.isin(label, chosen))  # every pixel of a chosen class, nothing else


def test_class_mix_from_the_batch_draws_from_the_union_of_its_classes_as_daformer_does():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, :4] = 1                                   # image 0: {0, 1}
    labels[1] = 2                                       # image 1: {2}; the batch: {0, 1, 2} -> 2 drawn per image
    drawn = [set(), set()]
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        masks = adapt.mixing.class_mix_masks(labels, C, 0.5, g, from_batch=True)
        for i, (label, mask) in enumerate(zip(labels, masks)):
            pasted = set(label[mask].unique().tolist())
            assert pasted <= set(label.unique().tolist())  # an image pastes only its own pixels
            drawn[i].add(frozenset(pasted))
        assert torch.equal(masks[1], masks[1].flatten()[0].expand(8, 8))  # one class: all or nothing
    assert frozenset() in drawn[1] and frozenset({2}) in drawn[1]  # per image 2 of 3: class 2 drawn, or not
    per_image = adapt.mixing.class_mix_masks(labels, C, 0.5, torch.Generator().manual_seed(0))
    assert per_image[1].all()  # DACS's rule: image 1's only class is always drawn (ceil(1 / 2) = 1)


def test_class_mix_choice_varies_with_the_generator():
    labels = (torch.arange(200).view(1, 10, 20) % C).expand(3, -1, -1)
    picks = {tuple(adapt.mixing.class_mix_masks(labels, C, 0.5, torch.Generator().manual_seed(s))[0, 0, :C].tolist())
             for s in range(10)}
    assert len(picks) > 1


def test_strong_augmentation_keeps_range_and_identity_when_off():
    images = torch.randint(0, 256, (3, 3, 20, 30)).float()
    assert torch.allclose(adapt.mixing.color_jitter(images, 0.25, 0.0), images, atol=1e-3)
    assert torch.allclose(adapt.mixing.gaussian_blur(images, [0.15, 1.15], 0.1, 0.0), images, atol=1e-4)
    jittered = adapt.mixing.color_jitter(images, 0.25, 1.0, torch.Generator().manual_seed(0))
    assert jittered.min() >= 0 and jittered.max() <= 255 and not torch.allclose(jittered, images)
    blurred = adapt.mixing.gaussian_blur(images, [1.0, 1.0], 0.5, 1.0)
    assert blurred.std() < images.std()  # a blur smooths
    assert torch.allclose(blurred.mean((2, 3)), images.mean((2, 3)), rtol=0.05)


# ------------------------------------------------------------------------------------------------ DACS
def test_ema_teacher_follows_the_formula():
    model = TinyNet()
    strategy = adapt.build_strategy(make_cfg("dacs"), model)
    teacher = strategy.teacher
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    strategy.after_step(model, FakeContext(iteration=0))  # alpha = min(1 - 1/1, 0.99) = 0: a copy
    for t, s in zip(teacher.parameters(), model.parameters()):
        assert torch.equal(t, s)
    old = [t.clone() for t in teacher.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    strategy.after_step(model, FakeContext(iteration=4))  # alpha = min(1 - 1/5, 0.99) = 0.8
    for t, o, s in zip(teacher.parameters(), old, model.parameters()):
        assert torch.allclose(t, 0.8 * o + 0.2 * s, atol=1e-6)
    strategy.after_step(model, FakeContext(iteration=10_000))  # capped at ema_alpha
    assert not any(p.requires_grad for p in teacher.parameters())


def test_dacs_step_losses_and_teacher_state_in_state_dict():
    model = TinyNet()
    strategy = adapt.build_strategy(make_cfg("dacs"), model)
    assert any(k.startswith("teacher.") for k in strategy.state_dict())
    source, target = batches()
    ctx = FakeContext(watch={"model": model, "teacher": strategy.teacher})
    losses = strategy.training_step(model, source, target, ctx)
    assert set(losses) == {"seg", "mix", "pseudo_weight"}
    assert ctx.reached == [{"model"}, {"model"}]  # the teacher never gets gradients
    assert 0 <= float(losses["pseudo_weight"]) <= 1


def test_dacs_rejects_different_source_and_target_sizes():
    cfg = from_dict({"adapt": {"name": "dacs"}, "data": {"source": {"size": [64, 32]}, "target": {"size": [32, 16]}}})
    with pytest.raises(ValueError, match="data.source.size"):
        adapt.build_strategy(cfg, TinyNet())


def test_recipe_crops_make_different_sizes_mixable():
    cfg = from_dict({"model": {"num_classes": C}, "adapt": {"name": "dacs", "crop": [16, 16]},
                     "data": {"source": {"size": [40, 24]}, "target": {"size": [32, 16]}}})
    model = TinyNet()
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    strategy = adapt.build_strategy(cfg, model)  # the teacher is a copy, hook included
    source, _ = batches(h=24, w=40)
    _, target = batches(h=16, w=32)
    strategy.training_step(model, source, target, FakeContext())
    assert seen == [(2, 3, 16, 16)] * 3  # source, teacher on target, mixed: all 16x16 crops
    crop = adapt.base.random_crop(source, [16, 8], __import__("random").Random(0))
    assert crop["image"].shape == (2, 3, 8, 16) and crop["label"].shape == (2, 8, 16)
    with pytest.raises(ValueError, match="adapt.crop"):
        adapt.build_strategy(from_dict({"adapt": {"name": "fda", "crop": [64, 64]},
                                        "data": {"source": {"size": [32, 16]}}}), model)


def test_dacs_resumed_from_state_dicts_equals_uninterrupted():
    def run(steps, state=None):
        torch.manual_seed(0)
        model = TinyNet()
        strategy = adapt.build_strategy(make_cfg("dacs"), model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            strategy.load_state_dict(state["strategy"])
            opt.load_state_dict(state["opt"])
            start = state["iteration"]
        for it in range(start, steps):
            source, target = batches(seed=it)
            ctx = FakeContext(iteration=it, max_iters=4)
            opt.zero_grad()
            strategy.training_step(model, source, target, ctx)
            opt.step()
            strategy.after_step(model, ctx)
        return model, strategy, opt

    full_model, full_strategy, _ = run(4)
    model, strategy, opt = run(2)
    state = copy.deepcopy({"model": model.state_dict(), "strategy": strategy.state_dict(),
                           "opt": opt.state_dict(), "iteration": 2})
    resumed_model, resumed_strategy, _ = run(4, state)
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full_strategy.state_dict().values(), resumed_strategy.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- pseudo-labels
def test_pseudo_label_thresholds_on_a_hand_built_confidence_map():
    # class 0: 50 pixels at 0.005, 0.015, ..., 0.495 -> FDA's sorted[round(50 * 0.66) = 33] = 0.335
    # class 1: 10 pixels, all confident -> 66th percentile 0.955, capped at 0.9; class 2: never predicted
    conf0 = torch.arange(50, dtype=torch.float64) / 100 + 0.005
    conf1 = torch.linspace(0.905, 0.995, 10, dtype=torch.float64)
    confidence = torch.cat([conf0, conf1]).view(6, 10)
    pred = torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(10, dtype=torch.long)]).view(6, 10)
    hist = pseudo_labels.confidence_histogram(pred[None], confidence[None], 3, bins=100)
    assert hist.sum() == 60 and hist[0].sum() == 50 and hist[2].sum() == 0
    thresholds = pseudo_labels.class_thresholds(hist, 0.66, 0.9)
    assert torch.allclose(thresholds, torch.tensor([0.33, 0.9, 0.0], dtype=torch.float64))
    labels = pseudo_labels.apply_thresholds(pred, confidence, thresholds)
    reference = pred.clone()  # FDA getSudoLabel_multi.py: label[(prob < thres[c]) & (label == c)] = 255
    for c, t in enumerate([conf0.sort().values[33].item(), 0.9, 0.0]):
        reference[(confidence < t) & (pred == c)] = 255
    assert torch.equal(labels, reference)
    assert (labels[pred == 0] != 255).sum() == 17 and (labels[pred == 1] != 255).all()


def test_pseudo_labels_command_takes_the_old_spelling_too(capsys):
    """`python -m rtda.adapt.pseudo_labels ...` and the old `adapt.py pseudo-labels ...` run the same command."""
    args = ["--config", "missing.yaml", "--checkpoint", "missing.pt", "--out", "unused"]
    assert pseudo_labels.main(args) == 1
    assert pseudo_labels.main(["pseudo-labels", *args]) == 1
    new, old = capsys.readouterr().err.splitlines()
    assert new == old and new.startswith("error: ")


# ----------------------------------------------------------------------------------------- adversarial
@pytest.mark.parametrize("gan", ["bce", "ls"])
def test_adversarial_losses_reach_only_their_own_network(gan):
    torch.manual_seed(0)
    model = TinyNet()
    strategy = adapt.build_strategy(make_cfg("adversarial", multi_level=True, gan=gan), model)
    assert set(strategy.discriminators) == {"main", "aux"}
    source, target = batches(h=64, w=64)
    frozen_model, frozen_strategy = copy.deepcopy(model), copy.deepcopy(strategy)
    model_before = [p.detach().clone() for p in model.parameters()]
    d_before = copy.deepcopy(strategy.discriminators.state_dict())

    ctx = FakeContext(watch={"model": model, "disc": strategy.discriminators})
    losses = strategy.training_step(model, source, target, ctx)
    # seg -> model; adversarial -> model only (discriminators frozen); discriminator loss -> discriminators only
    assert ctx.reached == [{"model"}, {"model"}, {"disc"}]
    assert all(p.requires_grad for p in strategy.discriminators.parameters())  # unfrozen again
    for p, old in zip(model.parameters(), model_before):  # the model's optimiser is the trainer's: untouched here
        assert torch.equal(p, old)
    assert any(not torch.equal(v, d_before[k]) for k, v in strategy.discriminators.state_dict().items())

    # labels: generator pushes target towards the source label 0; discriminator sees source 0, target 1, halved
    crit = F.binary_cross_entropy_with_logits if gan == "bce" else F.mse_loss
    def probs(out, level):
        logits = out.logits if level == "main" else out.aux["aux"]
        return F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False).softmax(1)
    with torch.no_grad():
        out_s, out_t = frozen_model(source["image"]), frozen_model(target["image"])
        d = frozen_strategy.discriminators
        expected_d = 0.0
        for level in ("main", "aux"):
            d_t = d[level](probs(out_t, level))
            d_s = d[level](probs(out_s, level))
            assert torch.allclose(losses[f"adv_{level}"], crit(d_t, torch.zeros_like(d_t)), atol=1e-5)
            expected_d += 0.5 * crit(d_s, torch.zeros_like(d_s)) + 0.5 * crit(d_t, torch.ones_like(d_t))
    assert torch.allclose(losses["disc"], expected_d, atol=1e-5)


def test_adversarial_discriminator_lr_follows_poly_and_state_round_trips():
    model = TinyNet(aux=False)
    strategy = adapt.build_strategy(make_cfg("adversarial"), model)
    source, target = batches(h=64, w=64)
    strategy.training_step(model, source, target, FakeContext(iteration=5, max_iters=10))
    assert math.isclose(strategy.d_optimizer.param_groups[0]["lr"], 1e-4 * 0.5 ** 0.9)
    state = strategy.state_dict()
    clone = adapt.build_strategy(make_cfg("adversarial"), TinyNet(aux=False))
    clone.load_state_dict(state)
    assert clone.d_optimizer.state_dict()["state"].keys() == strategy.d_optimizer.state_dict()["state"].keys()
    assert clone.d_optimizer.param_groups[0]["lr"] == strategy.d_optimizer.param_groups[0]["lr"]


def test_multi_level_needs_an_auxiliary_output():
    model = TinyNet(aux=False)
    strategy = adapt.build_strategy(make_cfg("adversarial", multi_level=True), model)
    source, target = batches(h=64, w=64)
    with pytest.raises(ValueError, match="auxiliary"):
        strategy.training_step(model, source, target, FakeContext())


def test_unknown_strategy_names_the_choices():
    cfg = make_cfg("none")
    cfg.adapt.name = "cyclegan"
    with pytest.raises(ValueError, match="adapt.name = 'cyclegan'.*adversarial"):
        adapt.build_strategy(cfg, TinyNet())


# ------------------------------------------------------------------------------- declared config keys
def test_every_adapt_key_has_a_declared_reader_and_every_strategy_a_label():
    fields = {f.name for f in dataclasses.fields(AdaptConfig)} - {"name"}
    declared = set()
    for name, strategy_class in adapt.STRATEGIES.items():
        assert "label" in vars(strategy_class), f"{name}: {strategy_class.__name__} has no label of its own"
        assert "keys" in vars(strategy_class), f"{name}: {strategy_class.__name__} declares no keys"
        unknown = set(strategy_class.keys) - fields
        assert not unknown, f"{name}: {strategy_class.__name__}.keys names {sorted(unknown)}, not AdaptConfig fields"
        declared |= set(strategy_class.keys)
    assert not fields - declared, f"AdaptConfig fields no strategy declares: {sorted(fields - declared)}"


class KeyRecorder:
    """An `adapt` section that records the names read from it."""

    def __init__(self, section):
        self._section, self.read = section, set()

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._section, name)


@pytest.mark.parametrize("name, keys, size, ssl", [
    ("none", {}, (16, 32), False),
    ("adversarial", {"multi_level": True}, (64, 64), False),
    ("advent", {"multi_level": True, "gan": "ls"}, (64, 64), False),
    ("minent", {"multi_level": True}, (16, 32), False),
    ("fda", {"beta": 0.2, "crop": [16, 8]}, (16, 32), True),
    ("dacs", {"crop": [16, 8], "fd_lambda": 0.005, "fd_classes": [1, 2]}, (16, 32), False),
    ("mic", {"pseudo_ignore_top": 64}, (16, 32), False),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_strategy_reads_only_the_keys_it_declares(name, keys, size, ssl):
    """Build, label, two training steps and an EMA update: every `adapt.*` key read is in the class's `keys`."""
    cfg = make_cfg(name, **keys)
    recorder = cfg.adapt = KeyRecorder(cfg.adapt)
    model = TinyNet()
    strategy = adapt.build_strategy(cfg, model)
    strategy_class = type(strategy)
    strategy_class.label(cfg.adapt)
    strategy.self_supervised = ssl  # FDA's self-training round, without a pseudo-label folder
    for iteration in range(2):
        source, target = batches(h=size[0], w=size[1], seed=iteration)
        if ssl:
            target["label"] = source["label"]
        strategy.training_step(model, source, target, FakeContext(iteration=iteration))
        strategy.after_step(model, FakeContext(iteration=iteration))
    undeclared = recorder.read - {"name"} - set(strategy_class.keys)
    assert not undeclared, f"{strategy_class.__name__} reads adapt.{sorted(undeclared)} without declaring them"


# ------------------------------------------------------------------------------ end to end (train.py)
REPO = Path(__file__).resolve().parents[1]
ADAPT_CONFIGS = sorted(p for p in (REPO / "configs" / "synthetic").glob("*.yaml")
                       if load_config(p).adapt.name != "none")


def tiny(root: Path, **extra) -> list[str]:
    """Two iterations on 64x128 synthetic images, float32 on the CPU, deterministic, nothing drawn."""
    return tiny_overrides(root, **{"data.synthetic.num_source": 8, "data.synthetic.num_val": 2, "train.iters": 2,
                                   "train.log_interval": 1, "train.vis_images": 0, **extra})


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic_adapt") / "data"


def test_every_synthetic_adaptation_config_is_covered():
    names = {p.stem for p in ADAPT_CONFIGS}
    assert {"gta5_bisenet_adv", "gta5_bisenet_adv_multi", "gta5_bisenet_fda_b0.01", "gta5_bisenet_fda_b0.05",
            "gta5_bisenet_fda_b0.09", "gta5_bisenet_fda_ssl", "gta5_bisenet_dacs"} <= names


# fda_b0.09 and fda_ssl run in the pseudo-label test, dacs in the resume test; the distill configs need a trained
# teacher: tests/test_distill.py trains BiSeNet's end to end, tests/test_zoo.py distils into every other network
@pytest.mark.parametrize("config", [p for p in ADAPT_CONFIGS if p.stem not in (
    "gta5_bisenet_fda_b0.09", "gta5_bisenet_fda_ssl", "gta5_bisenet_dacs") and load_config(p).adapt.name != "distill"],
    ids=lambda p: p.stem)
def test_synthetic_config_trains_end_to_end(config, tiny_root, tmp_path):
    from rtda.engine import train

    cfg = load_config(config, tiny(tiny_root))
    run_dir = train(cfg, work_dir=tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["adapt"] == cfg.adapt.name and metrics["iterations"] == 2
    strategy_state = load_checkpoint(run_dir / "last.pt")["strategy"]
    if cfg.adapt.name == "adversarial":
        levels = {k.split(".")[1] for k in strategy_state if k.startswith("discriminators.")}
        assert levels == ({"main", "aux"} if cfg.adapt.multi_level else {"main"})
        assert strategy_state["_extra_state"]["d_optimizer"]["state"]  # Adam moments were saved


def test_mbt_pseudo_labels_then_self_supervised_round(tiny_root, tmp_path):
    from rtda.engine import train

    fda = load_config(REPO / "configs" / "synthetic" / "gta5_bisenet_fda_b0.09.yaml", tiny(tiny_root))
    checkpoint = train(fda, work_dir=tmp_path / "runs") / "last.pt"
    out = tmp_path / "pseudo"
    ssl_config = REPO / "configs" / "synthetic" / "gta5_bisenet_fda_ssl.yaml"
    assert pseudo_labels.main(["pseudo-labels", "--config", str(ssl_config), "--checkpoint", str(checkpoint),
                       str(checkpoint), "--out", str(out), *tiny(tiny_root)]) == 0
    files = sorted(out.glob("*/*.png"))
    assert len(files) == 8
    values = np.unique(np.concatenate([np.asarray(Image.open(f)).ravel() for f in files]))
    assert set(values.tolist()) <= set(range(19)) | {255} and 255 in values.tolist()

    ssl = load_config(ssl_config, tiny(tiny_root, **{"data.target.pseudo_labels": out}))
    run_dir = train(ssl, work_dir=tmp_path / "runs")
    assert json.loads((run_dir / "metrics.json").read_text())["iterations"] == 2


def test_resumed_dacs_run_equals_an_uninterrupted_one(tiny_root, tmp_path, monkeypatch):
    config = REPO / "configs" / "synthetic" / "gta5_bisenet_dacs.yaml"
    cfg = load_config(config, tiny(tiny_root, **{"train.iters": 4}))
    straight, resumed = straight_and_resumed(cfg, tmp_path, monkeypatch)
    assert resumed["iteration"] == straight["iteration"] == 4
    assert any(k.startswith("teacher.") for k in straight["strategy"])
    for part in ("model", "strategy"):  # the teacher is part of the strategy's state
        assert straight[part].keys() == resumed[part].keys()
        for key, value in straight[part].items():
            assert torch.equal(value, resumed[part][key]), f"{part}.{key} differs after the resume"
