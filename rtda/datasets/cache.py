"""Prepared copies of the data sets at their configured size, read by the loaders instead of the PNGs.

    python -m rtda.datasets prepare --config configs/gta5_bisenet.yaml [--workers N] [key=value ...]

Format (the measurements behind it: docs/benchmarks.md, "Data loading"): one uint8 array per entry in a
memory-mapped `.npy` file, items `[N, H, W, 3]` for images and `[N, H, W]` for train-id labels. Reading an item
is a copy out of the page cache, with no decoding; the price is disk (H * W * 3 bytes per image, H * W per label).

An entry is one array: a role's images at its size, or its labels (train ids at its size, or at their stored
size for `eval.label_size: full`). Its folder `<data.cache>/<kind>-<key>/` is named by a hash of the file
paths, the item shape, the label form and the resize code, so a changed config reads another entry, never a
stale one; and the entry is used only while every file's size and modification time equal those it was
prepared from. The folder holds

    data.npy        the items (allocated up front, filled in any order)
    progress.npy    int64 [N, 3] per item: state (-1 to do; else done, for labels its off-palette pixel count),
                    and the file's size and mtime when it was written; a rerun redoes only what is missing or changed
    manifest.json   written last, atomically: an entry without a matching manifest is incomplete and never read
    .lock           held while a `prepare` writes the entry

Nothing is written outside `<data.cache>`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

from rtda.datasets.io import DatasetError
from rtda.utils.files import atomic_write

FORMAT_VERSION = 1
SAVE_EVERY_S = 2.0  # how often a running prepare makes its progress durable
_reported: set[str] = set()  # entries already reported unused in this process


class PrepareInterrupted(Exception):
    """Ctrl-C during `prepare`: what was written is kept, a rerun continues."""


def _fingerprints(files: list[Path]) -> np.ndarray:
    """int64 [N, 2]: each file's size and modification time (ns); a missing file is an error naming it."""
    out = np.empty((len(files), 2), dtype=np.int64)
    for i, path in enumerate(files):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read ({exc.strerror}): expected a data file here") from None
        out[i] = st.st_size, st.st_mtime_ns
    return out


