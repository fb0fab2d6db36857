"""Data-loading throughput: items/s of a config's source and target loaders, from the PNGs and from the cache.

Contract: the loaders are built as the trainer builds them (source augmentations included) and read the same
first files from the PNGs and from a cache prepared for them in a temporary folder (deleted at the end), in
alternating rounds of one run. Per core: one process reading items one after another with one torch thread;
per worker: a DataLoader with W persistent workers and the config's batch size (batches collated in the
workers, as in training), its items/s / W.
"""
from __future__ import annotations

import dataclasses
import io
import os
import tempfile
import time
import warnings

import numpy as np
import torch

from rtda.bench.common import BenchmarkError
from rtda.config import Config

DATA_ITEMS = 32
DATA_ROUNDS = 2  # uncached and cached alternate this many times


def _items_per_s_in_process(dataset) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for index in range(len(dataset)):
            dataset[index]
        return len(dataset) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def _items_per_s_per_worker(dataset, workers: int, batch_size: int) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=True)
    for _ in loader:  # start the workers and warm the page cache
        pass
    start = time.perf_counter()
    for _ in loader:
        pass
    rate = len(dataset) / (time.perf_counter() - start)
    del loader
    return rate / workers


def _cache_format_choice(cached, count: int) -> dict:
    """ms per item to get the resized image (and label) out of either candidate cache format, on the same items:
    the memory-mapped uint8 arrays (what datasets/cache.py writes) and pre-resized PNGs decoded with pyspng
    (PIL without it). The PNGs are decoded from memory, which favours them; the arrays still win by far."""
    from PIL import Image

    from rtda.datasets.io import spng  # None without pyspng

    entries = [e for e in (cached._image_entry, cached._label_entry) if e is not None]
    encoded = []
    for index in range(count):
        for entry in entries:
            buffer = io.BytesIO()
            Image.fromarray(entry.read(index)).save(buffer, format="png", compress_level=1)
            encoded.append(buffer.getvalue())
    start = time.perf_counter()
    for index in range(count):
        for entry in entries:
            entry.read(index)
    array_ms = 1000 * (time.perf_counter() - start) / count
    start = time.perf_counter()
    for data in encoded:
        spng.load(data) if spng is not None else np.asarray(Image.open(io.BytesIO(data)))
    png_ms = 1000 * (time.perf_counter() - start) / count
    return {"array_ms": array_ms, "png_ms": png_ms, "png_decoder": "pyspng" if spng is not None else "PIL",
            "array_mb": sum(e.item_nbytes for e in entries) / 1e6, "png_mb": sum(map(len, encoded)) / count / 1e6}


def benchmark_data(cfg: Config, items: int = DATA_ITEMS, workers: int | None = None,
                   roles: tuple[str, ...] = ("source", "target")) -> dict:
    """Loader throughput of `roles` from the files and from the prepared cache, on the same first `items` files."""
    from rtda.datasets import build_dataset
    from rtda.datasets.cache import prepare_dataset
    from rtda.datasets.io import has_pyspng

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = workers or max(1, min(cfg.train.workers, cores))
    uncached_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache=None))
    batch_size = max(1, min(cfg.train.batch_size, items))
    result = {"config": cfg.name, "items": items, "workers": workers, "batch_size": batch_size, "cores": cores,
              "pyspng": has_pyspng(),
              "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2), "roles": {}}
    for role in roles:
        full = build_dataset(getattr(cfg.data, role), uncached_cfg, role)
        plain = full.subset(min(items, len(full)))
        with tempfile.TemporaryDirectory(prefix="benchmark-data-") as folder:
            cached = full.subset(len(plain))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "not prepared yet": about to be
                cached.attach_cache(folder)
            start = time.perf_counter()
            prepare_dataset(cached, role, workers, progress=False)
            prepare_s = time.perf_counter() - start
            cached.attach_cache(folder)
            formats = _cache_format_choice(cached, min(8, len(cached)))
            if not all(cached.cached.values() if plain.labels is not None else [cached.cached["images"]]):
                raise BenchmarkError(f"{role}: the cache prepared in {folder} is not used ({cached.cached})")
            rates = {"uncached": {"per_core": [], "per_worker": []}, "cached": {"per_core": [], "per_worker": []}}
            for form in (plain, cached):  # untimed pass: both read warm files
                for index in range(len(form)):
                    form[index]
            for _ in range(DATA_ROUNDS):
                for name, form in (("uncached", plain), ("cached", cached)):
                    rates[name]["per_core"].append(_items_per_s_in_process(form))
                    rates[name]["per_worker"].append(_items_per_s_per_worker(form, workers, batch_size))
        summary = {name: {k: float(np.median(v)) for k, v in r.items()} for name, r in rates.items()}
        h, w = plain.size_hw
        result["roles"][role] = {
            "form": plain.describe_form(), "size": f"{w}x{h}", "items": len(plain),
            "augment": plain.augment is not None, **summary,
            "speedup_per_core": summary["cached"]["per_core"] / summary["uncached"]["per_core"],
            "speedup_per_worker": summary["cached"]["per_worker"] / summary["uncached"]["per_worker"],
            "prepare_items_per_s": len(plain) / prepare_s, "cache_format": formats}
    return result


def print_data_report(r: dict) -> None:
    print(f"{r['config']}: data loading, {r['items']} items per role, {r['workers']} DataLoader workers "
          f"(batch {r['batch_size']}), "
          f"{r['cores']} cores, load average {r['load_avg_1m']}, torch {r['torch']}, "
          f"pyspng {'yes' if r['pyspng'] else 'no'}")
    print(f"{'role':8s}{'size':>10s}  {'uncached items/s':>22s}  {'cached items/s':>22s}  {'cached / uncached':>20s}")
    print(f"{'':18s}  {'per core':>10s}{'per worker':>12s}  {'per core':>10s}{'per worker':>12s}  "
          f"{'per core':>9s}{'per worker':>11s}")
    for role, x in r["roles"].items():
        print(f"{role:8s}{x['size']:>10s}  {x['uncached']['per_core']:10.1f}{x['uncached']['per_worker']:12.1f}  "
              f"{x['cached']['per_core']:10.1f}{x['cached']['per_worker']:12.1f}  "
              f"{x['speedup_per_core']:8.1f}x{x['speedup_per_worker']:10.1f}x")
    for role, x in r["roles"].items():
        f = x["cache_format"]
        print(f"  {role}: {x['form']}{', with the source augmentations' if x['augment'] else ''}; "
              f"prepare wrote {x['prepare_items_per_s']:.1f} items/s; cache format, ms per item (one core): "
              f"memory-mapped array {f['array_ms']:.2f} ({f['array_mb']:.2f} MB), pre-resized PNG with "
              f"{f['png_decoder']} {f['png_ms']:.2f} ({f['png_mb']:.2f} MB)")
