"""Mixed precision: which autocast dtype a device gets for `train.amp`, the autocast context and the GradScaler."""
from __future__ import annotations

import contextlib

import torch

from rtda.config import ConfigError

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.amp` on `device`; None means no autocast (full float32).

    `auto`: on CUDA bf16 where the GPU has native bf16 tensor cores (compute capability >= 8.0: Ampere and
    later), else fp16 with the GradScaler (a T4, 7.5, reports bf16 support through emulation but has no fast
    bf16 convolutions); on CPU float32. `bf16` / `fp16` force that dtype on any device (on CPU they run under
    CPU autocast, which is how the tests exercise the AMP paths); `none` is float32 everywhere.
    """
    if amp not in AMP_CHOICES:
        raise ConfigError(f"train.amp = {amp!r}: expected one of {', '.join(AMP_CHOICES)}")
    if amp == "none":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"train.amp = 'bf16': {torch.cuda.get_device_name(device)} (compute capability "
                          f"{major}.{minor}) has no bf16 support; use train.amp=auto or fp16")
    return _AMP_DTYPES[amp]


def amp_name(dtype: torch.dtype | None) -> str:
    """`bf16`, `fp16` or `none`: what `autocast_dtype` chose, in the config's words."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "none"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """The loss scaler for `dtype`: active for fp16 only (bf16 has float32's range), on CUDA or CPU alike."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> None:
    """Restore a scaler from a checkpoint, also across AMP modes: a run saved under bf16 or float32 (a disabled
    scaler saves `{}`) resumed under fp16 starts a fresh scale; an fp16 run resumed under bf16 drops it."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)
