"""Watching a run while it trains: divergence, running loss means, and stop requests (signals, wall time).

Each keeps its state on the device or in a flag, so that the loop waits for the device only when it asks.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch
from torch import nn

from rtda.config import Config
from rtda.utils.distributed import Distributed, all_reduce_sum, host_group


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite."""


def weights_finite(model: nn.Module) -> torch.Tensor:
    """A device bool: every floating-point tensor of the model's state is finite."""
    return torch.stack([t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()]).all()


class DivergenceGuard:
    """Tracks on the device whether every loss stayed finite; `check` is the one host sync, at intervals.

    All ranks stop together, and the message says which checkpoint is the last good one.
    """

    def __init__(self, cfg: Config, model: nn.Module, last_checkpoint: Path, device: torch.device):
        self.cfg, self.model, self.last = cfg, model, last_checkpoint
        self.finite = torch.ones((), dtype=torch.bool, device=device)

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        self.finite &= torch.isfinite(sum(losses.values()))

    def check(self, iteration: int, weights: bool = False) -> None:
        """Did any loss since the start (or, with `weights`, any weight) stop being finite? Then raise.

        A collective under DDP: every rank must call it at the same iteration.
        """
        ok = self.finite if not weights else self.finite & weights_finite(self.model)
        bad = all_reduce_sum((~ok).float().reshape(1))
        if bool(bad > 0):
            kept = f"the last good checkpoint is {self.last}" if self.last.exists() else "no checkpoint was written"
            raise TrainingDiverged(f"loss or weights became NaN/inf by iteration {iteration} of {self.cfg.name}; "
                                   f"{kept}. Lower train.lr (now {self.cfg.train.lr:g}) or check the data")


class LossMeter:
    """Sums of the named losses on the device since the last `pop_means` (no host sync until then)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.float()
        self.count += 1

    def pop_means(self) -> dict[str, float]:
        means = dict(zip(self.sums, (torch.stack(list(self.sums.values())) / self.count).tolist()))
        self.sums, self.count = {}, 0
        return means


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads between iterations; a second Ctrl-C interrupts at once.

    A context manager that installs the handlers (main thread only) and restores the previous ones on exit;
    re-entrant, because the CLI listens from its start and `train()` enters it again.
    """

    def __init__(self):
        self.requested = False
        self.reason: str | None = None  # "SIGINT", "SIGTERM" or "wall time"
        self.signum: int | None = None
        self._previous = {}
        self._depth = 0
        self._vote = None  # under DDP: the all_reduce in flight and its tensor (see `agreed`)
        self.joint = False  # under DDP: every rank agreed to stop (so every rank leaves through the same path)

    def request(self, reason: str) -> None:
        self.requested, self.reason = True, self.reason or reason

    def __enter__(self):
        self._depth += 1  # re-entrant: the CLI listens from its start, train() again inside
        if self._depth > 1 or threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        self.request(signal.Signals(signum).name)

    # What each rank votes, in the order that decides which one names a joint stop (SIGTERM before SIGINT).
    _VOTES = ("SIGTERM", "SIGINT", "wall time")

    def agreed(self, dist: Distributed, final: bool = False) -> bool:
        """Whether to stop now; call it after every iteration, on every rank (under DDP a collective).

        One process: the flag itself. Under DDP ranks must stop at the same iteration, so they vote: each call
        waits for the vote started by the previous call (a non-blocking all_reduce of three integers over a gloo
        group, `host_group`: host memory, so nothing waits for the device) and starts the next one. A request
        made during iteration i therefore stops every rank after iteration i + 1, and the vote in flight costs the
        loop only the wait for the slowest rank's host to reach the previous iteration. A joint stop takes the
        reason (and `signum`, hence the exit code) of the highest-priority request, on every rank. `final` (the
        last iteration): settle the vote in flight and start none.
        """
        if not dist.enabled:
            return self.requested
        votes = None
        if self._vote is not None:
            work, votes = self._vote
            work.wait()
            self._vote = None
        stop = votes is not None and bool(votes.any())
        if stop:
            reason = self._VOTES[int(votes.nonzero()[0])]
            self.requested, self.reason, self.joint = True, reason, True
            self.signum = int(getattr(signal, reason)) if reason != "wall time" else None
        elif not final:
            mine = torch.tensor([self.signum == signal.SIGTERM, self.signum == signal.SIGINT,
                                 self.requested and self.reason == "wall time"], dtype=torch.int64)
            self._vote = (torch.distributed.all_reduce(mine, group=host_group(), async_op=True), mine)
        return stop

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}
