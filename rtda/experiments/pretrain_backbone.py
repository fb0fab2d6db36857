"""The backbone of the synthetic table's rows, pretrained on randomised synthetic scenes.

What ImageNet weights are to real UDA, for the synthetic table (`make benchmark-synthetic` makes it once). The
task: on `randomised` scenes (never the benchmark's source or target images), per cell of the backbone's last
feature map, which classes cover >= PRETRAIN_MIN_SHARE of it: a multi-label classifier on a 1x1 conv, no
segmentation head. Only the backbone is kept; docs/results/log.md records why.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rtda.config import load_config
from rtda.experiments.common import SYNTHETIC, ExperimentError
from rtda.models.base import InputNorm
from rtda.models.resnet import RESNETS, build_resnet, resnet_features
from rtda.utils.env import environment
from rtda.utils.files import atomic_write_text, file_sha256

PRETRAIN_DEFAULTS = {"steps": 2400, "images": 8000, "batch": 32, "lr": 2e-3, "weight_decay": 1e-2, "seed": 0}
PRETRAIN_MIN_SHARE = 0.02  # a class is present in a cell when it covers this share of the cell's pixels
PRETRAIN_CONFIG = SYNTHETIC / "gta5_bisenet.yaml"  # the backbone, its input norm and the read size


def render_pretraining_set(cfg, images: int, seed: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`images` randomised scenes rendered at data.synthetic's size and read at data.source.size, as uint8
    images (N, 3, H, W), with their per-cell class presence on `grid` as float targets (N, C, *grid)."""
    from rtda.datasets.labels import ID_TO_TRAIN_ID
    from rtda.datasets.synthetic import render_scene
    from rtda.datasets.transforms import resize_image

    width, height = cfg.data.source.size
    num_classes, gen = cfg.model.num_classes, cfg.data.synthetic
    xs, ys = [], []
    for index in range(images):
        image, label = render_scene("randomised", index, gen.seed + seed, gen.height, gen.width)
        xs.append(resize_image(torch.from_numpy(image.copy()).permute(2, 0, 1), (height, width),
                               cfg.data.source.interpolation))
        train_ids = torch.from_numpy(ID_TO_TRAIN_ID[label].astype(np.int64))
        onehot = nn.functional.one_hot(train_ids.clamp(max=num_classes), num_classes + 1)[..., :num_classes]
        share = nn.functional.adaptive_avg_pool2d(onehot.permute(2, 0, 1)[None].float(), grid)[0]
        ys.append(share >= PRETRAIN_MIN_SHARE)
    return torch.stack(xs), torch.stack(ys).float()


def pretrain(net: nn.Module, head: nn.Module, norm: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor,
             steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    """`steps` AdamW steps with the trainer's poly schedule on random batches of the set (each flipped with
    probability 0.5, its grid with it), drawn from a generator seeded with `seed`; returns the losses."""
    from rtda.engine import poly_schedule

    params = [*net.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=PRETRAIN_DEFAULTS["lr"], weight_decay=PRETRAIN_DEFAULTS["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(steps, 0.9))
    draw = torch.Generator().manual_seed(seed)
    net.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(0, len(x_all), (batch,), generator=draw)
        x, y = x_all[pick], y_all[pick]
        if torch.rand((), generator=draw) < 0.5:  # a horizontal flip, the grid's labels with it
            x, y = x.flip(-1), y.flip(-1)
        _, features = resnet_features(net, norm(x))
        loss = nn.functional.binary_cross_entropy_with_logits(head(features), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
    return losses


def save_backbone(net: nn.Module, out: Path, recipe: dict) -> None:
    """The state dict at `out` (written whole, then renamed: never a half file under `out`), its sha256 added
    to `recipe`, and the recipe at `out` + `.json`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(net.state_dict(), partial)
    recipe["sha256"] = file_sha256(partial)  # so that a file pretrained again can be checked against a table's
    atomic_write_text(Path(str(out) + ".json"), json.dumps(recipe, indent=2) + "\n")
    partial.replace(out)


def pretrain_synthetic_backbone(out: Path, overrides: list[str] = (), steps: int = PRETRAIN_DEFAULTS["steps"],
                                images: int = PRETRAIN_DEFAULTS["images"], batch: int = PRETRAIN_DEFAULTS["batch"],
                                seed: int = PRETRAIN_DEFAULTS["seed"]) -> dict:
    """Pretrain the backbone of the synthetic rows (`PRETRAIN_CONFIG` with `overrides`) on `images` randomised
    scenes for `steps` AdamW steps of `batch`, and write its state dict (torchvision key names, what
    `model.pretrained: FILE` loads) to `out`, with the recipe and the last losses in `out` + `.json`. Returns the
    recipe."""
    from rtda.datasets.synthetic import GENERATOR_VERSION

    cfg = load_config(PRETRAIN_CONFIG, list(overrides))
    for name, value in (("steps", steps), ("images", images), ("batch", batch)):
        if value < 1:
            raise ExperimentError(f"--pretrain-synthetic: {name} {value}: expected a positive integer")
    width, height = cfg.data.source.size
    torch.manual_seed(seed)  # the initialisation; the renders are their own pure functions of (seed, index)
    net = build_resnet(cfg.model.backbone, cfg.model.resnet_variant)
    norm = InputNorm(cfg.model.input_norm)
    head = nn.Conv2d(RESNETS[cfg.model.backbone][3], cfg.model.num_classes, 1)
    with torch.no_grad():  # the size of layer4's map: the label grid (eval, so no BN statistics move)
        grid = tuple(resnet_features(net.eval(), torch.zeros(1, 3, height, width))[1].shape[-2:])
    x_all, y_all = render_pretraining_set(cfg, images, seed, grid)
    start = time.perf_counter()
    losses = pretrain(net, head, norm, x_all, y_all, steps, batch, seed)
    last = torch.stack(losses[-50:]).mean().item()  # one host sync, at the end
    task = f"per-cell class presence (>= {PRETRAIN_MIN_SHARE:.0%} of a cell of a {grid[0]}x{grid[1]} grid)"
    recipe = {"task": task + " on randomised synthetic scenes", "generator": GENERATOR_VERSION,
              "backbone": cfg.model.backbone, "resnet_variant": cfg.model.resnet_variant,
              "input_norm": cfg.model.input_norm, "size": [width, height], "steps": steps, "images": images,
              "batch": batch, "seed": seed, "lr": PRETRAIN_DEFAULTS["lr"],
              "weight_decay": PRETRAIN_DEFAULTS["weight_decay"], "loss_first": losses[0].item(),
              "loss_last50": last, "wall_time_s": time.perf_counter() - start,
              # Weights depend on the machine's kernels: the record names its torch, CPU kernel set and threads.
              "machine": environment(torch.device("cpu"))}
    save_backbone(net, Path(out), recipe)
    return recipe
