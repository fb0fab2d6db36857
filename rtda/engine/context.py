"""The whole contract a strategy sees while it trains: `StepContext`."""
from __future__ import annotations

from collections.abc import Callable

import torch

from rtda.utils.amp import autocast


class StepContext:
    """What a strategy may use inside `training_step`: the iteration, autocast, and the AMP-aware backward/step.

    With `train.accumulate` = N the trainer calls `training_step` N times per iteration on micro-batches
    (`micro_step` 0..N-1). `backward` scales each loss by 1/N, and a strategy-owned optimiser is zeroed by
    `zero_grad` on the first micro-batch and stepped by `step` on the last, so an iteration still means one
    optimiser step on the whole batch.
    """

    def __init__(self, max_iters: int, device: torch.device, amp_dtype: torch.dtype | None,
                 scaler: torch.amp.GradScaler, lr_factor, accumulate: int = 1):
        self.iteration = 0
        self.max_iters = max_iters
        self.device = device
        self.amp_dtype = amp_dtype
        self.scaler = scaler
        self._lr_factor = lr_factor
        self.accumulate = accumulate
        self.micro_step = 0

    @property
    def lr_factor(self) -> float:
        """The schedule's multiplier at this iteration (poly decay after warm-up), for strategy-owned optimisers."""
        return self._lr_factor(self.iteration)

    @property
    def schedule(self) -> Callable[[int], float]:
        """The schedule itself: iteration -> LR multiplier (what the model's LambdaLR steps through)."""
        return self._lr_factor

    @property
    def last_micro_step(self) -> bool:
        return self.micro_step == self.accumulate - 1

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accumulate if self.accumulate > 1 else loss).backward()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero a strategy-owned optimiser's gradients (on the first micro-batch of an iteration only)."""
        if self.micro_step == 0:
            optimizer.zero_grad(set_to_none=True)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step an optimiser the strategy owns (e.g. a discriminator's) on the last micro-batch; the trainer
        updates the scaler once."""
        if self.last_micro_step:
            self.scaler.step(optimizer)
