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


FLOP_CONVENTION = ("torch.utils.flop_counter.FlopCounterMode: 2 flops per multiply-add; macs = flops / 2, "
                   "the convention of fvcore and of the course's reference numbers")
FVCORE_MISSING = "fvcore is not installed, so there is no fvcore cross-check: pip install fvcore"


def count_flops(model: nn.Module, image: torch.Tensor) -> dict:
    """FLOPs of one eval forward of `image`, counted by `torch.utils.flop_counter.FlopCounterMode`.

    Returns {"flops", "gflops", "macs", "gmacs", "by_operator" (flops per aten op), "convention", "fvcore"}:
    FlopCounterMode counts 2 flops per multiply-add, so `macs` = flops / 2. "fvcore" is fvcore's count as a
    cross-check ({macs, gmacs, by_operator, skipped_ops}), or None with "fvcore_note" when fvcore does not import.
    The model's training mode is restored.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(image)
        fvcore = _fvcore_count(model, image)
    finally:
        model.train(was_training)
    flops = int(counter.get_total_flops())
    by_operator = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    out = {"flops": flops, "gflops": round(flops / 1e9, 3), "macs": flops // 2, "gmacs": round(flops / 2e9, 3),
           "by_operator": by_operator, "convention": FLOP_CONVENTION, "fvcore": fvcore}
    if fvcore is None:
        out["fvcore_note"] = FVCORE_MISSING
    return out


def _fvcore_count(model: nn.Module, image: torch.Tensor) -> dict | None:
    """fvcore's count (one fused multiply-add = one flop: MACs, and the ops it skipped); None without fvcore."""
    with warnings.catch_warnings():
        # fvcore scripts and traces with torch.jit, which torch now marks as deprecated: fvcore's business.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            from fvcore.nn import FlopCountAnalysis
        except ImportError:
            return None
        analysis = (FlopCountAnalysis(model, image).unsupported_ops_warnings(False)
                    .uncalled_modules_warnings(False).tracer_warnings("none"))
        total = analysis.total()
        return {"macs": int(total), "gmacs": round(total / 1e9, 3), "by_operator": dict(analysis.by_operator()),
                "skipped_ops": dict(analysis.unsupported_ops())}
