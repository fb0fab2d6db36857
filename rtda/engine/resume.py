"""Continuing a run: find the checkpoint to resume, lock its run folder (`lock_run`), read the checkpoint, check it
against the config, restore from it.

Nothing of the resumed run is touched until its checkpoint has loaded and passed every check.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from rtda import runs
from rtda.config import (
    STRUCTURE_KEYS,
    Config,
    ConfigError,
    learning_differences,
    load_config,
    to_dict,
)
from rtda.engine.setup import Progress, TrainState
from rtda.utils.distributed import Distributed, broadcast_object
from rtda.utils.files import CheckpointError, load_checkpoint
from rtda.utils.seed import set_rng_state


class ResumePoint:
    """The checkpoint a resume continues from, read and checked before anything is written.

    `changes` ({key: (old, new)}) are the keys that change what is learned whose values differ from the
    checkpoint's config; a resume with changes stops unless they are applied on purpose (`--apply-changes`).
    """

    def __init__(self, path: Path, state: dict, saved_config: dict):
        self.path, self.state, self.saved_config = path, state, saved_config
        self.changes: dict[str, tuple] = {}

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def describe(self) -> str:
        m, a = self.saved_config.get("model", {}), self.saved_config.get("adapt", {})
        return (f"{m.get('name')}/{m.get('backbone')} with {m.get('num_classes')} classes, strategy "
                f"{a.get('name')}, at iteration {self.state.get('iteration')}")

    def check(self, cfg: Config, apply_changes: bool) -> None:
        """Refuse a checkpoint of another model or strategy, a schedule shorter than the checkpoint's
        iteration, and (unless applied on purpose) any other change of what is learned."""
        new = to_dict(cfg)
        structure = {k: v for k, v in learning_differences(self.saved_config, new).items() if k in STRUCTURE_KEYS}
        if structure:
            shown = ", ".join(f"{k}: {old!r} -> {value!r}" for k, (old, value) in structure.items())
            raise CheckpointError(f"--resume {self.path}: it holds {self.describe()}; this config differs "
                                  f"in what the checkpoint's tensors are ({shown})")
        if cfg.train.iters is not None and cfg.train.iters < self.state["iteration"]:
            raise ConfigError(f"train.iters = {cfg.train.iters} is below the iteration of {self.path} "
                              f"({self.state['iteration']}); a resume can only continue or extend a run")
        self.changes = learning_differences(self.saved_config, new)
        if self.changes and not apply_changes:
            shown = "; ".join(f"{k}: {old!r} in the run, {value!r} now" for k, (old, value) in self.changes.items())
            raise ConfigError(f"--resume {self.path}: the config differs from the run's in what is learned ({shown}). "
                              f"Resume with the run's own values, or add --apply-changes to apply them from "
                              f"iteration {self.state['iteration']} (recorded in resume_log.jsonl)")

    def apply(self, run_dir: Path, cfg: Config, parts: TrainState, dist: Distributed) -> None:
        """Apply the accepted `changes`: the optimiser and schedule take `cfg`'s hyper-parameters
        (`apply_new_hyperparameters`), and rank 0 appends them to `run_dir/resume_log.jsonl` and prints them."""
        apply_new_hyperparameters(parts, cfg)
        if dist.is_main:
            entry = {"iteration": self.state["iteration"], "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "changes": {k: list(v) for k, v in self.changes.items()}}
            with open(run_dir / "resume_log.jsonl", "a") as log:
                log.write(json.dumps(entry) + "\n")
            print(f"--apply-changes: from iteration {entry['iteration']}: " + "; ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in self.changes.items()), flush=True)


def find_resume_path(resume: str, work_dir: Path, cfg: Config, dist: Distributed) -> Path | None:
    """The checkpoint `--resume` names, not read yet. `auto`: the newest run folder's last.pt, if that run is
    unfinished and has one (None otherwise: a new run). A folder is refused with its last.pt as the suggestion."""
    if resume == "auto":
        last, reason = runs.newest_unfinished_run(work_dir, cfg.name)
        if last is None and dist.is_main:
            print(f"--resume auto: {reason}; starting a new run", flush=True)
        return last
    path = Path(resume)
    if path.is_dir():
        hint = (f"did you mean --resume {path / runs.LAST}?" if (path / runs.LAST).is_file()
                else f"it holds no {runs.LAST}")
        raise FileNotFoundError(f"--resume {resume}: a folder, expected a checkpoint file ({hint})")
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: checkpoint not found")
    return path


@contextlib.contextmanager
def lock_run(run_dir: Path, dist: Distributed):
    """Hold `run_dir`'s one-writer lock (`runs.RunLock`) for the `with` block, released on every way out.

    Only rank 0 takes it; every rank follows its decision (RunLockError on all of them when it is refused), so a
    torchrun job holds one lock. A lock taken over from a process that is gone is reported in one line."""
    lock, refused = None, None
    if dist.is_main:
        lock = runs.RunLock(run_dir)
        try:
            note = lock.acquire()
            if note:
                print(note, flush=True)
        except runs.RunLockError as exc:
            lock, refused = None, str(exc)
    refused = broadcast_object(refused)
    if refused:
        raise runs.RunLockError(refused)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def read_resume_point(path: Path, dist: Distributed) -> ResumePoint:
    """The checkpoint at `path` as a ResumePoint; CheckpointError when it is not a trainer's last.pt."""
    state = load_checkpoint(path, map_location=dist.device)
    if not isinstance(state, dict) or "iteration" not in state or "model" not in state:
        raise CheckpointError(f"--resume {path}: not a checkpoint of this trainer (no iteration and model)")
    saved = state.get("config")
    if saved is None and (path.parent / "config.yaml").is_file():  # checkpoints written before the config was kept
        saved = to_dict(load_config(path.parent / "config.yaml"))
    point = ResumePoint(path, state, saved or {})
    if "optimizer" not in state:
        raise CheckpointError(f"--resume {path}: it holds weights only ({point.describe()}); resume from "
                              f"the last.pt of its run folder, or evaluate it with eval.py")
    return point


