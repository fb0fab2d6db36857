"""Mixed precision on CPU: `train.amp: auto` per compute capability, every strategy's AMP path through the real
trainer under CPU autocast (bf16, and fp16 with the CPU GradScaler), the scaler's inf skipping (the adversarial
discriminator's optimiser included), and the float32 islands (FDA's FFT, entropy and weighted losses)."""
from __future__ import annotations

import json
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rtda import adapt
from rtda import engine as train
from rtda.config import ConfigError, TrainConfig, from_dict, load_config
from rtda.models import losses as seg_losses
from rtda.models.base import SegmentationModel, SegOutput
from rtda.utils.amp import AMP_CHOICES, amp_name, autocast, autocast_dtype, grad_scaler, load_scaler_state
from rtda.utils.files import load_checkpoint

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "configs" / "synthetic"
CUDA0 = torch.device("cuda", 0)
CPU = torch.device("cpu")
C = 5


# ------------------------------------------------------------------------------------- choosing a dtype
def test_amp_choices_are_the_config_schema_and_auto_is_the_default():
    assert typing.get_args(typing.get_type_hints(TrainConfig)["amp"]) == AMP_CHOICES
    assert TrainConfig().amp == "auto"
    for name in ("cityscapes_bisenet", "gta5_deeplabv2_dacs"):  # the protocol schedules choose per GPU
        assert load_config(REPO / "configs" / f"{name}.yaml").train.amp == "auto"


@pytest.mark.parametrize("capability, expected", [
    ((9, 0), torch.bfloat16),  # H100 / H200
    ((8, 9), torch.bfloat16),  # L4, RTX 4090
    ((8, 0), torch.bfloat16),  # A100
    ((7, 5), torch.float16),   # T4: bf16 only through emulation
    ((7, 0), torch.float16),   # V100
    ((6, 0), torch.float16),   # P100
])
def test_auto_chooses_by_compute_capability(monkeypatch, capability, expected):
    asked = []

    def capability_of(device=None):
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # natively or emulated (T4)
    assert autocast_dtype("auto", CUDA0) is expected
    assert asked == [CUDA0]  # the run's own GPU is asked, not whichever is current
    # a forced choice is kept whatever the GPU
    assert autocast_dtype("bf16", CUDA0) is torch.bfloat16
    assert autocast_dtype("fp16", CUDA0) is torch.float16
    assert autocast_dtype("none", CUDA0) is None
    assert amp_name(expected) == ("bf16" if expected is torch.bfloat16 else "fp16")


