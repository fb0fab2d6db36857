"""The process group torchrun describes, and the few collectives the project uses (no-ops in one process)."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


_HOST_GROUP = None


def host_group():
    """A gloo group over the same processes, for small host-side votes (the stop flag) that must never wait for,
    or queue behind, the device's collectives. Created on first use: every rank must make that first call."""
    global _HOST_GROUP
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def close_distributed(stopped: bool = False) -> None:
    """Leave the process group. `stopped` (a stop every rank agreed on, last.pt saved): the ranks first wait for
    each other, so that none exits while rank 0 still writes, and a SIGTERM is ignored from then on: torchrun
    sends one to the ranks still running when the first exits, and it would turn their exit code 143 into a
    death by signal, although they are about to exit by themselves."""
    global _HOST_GROUP
    if stopped and dist.is_initialized() and dist.get_world_size() > 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            dist.barrier(group=host_group())
        except RuntimeError:  # a rank that died instead: nothing to wait for
            pass
    _HOST_GROUP = None
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
