"""Model complexity for one eval forward: parameter counts and FLOPs."""
from __future__ import annotations

import warnings

import torch
from torch import nn


def count_parameters(model: nn.Module, image: torch.Tensor) -> dict:
    """Total and trainable parameters, and those the eval forward of `image` actually uses.

    `inference` leaves out what only training calls (aux heads) and what nothing calls (an unused
    torchvision fc); it is found by hooking every module that owns parameters during one eval forward.
    """
    owners = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    called: set[int] = set()
    hooks = [m.register_forward_hook(lambda module, args, out: called.add(id(module))) for m in owners]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(image)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    used = {id(p): p for m in owners if id(m) in called for p in m.parameters(recurse=False)}
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "inference": sum(p.numel() for p in used.values())}


def count_flops(model: nn.Module, image: torch.Tensor) -> dict:
    """fvcore's count for one eval forward of `image`: MACs in total and by operator, and the skipped ops."""
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # fvcore scripts and traces with torch.jit, which torch now marks as deprecated: fvcore's business.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            from fvcore.nn import FlopCountAnalysis

            analysis = (FlopCountAnalysis(model, image).unsupported_ops_warnings(False)
                        .uncalled_modules_warnings(False).tracer_warnings("none"))
            total = analysis.total()
            by_operator = dict(analysis.by_operator())
            skipped = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)
    return {"macs": int(total), "gmacs": round(total / 1e9, 3), "by_operator": by_operator,
            "skipped_ops": skipped, "convention": "fvcore: one fused multiply-add = one flop (MACs)"}