def test_forced_bf16_on_a_gpu_without_it_is_one_line_before_training(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    with pytest.raises(ConfigError, match=r"^train.amp = 'bf16': Tesla P100-PCIE-16GB \(compute capability 6.0\) "
                                          r"has no bf16 support; use train.amp=auto or fp16$"):
        autocast_dtype("bf16", CUDA0)
    assert autocast_dtype("auto", CUDA0) is torch.float16


def test_cpu_auto_is_float32_and_forced_dtypes_use_cpu_autocast(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: pytest.fail("CPU must not ask CUDA"))
    assert autocast_dtype("auto", CPU) is None and autocast_dtype("none", CPU) is None
    for amp, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert autocast_dtype(amp, CPU) is dtype
        with autocast(CPU, dtype):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
            assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == dtype
    assert grad_scaler(CPU, torch.float16).is_enabled()  # torch.amp.GradScaler("cpu")
    assert not grad_scaler(CPU, torch.bfloat16).is_enabled()
    assert not grad_scaler(CPU, None).is_enabled()
    with pytest.raises(ValueError, match=r"train.amp = 'fp8': expected one of auto, bf16, fp16, none"):
        autocast_dtype("fp8", CPU)


def test_scaler_state_loads_across_amp_modes():
    fp16 = grad_scaler(CPU, torch.float16)
    fp16.scale(torch.ones(()))  # the scale exists from the first scaled loss on
    fp16.update(1024.0)
    saved_fp16, saved_bf16 = fp16.state_dict(), grad_scaler(CPU, torch.bfloat16).state_dict()
    assert saved_bf16 == {}  # what a bf16 / float32 run's checkpoint holds
    fresh = grad_scaler(CPU, torch.float16)
    load_scaler_state(fresh, saved_bf16)  # a bf16 run resumed on a T4 (auto -> fp16): fresh scale
    assert fresh.get_scale() == 65536.0
    load_scaler_state(fresh, saved_fp16)
    assert fresh.get_scale() == 1024.0
    load_scaler_state(grad_scaler(CPU, torch.bfloat16), saved_fp16)  # fp16 -> bf16: dropped


# --------------------------------------------------------------------- float32 islands under autocast
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fda_fft_runs_in_float32_under_autocast(dtype):
    g = torch.Generator().manual_seed(0)
    source = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8, generator=g)
    target = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8, generator=g)
    expected = adapt.fda.fda_source_to_target(source, target, 0.09)
    with torch.autocast("cpu", dtype=dtype):
        got = adapt.fda.fda_source_to_target(source, target, 0.09)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_entropy_and_weighted_losses_are_float32_under_autocast(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, C, 8, 12, generator=g) * 4).to(dtype)  # what an autocast head returns
    label = torch.randint(0, C, (2, 16, 24), generator=g)
    label[:, :3] = 255
    weight = torch.rand(2, 16, 24, generator=g)
    output = SegOutput(logits, {"aux": logits * 0.5})
    with torch.autocast("cpu", dtype=dtype):
        ent = adapt.fda.entropy_loss(logits, 2.0, 1e-8)
        weighted = seg_losses.segmentation_loss(output, label, 0.1, weight=weight)
        seg = seg_losses.segmentation_loss(output, label, 0.1)
    for value in (ent, weighted, seg):
        assert value.dtype == torch.float32 and value.isfinite()
    assert torch.allclose(ent, adapt.fda.entropy_loss(logits.float(), 2.0, 1e-8), rtol=1e-5)
    assert torch.allclose(weighted, seg_losses.segmentation_loss(
        SegOutput(logits.float(), {"aux": logits.float() * 0.5}), label, 0.1, weight=weight), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_prediction_under_autocast_gives_float32_probabilities(dtype):
    """eval.predict_probs (validation, FDA's multi-band pseudo-labels) with train.amp forced on CPU."""
    from rtda.evaluation import predict_probs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1)).eval()
    images = torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8).float()
    probs = predict_probs([model, model], images, (32, 48), dtype)
    assert probs.dtype == torch.float32 and probs.shape == (2, C, 32, 48)
    assert torch.allclose(probs.sum(1), torch.ones(2, 32, 48), atol=1e-5)
    assert (probs.argmax(1) == predict_probs([model], images, (32, 48)).argmax(1)).float().mean() > 0.9


# ---------------------------------------------------------------------------- the scaler in one step
class TinyNet(nn.Module):
    # the supervised loss of a real model, with the test configs' aux_weight
    aux_weight, ohem, supervised_loss = 0.1, None, SegmentationModel.supervised_loss

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, C, 1)
        self.aux_head = nn.Conv2d(8, C, 1)

    def forward(self, images):
        x = F.relu(self.body(images.float() / 255))
        return SegOutput(self.head(x), {"aux": self.aux_head(x)})


def one_step_setup(name: str, dtype: torch.dtype, iteration: int = 0):
    torch.manual_seed(0)
    cfg = from_dict({"model": {"num_classes": C, "aux_weight": 0.1}, "adapt": {"name": name},
                     "data": {"source": {"size": [64, 32]}, "target": {"size": [64, 32]}}})
    model = TinyNet()
    strategy = adapt.build_strategy(cfg, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    scaler = grad_scaler(CPU, dtype)
    ctx = train.StepContext(10, CPU, dtype, scaler, lambda it: 1.0)
    ctx.iteration = iteration
    g = torch.Generator().manual_seed(1)
    source = {"image": torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8, generator=g),
              "label": torch.randint(0, C, (2, 32, 64), generator=g)}
    target = {"image": torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8, generator=g)}
    return model, strategy, optimizer, scheduler, scaler, ctx, source, target


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def unchanged(module: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, b) for p, b in zip(module.parameters(), before))


def poison(parameter: nn.Parameter) -> None:
    """Make every gradient that reaches `parameter` infinite (an fp16 overflow in its backward)."""
    parameter.register_hook(lambda grad: torch.full_like(grad, float("inf")))


def test_inf_gradient_skips_the_step_lowers_the_scale_then_training_goes_on():
    model, strategy, optimizer, scheduler, scaler, ctx, source, target = one_step_setup("none", torch.float16)
    hook = model.head.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before, scale = snapshot(model), scaler.get_scale()
    losses = train.train_step(model, strategy, optimizer, scheduler, source, None, ctx)
    assert losses["seg"].isfinite()  # the loss is fine: only the gradient overflowed
    assert unchanged(model, before) and not optimizer.state  # step skipped: no momentum either
    assert scaler.get_scale() == scale * 0.5  # backoff
    hook.remove()
    ctx.iteration = 1
    train.train_step(model, strategy, optimizer, scheduler, source, None, ctx)
    assert not unchanged(model, before) and scaler.get_scale() == scale * 0.5  # stepped; growth only after 2000
    assert all(p.isfinite().all() for p in model.parameters())


