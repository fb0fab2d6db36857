"""train.official_param_repeats: the official optimisers' repeated backbone updates (rtda/utils/repeated_sgd.py).

The reference is the official recipe itself: the parameter list built by AdaptSegNet's / ADVENT's / FDA's / DACS's
module walk (duplicates included), stepped by the SGD loop of the PyTorch they ran (transcribed below for its
first step and for PyTorch <= 1.0; torch.optim.SGD with the duplicated list for the later steps of 1.1-1.7).
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from rtda import engine as train
from rtda.config import ConfigError, load_config
from rtda.models import build_model
from rtda.utils.distributed import Distributed
from rtda.utils.repeated_sgd import RepeatedSGD, official_repeats
from rtda.utils.seed import seed_everything

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 0.01  # a decay large enough for the torch0.4 / torch1 difference to show


def frozen_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    return bn


class Bottleneck(nn.Module):
    def __init__(self, channels: int, downsample: bool):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 1, bias=False), frozen_bn(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), frozen_bn(channels)
        self.downsample = (nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), frozen_bn(channels))
                           if downsample else None)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))


class TinyDeepLab(nn.Module):
    """The official DeepLab's nesting in miniature: stem conv + frozen BN, layers of bottlenecks, a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), frozen_bn(4)
        self.layer1 = nn.Sequential(Bottleneck(4, True), Bottleneck(4, False))
        self.layer2 = nn.Sequential(Bottleneck(4, True))
        self.layer5 = nn.Conv2d(4, 3, 3, padding=1)  # the classifier: listed once, at 10x the LR

    def forward(self, x):
        return self.layer5(self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x))))))

    def blocks(self):
        return [self.conv1, self.bn1, self.layer1, self.layer2]

    def get_1x_lr_params_NOscale(self):  # the official walk, duplicates included
        for block in self.blocks():
            for module in block.modules():
                for p in module.parameters():
                    if p.requires_grad:
                        yield p


def backward(model: nn.Module, step: int, scaler: torch.amp.GradScaler | None = None) -> None:
    model.zero_grad()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
    loss = model(x).square().mean()
    (scaler.scale(loss) if scaler is not None else loss).backward()


@torch.no_grad()
def official_loop_step(groups: list[dict], state: dict, inplace_decay: bool) -> None:
    """One step of the SGD loop of PyTorch 0.4 (inplace_decay) or 1.1-1.7 over lists that repeat parameters."""
    for group in groups:
        for p in group["params"]:
            d_p = p.grad
            if inplace_decay:
                d_p.add_(p, alpha=WEIGHT_DECAY)  # 0.4: `d_p.add_(weight_decay, p.data)` on p.grad itself
            else:
                d_p = d_p.add(p, alpha=WEIGHT_DECAY)
            if p not in state:
                buf = state[p] = d_p.clone()
            else:
                buf = state[p].mul_(MOMENTUM).add_(d_p)
            p.add_(buf, alpha=-group["lr"])


def official_groups(model: TinyDeepLab) -> list[dict]:
    return [{"params": list(model.get_1x_lr_params_NOscale()), "lr": LR},
            {"params": list(model.layer5.parameters()), "lr": 10 * LR}]


def ours(model: TinyDeepLab, inplace_decay: bool) -> RepeatedSGD:
    counts = official_repeats(model.blocks())
    backbone = [p for block in model.blocks() for p in block.parameters() if p.requires_grad]
    return RepeatedSGD([{"params": backbone, "lr": LR, "repeats": [counts[id(p)] for p in backbone]},
                        {"params": list(model.layer5.parameters()), "lr": 10 * LR}],
                       lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, inplace_decay=inplace_decay)


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-15, msg=name)


@pytest.fixture
def model() -> TinyDeepLab:
    torch.manual_seed(0)
    return TinyDeepLab().double()


def test_the_walk_lists_a_bottleneck_conv_3_times_a_downsample_conv_4_and_the_stem_once(model):
    counts = Counter(id(p) for p in model.get_1x_lr_params_NOscale())
    assert official_repeats(model.blocks()) == dict(counts)
    assert counts[id(model.conv1.weight)] == 1
    assert counts[id(model.layer1[1].conv2.weight)] == 3
    assert counts[id(model.layer2[0].downsample[0].weight)] == 4
    assert id(model.layer1[0].bn1.weight) not in counts  # frozen BN: not listed


def test_torch04_rule_equals_the_official_loop_over_the_repeating_list(model):
    reference = copy.deepcopy(model)
    groups, state = official_groups(reference), {}
    optimizer = ours(model, inplace_decay=True)
    for step in range(4):
        backward(reference, step)
        official_loop_step(groups, state, inplace_decay=True)
        backward(model, step)
        optimizer.step()
    assert_same_parameters(model, reference)


def test_torch1_rule_equals_torch_sgd_over_the_repeating_list(model):
    reference = copy.deepcopy(model)
    groups, state = official_groups(reference), {}
    backward(reference, 0)
    official_loop_step(groups, state, inplace_decay=False)  # step 1: the buffer made by the first repeat
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "optimizer contains a parameter group with duplicate parameters")
        sgd = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=False)
    for p, buf in state.items():
        sgd.state[p]["momentum_buffer"] = buf
    for step in range(1, 4):  # later steps: torch's own loop, the buffer shared by the repeats
        backward(reference, step)
        sgd.step()
    optimizer = ours(model, inplace_decay=False)
    for step in range(4):
        backward(model, step)
        optimizer.step()
    assert_same_parameters(model, reference)


