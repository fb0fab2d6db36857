"""Data streams: the DataLoaders that training, validation and tools build from a data set, and batch helpers.

Every loader here is seeded explicitly, never from the global RNG, so that building or restarting one does not
shift the random streams a resumed run depends on.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from rtda.config import Config, ConfigError
from rtda.datasets.samplers import EpochSampler, ShardSampler
from rtda.utils.distributed import Distributed
from rtda.utils.seed import epoch_seed, init_worker


def endless_batches(dataset, batch_size: int, seed: int, dist: Distributed, workers: int, start_step: int):
    """Batches forever, epoch after epoch, starting at global step `start_step` of this data set's own epochs.

    The order of epoch e is a function of (seed, e) alone and each epoch re-seeds the data set's per-sample
    augmentation (`set_epoch`), so skipping `start_step` batches reproduces exactly the stream an
    uninterrupted run sees. Workers are restarted each epoch so that they see the new epoch.
    """
    sampler = EpochSampler(len(dataset), seed, dist.rank, dist.world_size)
    steps_per_epoch = len(dataset) // dist.world_size // batch_size
    epoch, step = divmod(start_step, steps_per_epoch)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, skip=step * batch_size)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                            pin_memory=dist.device.type == "cuda", worker_init_fn=init_worker,
                            generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        yield from loader
        epoch, step = epoch + 1, 0


def val_loader(dataset, cfg: Config, dist: Distributed) -> DataLoader:
    """One pass over `dataset` in order, this rank's shard only, `eval.batch_size` images per batch."""
    # A fixed generator: creating the loader's iterator must not draw from the global RNG (resume exactness).
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, sampler=ShardSampler(len(dataset), dist.rank,
                      dist.world_size), num_workers=cfg.train.workers, pin_memory=dist.device.type == "cuda",
                      worker_init_fn=init_worker, generator=torch.Generator().manual_seed(cfg.seed))


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch on the device; labels arrive as uint8 train ids (cheap to collate and copy) and become int64 there."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "label" in out:
        out["label"] = out["label"].long()
    return out


def split_batch(batch: dict, chunks: int) -> list[dict]:
    """A batch as `chunks` equal micro-batches (tensors and lists split along the batch dimension)."""
    size = len(batch["image"]) // chunks
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(chunks)]


def steps_per_epoch(dataset_size: int, per_rank_batch: int, world_size: int, what: str) -> int:
    """Full batches per epoch on each rank; a ConfigError naming `data.<what>` when not even one fits."""
    steps = dataset_size // world_size // per_rank_batch
    if steps == 0:
        raise ConfigError(f"data.{what}: {dataset_size} images cannot fill one batch of {per_rank_batch} per process "
                          f"on {world_size} process(es); lower train.batch_size")
    return steps


def worker_message(exc: BaseException) -> str:
    """The one-line message of a data error, also when a DataLoader worker wrapped it in its traceback."""
    text = str(exc).strip()
    if "Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(("datasets.", "DatasetError")) and ": " in last else last