def test_adversarial_discriminator_optimiser_steps_under_the_scaler():
    model, strategy, optimizer, scheduler, scaler, ctx, source, target = one_step_setup("adversarial", torch.float16)
    d = strategy.discriminators
    model_before, d_before = snapshot(model), snapshot(d)
    losses = train.train_step(model, strategy, optimizer, scheduler, source, target, ctx)
    assert all(v.dtype == torch.float32 and v.isfinite() for v in losses.values())
    assert not unchanged(model, model_before) and not unchanged(d, d_before)
    assert strategy.d_optimizer.state  # Adam stepped through scaler.step
    assert scaler.get_scale() == 65536.0


def test_inf_in_the_discriminator_skips_its_step_only():
    model, strategy, optimizer, scheduler, scaler, ctx, source, target = one_step_setup("adversarial", torch.float16)
    d = strategy.discriminators
    poison(d["main"][0].weight)
    model_before, d_before = snapshot(model), snapshot(d)
    train.train_step(model, strategy, optimizer, scheduler, source, target, ctx)
    assert unchanged(d, d_before) and not strategy.d_optimizer.state  # the discriminator's step was skipped
    assert not unchanged(model, model_before)  # the model's gradients were finite: it stepped
    assert scaler.get_scale() == 32768.0  # one update for both optimisers, lowered by either's inf


def test_inf_in_the_model_skips_its_step_and_the_discriminator_still_learns():
    model, strategy, optimizer, scheduler, scaler, ctx, source, target = one_step_setup("adversarial", torch.float16)
    d = strategy.discriminators
    poison(model.body.weight)
    model_before, d_before = snapshot(model), snapshot(d)
    train.train_step(model, strategy, optimizer, scheduler, source, target, ctx)
    assert unchanged(model, model_before) and not optimizer.state
    assert not unchanged(d, d_before)  # its loss is on detached softmaxes: the model's inf never reaches it
    assert scaler.get_scale() == 32768.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dacs_teacher_follows_the_student_under_autocast(dtype):
    model, strategy, optimizer, scheduler, scaler, ctx, source, target = one_step_setup("dacs", dtype, iteration=3)
    teacher_before = snapshot(strategy.teacher)
    losses = train.train_step(model, strategy, optimizer, scheduler, source, target, ctx)
    assert set(losses) == {"seg", "mix", "pseudo_weight"} and all(v.isfinite() for v in losses.values())
    alpha = min(1 - 1 / (3 + 1), 0.99)
    for t, old, s in zip(strategy.teacher.parameters(), teacher_before, model.parameters()):
        assert t.dtype == torch.float32 and not t.requires_grad
        assert torch.allclose(t, alpha * old + (1 - alpha) * s, atol=1e-6)


# --------------------------------------------------------------------- every strategy through train.py
def tiny(root: Path, amp: str, **extra) -> list[str]:
    """Two iterations at 64x32 (fp16 convolutions are slow on CPU) under `amp`, deterministic."""
    size = "[64,32]"
    return tiny_overrides(root, **{"data.synthetic.num_source": 8, "data.synthetic.num_val": 2,
                                   "data.source.size": size, "data.target.size": size, "data.val.size": size,
                                   "train.iters": 2, "train.log_interval": 1, "train.vis_images": 0,
                                   "train.amp": amp, **extra})


@pytest.fixture(scope="module")
def amp_root(tmp_path_factory) -> Path:
    from rtda.datasets import build_dataset

    root = tmp_path_factory.mktemp("synthetic_amp") / "data"
    cfg = load_config(SYNTHETIC / "gta5_bisenet.yaml", tiny(root, "none"))
    build_dataset(cfg.data.source, cfg, "source")  # generated once, by the real data path
    return root


@pytest.fixture(scope="module")
def pseudo_labels(amp_root, tmp_path_factory) -> Path:
    """Random train-id pseudo-labels (255 included) for the synthetic target, where FDA's SSL round reads them."""
    from rtda.datasets import build_dataset

    cfg = load_config(SYNTHETIC / "gta5_bisenet_fda_ssl.yaml", tiny(amp_root, "none"))
    cfg.data.target.pseudo_labels = None
    target = build_dataset(cfg.data.target, cfg, "target")
    out = tmp_path_factory.mktemp("pseudo")
    rng = np.random.default_rng(0)
    for image, name in zip(target.images, target.names):
        (out / image.parent.name).mkdir(exist_ok=True)
        label = rng.integers(0, 19, (64, 128), dtype=np.uint8)
        label[:8] = 255
        Image.fromarray(label).save(out / image.parent.name / f"{name}.png")
    return out