class CacheEntry:
    """One prepared array: `kind` images or labels of `files`, each item of `item_shape` uint8."""

    def __init__(self, cache_dir, kind: str, files: list[Path], item_shape: tuple[int, ...], params: dict):
        self.cache_dir = Path(cache_dir)
        self.kind, self.files, self.item_shape, self.params = kind, list(files), tuple(item_shape), params
        digest = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "kind": kind, "item_shape": self.item_shape,
                                            "params": params}, sort_keys=True).encode())
        for path in self.files:
            digest.update(os.path.abspath(path).encode() + b"\0")
        self.key = digest.hexdigest()
        self.folder = self.cache_dir / f"{kind}-{self.key[:16]}"
        self.fingerprints = _fingerprints(self.files)
        self.files_key = hashlib.sha256(self.fingerprints.tobytes()).hexdigest()
        self.manifest: dict = {}
        self._array = None

    # ------------------------------------------------------------------------------------------- state
    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.files), *self.item_shape)

    @property
    def item_nbytes(self) -> int:
        return int(np.prod(self.item_shape))

    @property
    def nbytes(self) -> int:
        return len(self.files) * self.item_nbytes

    data_path = property(lambda self: self.folder / "data.npy")
    progress_path = property(lambda self: self.folder / "progress.npy")
    manifest_path = property(lambda self: self.folder / "manifest.json")

    def ready(self) -> bool:
        """Complete, and prepared from exactly the files as they are now."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
            data_size = self.data_path.stat().st_size
        except (OSError, ValueError):
            return False
        ok = (manifest.get("key") == self.key and manifest.get("files_key") == self.files_key
              and manifest.get("shape") == list(self.shape)
              and data_size == manifest.get("data_offset", -1) + self.nbytes)
        self.manifest = manifest if ok else {}
        return ok

    def _progress(self) -> np.ndarray | None:
        try:
            progress = np.load(self.progress_path)
        except (OSError, ValueError):
            return None
        return progress if progress.shape == (len(self.files), 3) else None

    def status(self) -> str:
        if self.ready():
            return "ready"
        progress = self._progress()
        if progress is None or not self.data_path.is_file():
            return "not prepared"
        valid = (progress[:, 0] >= 0) & np.all(progress[:, 1:] == self.fingerprints, axis=1)
        changed = int(np.count_nonzero((progress[:, 0] >= 0) & ~valid))
        return (f"incomplete ({int(valid.sum())} of {len(self.files)} items"
                + (f"; {changed} file{'s' if changed > 1 else ''} changed since" if changed else "") + ")")

    def report_unused(self) -> None:
        """Say once per process why the loader reads the files: only when the cache folder exists at all."""
        if not self.cache_dir.is_dir() or str(self.folder) in _reported:
            return
        _reported.add(str(self.folder))
        warnings.warn(f"{self.cache_dir}: the {self.kind} cache for these files and settings is {self.status()} "
                      f"({self.folder.name}); reading the original files (`python -m rtda.datasets prepare --config FILE` "
                      "writes or finishes it)", stacklevel=4)

    # ----------------------------------------------------------------------------------------- reading
    def read(self, index: int) -> np.ndarray:
        """A writable copy of item `index` (the memory map opens on first use, in each worker process)."""
        if self._array is None:
            array = np.load(self.data_path, mmap_mode="r")
            if array.shape != self.shape or array.dtype != np.uint8:
                raise DatasetError(f"{self.data_path}: holds {array.dtype} {array.shape}, expected uint8 {self.shape}; "
                                   "delete the folder and rerun `python -m rtda.datasets prepare`")
            self._array = array
        return np.array(self._array[index])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None  # a memory map would pickle as a full copy of the array
        return state

    # ----------------------------------------------------------------------------------------- writing
    def open_for_writing(self) -> tuple[int, np.ndarray]:
        """Allocate (or reopen) the data file; return its data offset and the items still to write."""
        self.folder.mkdir(parents=True, exist_ok=True)
        progress = self._progress() if self.data_path.is_file() else None
        offset = None
        if progress is not None:
            try:
                existing = np.load(self.data_path, mmap_mode="r")
                if existing.shape == self.shape and existing.dtype == np.uint8:
                    offset = existing.offset
                del existing
            except (OSError, ValueError):
                pass
        if offset is None:  # fresh (or unusable): a sparse file of the full size
            array = np.lib.format.open_memmap(self.data_path, mode="w+", dtype=np.uint8, shape=self.shape)
            offset = array.offset
            del array
            progress = np.full((len(self.files), 3), -1, dtype=np.int64)
        stale = np.any(progress[:, 1:] != self.fingerprints, axis=1)
        progress[stale, 0] = -1  # changed since they were written: redo them
        self.progress = progress
        self.data_offset = int(offset)
        return self.data_offset, np.flatnonzero(progress[:, 0] < 0)

    def mark_done(self, index: int, value: int) -> None:
        self.progress[index, 0] = value
        self.progress[index, 1:] = self.fingerprints[index]

    def save_progress(self, data_fd: int) -> None:
        os.fsync(data_fd)  # the items first, so the progress never claims an item the disk lacks
        atomic_write(self.progress_path, lambda f: np.save(f, self.progress))

    def finish(self, data_fd: int) -> None:
        self.save_progress(data_fd)
        off = self.progress[:, 0]
        manifest = {"version": FORMAT_VERSION, "key": self.key, "files_key": self.files_key, "kind": self.kind,
                    "shape": list(self.shape), "data_offset": self.data_offset, "params": self.params,
                    "first_file": str(self.files[0]), "off_palette_pixels": int(off.sum()),
                    "off_palette_files": int(np.count_nonzero(off)), "prepared": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write(self.manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode() + b"\n"))
        self.manifest = manifest


def _resize_params() -> dict:
    # the resize kernels decide the bytes: another torchvision may round differently, so it keys the entry
    return {"torch": torch.__version__.split("+")[0], "torchvision": torchvision.__version__.split("+")[0]}


def image_entry(cache_dir, images: list[Path], size_hw: tuple[int, int], interpolation: str = "bilinear") -> CacheEntry:
    return CacheEntry(cache_dir, "images", images, (*size_hw, 3),
                      {"resize": f"{interpolation}, antialias", **_resize_params()})


def label_entry(cache_dir, labels: list[Path], shape_hw: tuple[int, int], label_form: str, full: bool) -> CacheEntry:
    return CacheEntry(cache_dir, "labels", labels, tuple(shape_hw),
                      # the manifest key stays "encoding": prepared caches on disk must still match
                      {"encoding": label_form, "resize": "none (stored size)" if full else "nearest", **_resize_params()})


# --------------------------------------------------------------------------------------------- prepare
_WORKER: dict = {}


def _init_worker(dataset, targets, in_process: bool = False) -> None:
    """targets: [(kind, data path, data offset, item bytes)] of the entries being written."""
    if not in_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
        torch.set_num_threads(1)
    _WORKER.update(dataset=dataset, targets=targets,
                   fds=[os.open(path, os.O_WRONLY) for _, path, _, _ in targets])


def _close_worker() -> None:
    for fd in _WORKER.pop("fds", []):
        os.close(fd)


def _work(task: tuple[int, tuple[int, ...]]) -> tuple[int, int]:
    """Decode and resize item `index` exactly as the uncached loader does, write the parts in `need`."""
    index, need = task
    ds, targets, fds = _WORKER["dataset"], _WORKER["targets"], _WORKER["fds"]
    kinds = {targets[k][0] for k in need}
    image, label, off = ds.load_uncached(index, image="images" in kinds, label="labels" in kinds)
    for k in need:
        kind, path, offset, nbytes = targets[k]
        part = image.permute(1, 2, 0) if kind == "images" else label
        data = np.ascontiguousarray(part.numpy())
        if data.nbytes != nbytes:
            raise DatasetError(f"{ds.images[index] if kind == 'images' else ds.labels[index]}: gives a {kind[:-1]} of "
                               f"shape {tuple(data.shape)}, expected {nbytes} bytes like the other items of {path.parent}")
        os.pwrite(fds[k], memoryview(data).cast("B"), offset + index * nbytes)
    return index, off


@contextlib.contextmanager
def _locked(entries: list[CacheEntry]):
    with contextlib.ExitStack() as stack:
        for entry in entries:
            entry.folder.mkdir(parents=True, exist_ok=True)
            lock = stack.enter_context(open(entry.folder / ".lock", "w"))
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DatasetError(f"{entry.folder}: another `python -m rtda.datasets prepare` is writing this entry; "
                                   "wait for it to finish (or stop it) and run again") from None
        yield


def _record_results(entries: list[CacheEntry], fds: list[int], need_of: dict, results, bar) -> None:
    """Mark each finished item done in the entries it was written to, saving the progress every SAVE_EVERY_S
    seconds and finishing (manifest last) every entry at the end."""
    last_save = time.monotonic()
    for index, off in results:
        for k in need_of[index]:
            entries[k].mark_done(index, off if entries[k].kind == "labels" else 0)
        bar.update()
        if time.monotonic() - last_save > SAVE_EVERY_S:
            for entry, fd in zip(entries, fds):
                entry.save_progress(fd)
            last_save = time.monotonic()
    for entry, fd in zip(entries, fds):
        entry.finish(fd)


def prepare_dataset(dataset, role: str, workers: int, progress: bool = True) -> list[CacheEntry]:
    """Write whatever is missing of `dataset`'s cache entries; returns the entries (all ready on return).

    Ctrl-C raises PrepareInterrupted after saving what was written; a rerun continues from there."""
    entries = [e for e in dataset.cache_entries() if not e.ready()]
    if not entries:
        return dataset.cache_entries()
    cache_dir = entries[0].cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    needed = sum(e.nbytes for e in entries if not e.data_path.is_file())
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        raise DatasetError(f"{cache_dir}: the {role} cache needs {needed / 1e9:.1f} GB, {free / 1e9:.1f} GB are free; "
                           "free some space or point data.cache elsewhere")
    with _locked(entries):
        starts = [e.open_for_writing() for e in entries]
        targets = [(e.kind, e.data_path, offset, e.item_nbytes) for e, (offset, _) in zip(entries, starts)]
        todo = sorted(set().union(*(set(pending.tolist()) for _, pending in starts)))
        tasks = [(i, tuple(k for k, e in enumerate(entries) if e.progress[i, 0] < 0)) for i in todo]
        fds = [os.open(e.data_path, os.O_WRONLY) for e in entries]
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), unit="item", desc=f"prepare {role}", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True, smoothing=0.1)
        pool = None
        try:
            if workers > 1 and len(tasks) > 1:
                pool = multiprocessing.get_context().Pool(min(workers, len(tasks)), _init_worker, (dataset, targets))
                results = pool.imap_unordered(_work, tasks, chunksize=1)
            else:
                _init_worker(dataset, targets, in_process=True)
                results = map(_work, tasks)
            _record_results(entries, fds, dict(tasks), results, bar)
        except BaseException as exc:  # keep what was written, whatever stopped the work
            if pool is not None:
                pool.terminate()
                pool = None
            for entry, fd in zip(entries, fds):
                entry.save_progress(fd)
            if not isinstance(exc, KeyboardInterrupt):
                raise
            done = int(np.count_nonzero(np.all([e.progress[:, 0] >= 0 for e in entries], axis=0)))
            total = len(entries[0].files)
            raise PrepareInterrupted(f"interrupted: {done} of {total} {role} items are in {cache_dir} and kept; "
                                     "run the same command again to continue") from None
        finally:
            bar.close()
            if pool is not None:
                pool.close()
                pool.join()
            _close_worker()
            for fd in fds:
                os.close(fd)
    return dataset.cache_entries()


def unused_entries(cache_dir, used: set[Path]) -> list[Path]:
    """Entry folders in `cache_dir` that none of `used` names (left by other configs or sizes; never deleted)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    return sorted(p for p in cache_dir.iterdir() if p.is_dir() and p.name.split("-")[0] in ("images", "labels")
                  and p not in used)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
