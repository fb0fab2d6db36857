"""The exponential moving average that DACS's (and MIC's) teacher follows."""
from __future__ import annotations

import torch


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], alpha: float) -> None:
    """teacher = alpha * teacher + (1 - alpha) * student, in place, for all parameters in one fused call.
    The two lists pair up position by position (same shapes and dtypes)."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - alpha)


def ema_alpha(iteration: int, cap: float) -> float:
    """The teacher's alpha at `iteration`: min(1 - 1 / (iteration + 1), cap), so that the teacher follows the
    student closely at the start and with weight `cap` (`adapt.ema_alpha`) later."""
    return min(1.0 - 1.0 / (iteration + 1), cap)