# Every strategy and each of its AMP-relevant parts: source-only; adversarial with both discriminators
# (multi-level); FDA with entropy (b0.09) and with entropy + pseudo-label CE (SSL); DACS with its EMA teacher.
E2E_CONFIGS = ["gta5_bisenet", "gta5_bisenet_adv_multi", "gta5_bisenet_fda_b0.09", "gta5_bisenet_fda_ssl",
               "gta5_bisenet_dacs"]


# Every strategy under bf16; fp16's GradScaler path with the strategy-owned optimiser (adversarial) and the EMA
# teacher (DACS), the two places a scaler could be stepped wrongly.
E2E_RUNS = [(name, "bf16") for name in E2E_CONFIGS] + [(name, "fp16") for name in ("gta5_bisenet_adv_multi",
                                                                           "gta5_bisenet_dacs")]


@pytest.mark.parametrize("name, amp", E2E_RUNS)
def test_every_strategy_trains_under_cpu_autocast(name, amp, amp_root, pseudo_labels, tmp_path, monkeypatch):
    dtypes = []
    real_autocast = autocast

    def recording_autocast(device, dtype):
        dtypes.append(dtype)
        return real_autocast(device, dtype)

    monkeypatch.setattr(train.context, "autocast", recording_autocast)
    extra = {"data.target.pseudo_labels": pseudo_labels} if name.endswith("_ssl") else {}
    cfg = load_config(SYNTHETIC / f"{name}.yaml", tiny(amp_root, amp, **extra))
    run_dir = train.train(cfg, work_dir=tmp_path)  # raises TrainingDiverged on a non-finite loss or weight
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    # every autocast region of the strategy ran in that dtype (None: validation, which scores in float32)
    assert {d for d in dtypes if d is not None} == {expected} and dtypes.count(expected) >= 2
    assert json.loads((run_dir / "metrics.json").read_text())["iterations"] == 2
    state = load_checkpoint(run_dir / "last.pt")
    if amp == "fp16":  # the CPU GradScaler was live and is saved for a resume
        assert 0 < state["scaler"]["scale"] <= 65536.0
    else:
        assert state["scaler"] == {}
    for part in ("model", "strategy"):  # the discriminators, the teacher: all finite
        for key, value in state[part].items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert value.isfinite().all(), f"{part}.{key}"
    if cfg.adapt.name == "adversarial":
        assert {k.split(".")[1] for k in state["strategy"] if k.startswith("discriminators.")} == {"main", "aux"}
    if cfg.adapt.name == "dacs":
        assert any(k.startswith("teacher.") for k in state["strategy"])


def test_trainer_survives_fp16_overflows_and_resumes_under_another_dtype(amp_root, tmp_path, monkeypatch):
    original = adapt.SourceOnly.training_step

    def overflowing_step(self, model, source, target, ctx):
        losses = original(self, model, source, target, ctx)
        next(model.parameters()).grad.fill_(float("inf"))  # every backward overflows
        return losses

    monkeypatch.setattr(adapt.SourceOnly, "training_step", overflowing_step)
    cfg = load_config(SYNTHETIC / "gta5_bisenet.yaml", tiny(amp_root, "fp16"))
    run_dir = train.train(cfg, work_dir=tmp_path)  # skipped steps are not a divergence: the run finishes
    state = load_checkpoint(run_dir / "last.pt")
    assert state["optimizer"]["state"] == {}  # both steps skipped: SGD never made a momentum buffer
    assert state["scaler"]["scale"] == 65536.0 / 4  # halved by each of the 2 skipped steps
    monkeypatch.undo()

    # the same run continued under bf16 (e.g. moved from a T4 to an A100 with amp: auto), then back to fp16
    more = load_config(SYNTHETIC / "gta5_bisenet.yaml", tiny(amp_root, "bf16", **{"train.iters": 3}))
    assert train.train(more, work_dir=tmp_path, resume=str(run_dir / "last.pt"), apply_changes=True) == run_dir
    state = load_checkpoint(run_dir / "last.pt")
    assert state["scaler"] == {} and state["optimizer"]["state"]  # bf16 stepped, with no scaler
    again = load_config(SYNTHETIC / "gta5_bisenet.yaml", tiny(amp_root, "fp16", **{"train.iters": 4}))
    train.train(again, work_dir=tmp_path, resume=str(run_dir / "last.pt"), apply_changes=True)
    assert load_checkpoint(run_dir / "last.pt")["scaler"]["scale"] >= 32768.0  # fresh, not 16384