def apply_new_hyperparameters(parts: TrainState, cfg: Config) -> None:
    """After loading a checkpoint: the optimiser's hyper-parameters, base learning rates and schedule from `cfg`
    (a loaded optimiser and scheduler keep the checkpoint's otherwise)."""
    t = cfg.train
    base = {"backbone": t.lr, "head": t.lr * t.head_lr_mult}
    for group in parts.optimizer.param_groups:
        group["initial_lr"] = base[group["name"]]
        group["weight_decay"] = t.weight_decay
        if "momentum" in group:
            group["momentum"] = t.momentum
    parts.scheduler.base_lrs = [group["initial_lr"] for group in parts.optimizer.param_groups]
    factor = parts.ctx.schedule
    parts.scheduler.lr_lambdas = [factor] * len(parts.optimizer.param_groups)
    for group in parts.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor(parts.scheduler.last_epoch)
    # LambdaLR keeps the rates it last set in a private field that get_last_lr() (and the logged lr) reads
    parts.scheduler._last_lr = [group["lr"] for group in parts.optimizer.param_groups]


def open_run(cfg: Config, work_dir: Path, point: ResumePoint | None, parts: TrainState,
             dist: Distributed) -> tuple[Path, Progress]:
    """A new run folder (rank 0 creates it, every rank gets its path), or the folder of the resume point with
    the train state and this rank's RNG state restored from it."""
    if point is None:
        run_dir = runs.new_run_dir(work_dir, cfg.name) if dist.is_main else None
        return Path(broadcast_object(str(run_dir) if run_dir else None)), Progress()
    state = point.state
    try:
        parts.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:  # tensors of another shape or module
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"--resume {point.path}: it holds {point.describe()}, which does not fit this "
                              f"config ({first})") from None
    set_rng_state(state["rng"][dist.rank % len(state["rng"])])
    return point.run_dir, Progress(state["iteration"], state["best"], state["wall_time_s"])
