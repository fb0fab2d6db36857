"""The SGD update of the official DeepLabV2 UDA code, whose backbone parameter list names each parameter several times.

AdaptSegNet, ADVENT, FDA and DACS (`get_1x_lr_params_NOscale` / `get_1x_lr_params_no_scale` of their DeepLab
models, passed to `optim.SGD` through `optim_parameters`) build the backbone's parameter list by walking modules:

    for block in (conv1, bn1, layer1, layer2, layer3, layer4):
        for module in block.modules():          # the block itself, then every module below it
            for p in module.parameters():       # recursive: every parameter below `module`
                if p.requires_grad: yield p

so a parameter is listed once per module on its path from the block down to the module that owns it: a
bottleneck conv 3 times (layerN, the Bottleneck, the conv), a downsample conv 4 times (layerN, the Bottleneck,
the downsample Sequential, the conv), the stem conv once; the frozen BN parameters not at all. Their head list
(`get_10x_lr_params`: `layer5.parameters()`, `layer6.parameters()`) names each classifier parameter once.

PyTorch's SGD of that time looped over the list, so a parameter listed k times is updated k times, one after
the other, in every step, all k updates sharing the momentum buffer `state[p]` (created by the first). PyTorch
0.4's loop (`torch0.4`; AdaptSegNet ran 0.2 and 0.4, ADVENT states 0.4.1) added the weight decay into `p.grad`
in place (`d_p = p.grad.data; d_p.add_(weight_decay, p.data)`), so the i-th update of a step sees the gradient
plus the decay of every earlier update of that step; later 1.x releases (`torch1`: by 1.4 at the latest, up to
1.7) add it to a copy. (From 1.8 on the k updates of a parameter's first step each start their own buffer;
later steps are as in `torch1`.)

`RepeatedSGD` performs the update for a parameter of multiplicity k without listing any parameter twice (current
PyTorch warns about duplicates and is to refuse them). With k = 1 it is `torch.optim.SGD` (momentum, no
dampening, no Nesterov), operation for operation.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def official_repeats(blocks: Iterable[nn.Module]) -> dict[int, int]:
    """{id(parameter): times the official walk over `blocks` lists it}, for the parameters that require grad.

    The walk is the one in the module docstring: for each block, each module of `block.modules()`, each
    parameter of `module.parameters()`. A parameter outside every block is absent from the result.
    """
    counts: dict[int, int] = {}
    for block in blocks:
        for module in block.modules():
            for p in module.parameters():
                if p.requires_grad:
                    counts[id(p)] = counts.get(id(p), 0) + 1
    return counts


class RepeatedSGD(torch.optim.Optimizer):
    """SGD that updates each parameter `repeats` times per step, as the official loop over a repeating list did.

    Each parameter group may carry `repeats`, a list of ints >= 1 aligned with its `params` (default: all 1).
    For a parameter p with gradient g and multiplicity k, one `step()` does, for i = 1..k:

        d = g + weight_decay * p        (inplace_decay: d = d + weight_decay * p, d starting as g)
        buf = d if buf is None else momentum * buf + d
        p = p - lr * buf                (p = p - lr * d when momentum == 0)

    `buf` is `state[p]["momentum_buffer"]`, kept across steps (and in `state_dict()`). `p.grad` is not modified.
    Works under `GradScaler.step`, which unscales the gradients before calling `step()`.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 inplace_decay: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"RepeatedSGD: lr = {lr}, momentum = {momentum}, weight_decay = {weight_decay}: "
                             f"expected values >= 0")
        # dampening and nesterov: the values this update implements, named so that torch.optim.SGD can load its
        # state_dict (a resume that turns the option off with --apply-changes)
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "inplace_decay": inplace_decay,
                    "dampening": 0.0, "nesterov": False}
        super().__init__(params, defaults)
        for group in self.param_groups:
            repeats = group.setdefault("repeats", [1] * len(group["params"]))
            if len(repeats) != len(group["params"]) or any(not isinstance(k, int) or k < 1 for k in repeats):
                raise ValueError(f"RepeatedSGD: a group's `repeats` = {repeats}: expected one int >= 1 per "
                                 f"parameter ({len(group['params'])} parameters)")

    def load_state_dict(self, state_dict: dict) -> None:
        """Momentum buffers and learning rates from `state_dict`; the multiplicities and loop stay this optimiser's.

        They follow from the model and the config, not from the checkpoint, so a state saved by
        torch.optim.SGD (a resume that turns the option on with --apply-changes) loads too.
        """
        kept = [(group["repeats"], group["inplace_decay"]) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, (repeats, inplace_decay) in zip(self.param_groups, kept):
            group["repeats"], group["inplace_decay"] = repeats, inplace_decay

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p, repeats in zip(group["params"], group["repeats"]):
                if p.grad is not None:
                    self._update(p, repeats, group)
        return loss

    def _update(self, p: torch.Tensor, repeats: int, group: dict) -> None:
        """The `repeats` sequential SGD updates of one parameter (the class docstring's formula)."""
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        state = self.state[p]
        d_p, buf = p.grad, state.get("momentum_buffer")
        for _ in range(repeats):
            # torch0.4 added the decay into .grad itself, so each repeat starts from the last one's d_p
            base = d_p if group["inplace_decay"] else p.grad
            d_p = base.add(p, alpha=weight_decay) if weight_decay != 0 else base
            if momentum != 0:
                buf = torch.clone(d_p).detach() if buf is None else buf.mul_(momentum).add_(d_p)
                p.add_(buf, alpha=-lr)
            else:
                p.add_(d_p, alpha=-lr)
        if momentum != 0:
            state["momentum_buffer"] = buf
