"""The cost of a config's training step (time, images/s, peak memory) on random batches, and step-cost ratios."""
from __future__ import annotations

import copy
import dataclasses
import resource
import time
from pathlib import Path

import torch

from rtda.bench.common import BenchmarkError, model_label, without_pretrained
from rtda.config import Config, load_config
from rtda.utils.env import environment


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the caching allocator's peak since the last reset; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def random_batch(size_hw: tuple[int, int], batch: int, num_classes: int, device: torch.device,
                 labelled: bool, generator: torch.Generator) -> dict:
    """A batch in the loaders' format (raw uint8 images, int64 train ids) of random content."""
    image = torch.randint(0, 256, (batch, 3, *size_hw), dtype=torch.uint8, generator=generator)
    out = {"image": image.to(device), "name": [f"random_{i}" for i in range(batch)]}
    if labelled:
        out["label"] = torch.randint(0, num_classes, (batch, *size_hw), generator=generator).to(device)
    return out


def _at_size(cfg: Config, size: tuple[int, int] | None) -> Config:
    """`cfg` with both the source and target sizes set to `size` (H, W), the recipe's crop capped to it."""
    if size is None:
        return cfg
    cfg = copy.deepcopy(cfg)  # strategies read the sizes too (DACS checks that source and target agree)
    cfg.data.source.size = cfg.data.target.size = [size[1], size[0]]
    if cfg.adapt.crop is not None:  # a recipe's crop cannot be larger than the images
        cfg.adapt.crop = [min(cfg.adapt.crop[0], size[1]), min(cfg.adapt.crop[1], size[0])]
    return cfg


def _build_parts(cfg: Config, device: torch.device, total: int, source: str):
    """The trainer's own set-up (`rtda.engine.build_parts`: optimiser, poly schedule, AMP scaler, gradient
    accumulation) for one process on `device`, without loading pretrained weights."""
    from rtda.engine import build_parts
    from rtda.utils.distributed import Distributed

    try:
        return build_parts(dataclasses.replace(cfg, model=without_pretrained(cfg.model)), Distributed(device=device),
                           total)
    except ValueError as exc:  # a strategy refusing the config, one line
        raise BenchmarkError(f"{source}: {exc}") from None


def _time_steps(parts, src: dict, tgt: dict | None, warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per training step (the trainer's own `train_step`) over `iters` steps after `warmup` untimed ones."""
    from rtda.engine import train_step

    def steps(first: int, count: int) -> None:
        for it in range(first, first + count):  # no host sync: losses stay on the device
            parts.ctx.iteration = it
            train_step(parts.train_model, parts.strategy, parts.optimizer, parts.scheduler, src, tgt, parts.ctx)

    steps(0, warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    steps(warmup, iters)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def benchmark_train_step(cfg: Config, device: torch.device, iters: int, warmup: int,
                         size: tuple[int, int] | None = None, batch_size: int | None = None,
                         source: str = "config") -> dict:
    """Time full training steps of `cfg` (its strategy included) on random batches of the protocol size.

    Built by the trainer's own set-up function, so what is timed is what training runs. `size` (H, W) replaces
    both the source and target sizes. Returns one JSON-able dict (step time, images/s, peak memory, ...).
    """
    from rtda.utils.seed import seed_everything

    cfg = _at_size(cfg, size)
    env = environment(device)  # the load before this process adds its own
    seed_everything(cfg.seed, cfg.train.deterministic)  # as train.py does (it also sets cuDNN autotuning)
    batch = batch_size or cfg.train.batch_size
    src_hw = (cfg.data.source.size[1], cfg.data.source.size[0])  # config sizes are [W, H]
    tgt_hw = (cfg.data.target.size[1], cfg.data.target.size[0])
    parts = _build_parts(cfg, device, warmup + iters, source)
    gen = torch.Generator().manual_seed(cfg.seed)
    src = random_batch(src_hw, batch, cfg.model.num_classes, device, True, gen)
    tgt = (random_batch(tgt_hw, batch, cfg.model.num_classes, device, cfg.data.target.pseudo_labels is not None, gen)
           if parts.strategy.needs_target else None)  # pseudo-labelled target (FDA's SSL round): labels too
    step_s = _time_steps(parts, src, tgt, warmup, iters, device)
    amp_dtype = parts.ctx.amp_dtype
    return {"config": source, "config_name": cfg.name, "model_label": model_label(cfg.model),
            "model": dataclasses.asdict(cfg.model), "adapt": cfg.adapt.name, "batch_size": batch,
            "source_size": list(src_hw), "target_size": list(tgt_hw) if tgt is not None else None,
            "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "none", **env,
            "iters": iters, "warmup": warmup, "step_s": step_s, "images_per_s": batch / step_s,
            "peak_memory_bytes": peak_memory_bytes(device),
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"}


def step_cost(configs: list[str], overrides: list[str], rounds: int, steps: int) -> str:
    """Training-step time of each config as a ratio to the first (source-only), timed in interleaved rounds on
    random batches with `benchmark_train_step`, so that a changing machine load hits every config alike."""
    import statistics

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times = {c: [] for c in configs}
    for _ in range(rounds):
        for config in configs:
            cfg = load_config(config, overrides)
            times[config].append(benchmark_train_step(cfg, device, steps, 1, source=config)["step_s"])
    base = statistics.median(times[configs[0]])
    lines = ["| Config | step (s, median) | ratio to " + Path(configs[0]).stem + " |", "|---|---|---|"]
    for config in configs:
        step = statistics.median(times[config])
        lines.append(f"| {Path(config).stem} | {step:.3f} | {step / base:.2f} |")
    return "\n".join(lines)


def print_train_report(r: dict) -> None:
    h, w = r["source_size"]
    print(f"{r['config']}: {r['model_label']} + {r['adapt']}, "
          f"batch {r['batch_size']} at {h}x{w}, amp {r['amp']}")
    print(f"  torch {r['torch']} on {r['device']} ({r['device_name']}), {r['threads']} threads, "
          f"load average {r['load_avg_1m']}")
    print(f"  step {r['step_s']:.3f} s  ({r['images_per_s']:.2f} images/s over {r['iters']} steps after "
          f"{r['warmup']} warm-up)")
    print(f"  peak memory ({r['peak_memory_kind']}): {r['peak_memory_bytes'] / 2**30:.2f} GiB")