def test_without_repeats_it_is_torch_sgd(model):
    reference = copy.deepcopy(model)
    sgd = torch.optim.SGD(reference.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=False)
    optimizer = RepeatedSGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for step in range(3):
        backward(reference, step)
        sgd.step()
        backward(model, step)
        optimizer.step()
    for pa, pb in zip(model.parameters(), reference.parameters()):
        assert torch.equal(pa, pb)


def test_grad_scaler_and_a_state_dict_round_trip_give_the_straight_run(model):
    straight = copy.deepcopy(model)
    optimizer = ours(straight, inplace_decay=True)
    for step in range(4):
        backward(straight, step)
        optimizer.step()

    first = ours(model, inplace_decay=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for step in range(2):
        backward(model, step, scaler)
        scaler.step(first)  # unscales the gradients, then steps
        scaler.update()
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 8
    resumed = copy.deepcopy(model)
    second = ours(resumed, inplace_decay=True)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    for step in range(2, 4):
        backward(resumed, step)
        second.step()
    assert_same_parameters(resumed, straight)
    assert second.param_groups[0]["repeats"] == first.param_groups[0]["repeats"]


def test_state_dicts_load_across_torch_sgd_and_repeated_sgd(model):
    """A resume that turns the option on or off (--apply-changes) loads the other optimiser's state."""
    repeated = ours(model, inplace_decay=False)
    backward(model, 0)
    repeated.step()
    sgd = torch.optim.SGD([{"params": g["params"]} for g in repeated.param_groups], lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)
    sgd.load_state_dict(copy.deepcopy(repeated.state_dict()))
    sgd.step()  # the buffers carried over; the group keys SGD reads are there
    again = ours(model, inplace_decay=True)
    again.load_state_dict(copy.deepcopy(sgd.state_dict()))
    assert again.param_groups[0]["repeats"] == repeated.param_groups[0]["repeats"]
    assert again.param_groups[0]["inplace_decay"]
    again.step()


# ------------------------------------------------------------------------------------- the project's model
def test_deeplabv2_multiplicities_are_the_official_walks():
    cfg = load_config(REPO / "configs" / "gta5_deeplabv2_adv_paper.yaml",
                      ["model.pretrained=none", "train.official_param_repeats=torch0.4"])
    model = build_model(cfg.model)
    optimizer = train.build_optimizer(model, cfg)
    assert isinstance(optimizer, RepeatedSGD) and optimizer.param_groups[0]["inplace_decay"]
    names = {id(p): name for name, p in model.named_parameters()}
    backbone, head = optimizer.param_groups
    repeats = {names[id(p)]: k for p, k in zip(backbone["params"], backbone["repeats"])}
    assert repeats["backbone.conv1.weight"] == 1
    assert repeats["backbone.layer1.0.conv1.weight"] == repeats["backbone.layer4.2.conv3.weight"] == 3
    assert repeats["backbone.layer3.0.downsample.0.weight"] == 4
    assert not [name for name in repeats if ".bn" in name or "downsample.1" in name]  # frozen BN left out
    assert set(head["repeats"]) == {1}
    b = model.backbone  # the official walk over the blocks of the official model, spelled out
    walked = Counter(id(p) for block in (b.conv1, b.bn1, b.layer1, b.layer2, b.layer3, b.layer4)
                     for module in block.modules() for p in module.parameters() if p.requires_grad)
    assert {id(p): k for p, k in zip(backbone["params"], backbone["repeats"])} == dict(walked)


def test_official_param_repeats_needs_sgd():
    cfg = load_config(REPO / "configs" / "gta5_bisenet_daformer_dacs.yaml",
                      ["model.pretrained=none", "train.official_param_repeats=torch1"])
    with pytest.raises(ConfigError, match="train.official_param_repeats = 'torch1'.*train.optimizer = 'adamw'"):
        train.build_optimizer(build_model(cfg.model), cfg)


def test_the_trainer_steps_with_it_and_a_checkpoint_resumes_it(tmp_path):
    cfg = load_config(REPO / "configs" / "synthetic" / "gta5_bisenet.yaml", tiny_overrides(
        tmp_path, **{"train.optimizer": "sgd", "train.official_param_repeats": "torch1"}))
    seed_everything(0)
    parts = train.build_parts(cfg, Distributed(), max_iters=4)
    assert isinstance(parts.optimizer, RepeatedSGD) and max(parts.optimizer.param_groups[0]["repeats"]) == 4
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (2, 3, 64, 128), dtype=torch.uint8, generator=gen),
             "label": torch.randint(0, 19, (2, 64, 128), generator=gen)}

    def step(p):
        train.train_step(p.train_model, p.strategy, p.optimizer, p.scheduler, batch, None, p.ctx)

    step(parts)
    seed_everything(1)
    resumed = train.build_parts(cfg, Distributed(), max_iters=4)
    resumed.load_state_dict(copy.deepcopy(parts.state_dict()))
    step(parts)
    step(resumed)
    for (name, a), b in zip(parts.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
