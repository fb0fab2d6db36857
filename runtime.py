"""What a run needs from its machine: seeding and RNG state, distributed set-up, data order, AMP, checkpoint files.

Everything here is independent of segmentation; train.py and eval.py build on it.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from config import ConfigError


# ------------------------------------------------------------------------------------------ seeding
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (every device); `deterministic` also pins the kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick the fastest kernels once


def init_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed NumPy and Python from the worker's torch seed; leave Ctrl-C to the
    main process (which stops at an iteration boundary and shuts the workers down itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_seed = torch.initial_seed() % 2**32  # the loader sets it from its own generator and the worker id
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def rng_state() -> dict:
    """Every global RNG state as tensors and lists, so that `torch.load(weights_only=True)` can read it back."""
    version, mt_state, gauss_next = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss_next],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt_state, gauss_next = state["python"]
    random.setstate((version, tuple(mt_state), gauss_next))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Distributed:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU); else one process.

    With more processes on a node than it has GPUs (a 2-process check on one GPU), the processes share the GPUs
    round-robin and talk over gloo, since NCCL refuses two ranks on one device: slow, for checks only.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    shared_gpu = False
    if cuda:
        gpus = torch.cuda.device_count()
        shared_gpu = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > gpus
        torch.cuda.set_device(local_rank % gpus)
    device = torch.device("cuda", local_rank % gpus) if cuda else torch.device("cpu")
    if world_size == 1:
        return Distributed(device=device)
    if not dist.is_initialized():
        nccl = cuda and not shared_gpu
        if shared_gpu and local_rank == 0:
            print(f"{os.environ['LOCAL_WORLD_SIZE']} processes share {gpus} GPU(s) on this node: gloo instead of "
                  "NCCL (slow; for checks, not for training)", flush=True)
        dist.init_process_group(backend="nccl" if nccl else "gloo", device_id=device if nccl else None)
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across processes in place (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable object on every process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ------------------------------------------------------------------------------------------ data order
class EpochSampler(torch.utils.data.Sampler):
    """Shuffled indices from a generator seeded by (seed, epoch), sharded by rank, able to skip a prefix.

    The order depends only on (seed, epoch, rank, world size), never on the global RNG or the number of
    workers, so a resumed run can skip exactly the samples its previous life consumed. Each rank gets
    `len(dataset) // world_size` indices (the tail is dropped, so every rank takes the same number of steps).
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start `epoch`, leaving out this rank's first `skip` indices (already consumed before a resume)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.size // self.world_size - self.skip

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        per_rank = self.size // self.world_size
        mine = order[self.rank : per_rank * self.world_size : self.world_size]
        return iter(mine[self.skip :].tolist())


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation order: rank r takes indices r, r + world_size, ...; every sample is scored exactly once."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, size, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def epoch_seed(seed: int, epoch: int) -> int:
    """One 63-bit seed per (seed, epoch) pair, far apart for neighbouring pairs."""
    return (seed * 1_000_003 + epoch * 7_919 + 0x5DEECE66D) % (2**63 - 1)


# ---------------------------------------------------------------------------------------------- AMP
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


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` atomically: a temporary file in the same folder, fsync, then rename over `path`.

    A crash or a full disk at any point leaves the previous file at `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a save that was killed mid-write
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(exc, (OSError, RuntimeError)):  # torch's zip writer reports a full disk as a RuntimeError
            free = shutil.disk_usage(path.parent).free
            kept = f"the previous {path.name} is untouched" if path.exists() else "no earlier one was written"
            raise CheckpointError(f"{path}: could not write the checkpoint ({exc}); {free / 2**20:.0f} MiB free in "
                                  f"{path.parent}; {kept}") from exc
        raise
    with contextlib.suppress(OSError):  # persist the rename itself (not possible on every file system)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def output_folder_problem(folder: Path) -> str | None:
    """Why `folder` cannot receive outputs (a file where it or a parent should be, no write permission), or None."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, expected a folder (nothing was written)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or written."""


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint` (tensors, numbers, strings and containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None


def model_state_from_checkpoint(checkpoint: dict) -> dict:
    """The model weights of a trainer checkpoint (`{"model": ...}`) or of a plain state dict."""
    inner = checkpoint.get("model")
    return inner if isinstance(inner, dict) else checkpoint
