"""The run folder's checkpoint files: `last.pt` for a resume, weights-only files to evaluate or deploy.

Checkpoint keys (what a resume and eval.py read back):
    last.pt       iteration, model, optimizer, scheduler, scaler, strategy, rng (one per rank), best,
                  wall_time_s, config_name, config
    best.pt, snapshots/iter_NNNNNNN.pt    iteration, model, best, config_name
"""
from __future__ import annotations

from pathlib import Path

import torch

from rtda import runs
from rtda.config import Config, to_dict
from rtda.engine.monitor import DivergenceGuard
from rtda.engine.setup import Progress, TrainState
from rtda.utils.distributed import Distributed
from rtda.utils.files import save_checkpoint
from rtda.utils.seed import rng_state


class Checkpointer:
    """Writes a run's checkpoints, and refuses to write one of a run that has diverged.

    Every save first runs `guard.check(iteration, weights=True)` (a collective: all ranks call every save at the
    same iteration), so a NaN/inf loss since the start or a non-finite weight raises TrainingDiverged and the
    previous files stay as they were. Every rank contributes its RNG state to last.pt; rank 0 writes. Files are
    written atomically.
    """

    def __init__(self, cfg: Config, run_dir: Path, parts: TrainState, dist: Distributed,
                 guard: DivergenceGuard | None = None):
        self.cfg, self.parts, self.dist = cfg, parts, dist
        self.run_dir = run_dir
        self.last, self.best = run_dir / runs.LAST, run_dir / runs.BEST
        self.guard = guard or DivergenceGuard(cfg, parts.model, self.last, dist.device)

    def save_last(self, progress: Progress) -> None:
        """Everything a resume needs, at `progress.iteration`."""
        self.guard.check(progress.iteration, weights=True)
        rng = [rng_state()]
        if self.dist.enabled:
            rng = [None] * self.dist.world_size
            torch.distributed.all_gather_object(rng, rng_state())
        if self.dist.is_main:
            save_checkpoint({
                "iteration": progress.iteration, **self.parts.state_dict(), "rng": rng, "best": progress.best,
                "wall_time_s": progress.wall_time(), "config_name": self.cfg.name, "config": to_dict(self.cfg),
            }, self.last)

    def snapshot(self, iteration: int) -> Path:
        return runs.snapshot_path(self.run_dir, iteration)

    def save_weights(self, path: Path, progress: Progress) -> None:
        """The weights to evaluate or deploy (best.pt, snapshots); a resume continues from last.pt."""
        self.guard.check(progress.iteration, weights=True)
        if self.dist.is_main:
            save_checkpoint({"iteration": progress.iteration, "model": self.parts.model.state_dict(),
                             "best": progress.best, "config_name": self.cfg.name}, path)
