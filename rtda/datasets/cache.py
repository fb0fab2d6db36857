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
    progress.npy    int64 [N, 4] per item: state (-1 to do; else done, for labels its off-palette pixel count),
                    the file's size and mtime when it was written, and the crc32 of the item's bytes; a rerun
                    redoes only what is missing or changed
    manifest.json   written last, atomically: an entry without a matching manifest is incomplete and never read
    .lock           held while a `prepare` writes the entry

Checksums (format 2): the manifest carries a crc32 of itself, of data.npy's header and of progress.npy's item
table, verified when a loader opens the entry (a few hundred bytes plus 32 bytes an item); every item read is
checked against its crc32 (about 2 ms per 1280x720 image, 0.6 ms per label: docs/data.md); `python -m
rtda.datasets --check` verifies every item of every entry. A damaged entry is never read: the loader warns in
one line naming it and reads the PNG files instead (a damaged item: that item), and `prepare` rewrites it.
Entries of format 1 (no checksums) are not read: the loader reads the files and says to rerun `prepare`.

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
import zlib
from pathlib import Path

import numpy as np
import torch
import torchvision

from rtda.datasets.io import DatasetError
from rtda.utils.files import atomic_write

FORMAT_VERSION = 2  # 2: checksums (1: none; such entries are named and rebuilt, never read)
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
        self.key = self._key(FORMAT_VERSION)
        self.folder = self.cache_dir / f"{kind}-{self.key[:16]}"
        self.damage: str | None = None  # why a complete entry cannot be trusted (a checksum fails)
        self.crcs: np.ndarray | None = None  # int64 [N]: each item's crc32, once the entry is verified
        self._bad_items: set[int] = set()  # items found damaged (and reported) in this process
        self.fingerprints = _fingerprints(self.files)
        self.files_key = hashlib.sha256(self.fingerprints.tobytes()).hexdigest()
        self.manifest: dict = {}
        self._array = None

    def _key(self, version: int) -> str:
        digest = hashlib.sha256(json.dumps({"version": version, "kind": self.kind, "item_shape": self.item_shape,
                                            "params": self.params}, sort_keys=True).encode())
        for path in self.files:
            digest.update(os.path.abspath(path).encode() + b"\0")
        return digest.hexdigest()

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
        """Complete, prepared from exactly the files as they are now, and its checksums hold (the cheap ones:
        manifest, data.npy header and size, item table; `damage` says which failed)."""
        self.damage, self.manifest, self.crcs = None, {}, None
        try:
            text = self.manifest_path.read_text()
        except OSError:
            return False
        try:
            manifest = json.loads(text)
            data_size = self.data_path.stat().st_size
        except (OSError, ValueError, UnicodeDecodeError):
            manifest, data_size = None, -1
        if not isinstance(manifest, dict) or manifest.get("manifest_crc32") != _manifest_crc(manifest):
            self.damage = f"{self.manifest_path.name} fails its checksum"
            return False
        if not (manifest.get("key") == self.key and manifest.get("files_key") == self.files_key
                and manifest.get("shape") == list(self.shape)):
            return False  # another entry's manifest, or files changed since: not damage
        self.damage = self._verify_open(manifest, data_size)
        if self.damage is None:
            self.manifest = manifest
        return self.damage is None

    def _verify_open(self, manifest: dict, data_size: int) -> str | None:
        """The cheap checks at open: data.npy's size and header, progress.npy's item table; None if all hold."""
        offset = manifest.get("data_offset")
        if not isinstance(offset, int) or offset <= 0:
            return f"{self.manifest_path.name} has no data offset"
        if data_size != offset + self.nbytes:
            return f"{self.data_path.name} is {data_size} bytes, expected {offset + self.nbytes}"
        try:
            with open(self.data_path, "rb") as f:
                header = f.read(offset)
        except OSError as exc:
            return f"{self.data_path.name} cannot be read ({exc.strerror})"
        if zlib.crc32(header) != manifest.get("header_crc32"):
            return f"the header of {self.data_path.name} fails its checksum"
        progress = self._progress()
        if progress is None or zlib.crc32(progress.tobytes()) != manifest.get("items_crc32"):
            return f"{self.progress_path.name} fails its checksum"
        self.crcs = progress[:, 3].copy()
        return None

    def _progress(self) -> np.ndarray | None:
        try:
            progress = np.load(self.progress_path)
        except (OSError, ValueError):
            return None
        ok = progress.shape == (len(self.files), 4) and progress.dtype == np.int64
        return progress if ok else None

    def status(self) -> str:
        if self.ready():
            return "ready"
        if self.damage:
            return f"damaged ({self.damage}; `prepare` rewrites it)"
        progress = self._progress()
        if progress is None or not self.data_path.is_file():
            legacy = self.cache_dir / f"{self.kind}-{self._key(1)[:16]}"
            if (legacy / "manifest.json").is_file():
                return (f"not prepared: {legacy.name} was written by an earlier version without checksums and is not "
                        "read; `prepare` writes a checked entry (then delete the old folder)")
            return "not prepared"
        valid = (progress[:, 0] >= 0) & np.all(progress[:, 1:3] == self.fingerprints, axis=1)
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
    def read(self, index: int) -> np.ndarray | None:
        """A writable copy of item `index` (the memory map opens on first use, in each worker process), or None
        when its bytes fail their checksum: then the caller reads the file, and the first such item of this entry
        in this process is reported in one warning naming the entry and the file."""
        if self._array is None:
            try:
                array = np.load(self.data_path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{self.data_path}: cannot be read as a cache array ({exc}); delete "
                                   f"{self.folder} and rerun `python -m rtda.datasets prepare`") from None
            if array.shape != self.shape or array.dtype != np.uint8:
                raise DatasetError(f"{self.data_path}: holds {array.dtype} {array.shape}, expected uint8 {self.shape}; "
                                   "delete the folder and rerun `python -m rtda.datasets prepare`")
            self._array = array
        item = np.array(self._array[index])
        if self.crcs is not None and zlib.crc32(item) != self.crcs[index]:
            if not self._bad_items:
                warnings.warn(f"{self.folder}: item {index} ({self.files[index]}) fails its checksum: reading the file "
                              "instead (`python -m rtda.datasets --config FILE --check` lists every damaged item; "
                              "delete the folder and rerun `prepare` to rewrite it)", stacklevel=3)
            self._bad_items.add(index)
            return None
        return item

    def bad_items(self) -> list[int]:
        """Every item whose bytes fail their checksum (reads the whole entry: `--check`)."""
        return [index for index in range(len(self.files)) if self._read_quietly(index) is None]

    def _read_quietly(self, index: int) -> np.ndarray | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.read(index)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None  # a memory map would pickle as a full copy of the array
        state["_bad_items"] = set()  # each process reports its own first damaged item
        return state

    # ----------------------------------------------------------------------------------------- writing
    def open_for_writing(self) -> tuple[int, np.ndarray]:
        """Allocate (or reopen) the data file; return its data offset and the items still to write."""
        self.folder.mkdir(parents=True, exist_ok=True)
        progress = self._progress() if self.data_path.is_file() else None
        offset = None
        if progress is not None and not self.damage:  # a damaged entry is rewritten from scratch
            try:
                existing = np.load(self.data_path, mmap_mode="r")
                if existing.shape == self.shape and existing.dtype == np.uint8:
                    offset = existing.offset
                del existing
            except (OSError, ValueError):
                pass
        if offset is None:  # fresh (or unusable): a sparse file of the full size
            self.manifest_path.unlink(missing_ok=True)  # never a manifest over items being rewritten
            array = np.lib.format.open_memmap(self.data_path, mode="w+", dtype=np.uint8, shape=self.shape)
            offset = array.offset
            del array
            progress = np.full((len(self.files), 4), -1, dtype=np.int64)
        stale = np.any(progress[:, 1:3] != self.fingerprints, axis=1)
        progress[stale, 0] = -1  # changed since they were written: redo them
        self.progress = progress
        self.data_offset = int(offset)
        return self.data_offset, np.flatnonzero(progress[:, 0] < 0)

    def mark_done(self, index: int, value: int, crc: int) -> None:
        self.progress[index, 0] = value
        self.progress[index, 1:3] = self.fingerprints[index]
        self.progress[index, 3] = crc

    def save_progress(self, data_fd: int) -> None:
        os.fsync(data_fd)  # the items first, so the progress never claims an item the disk lacks
        atomic_write(self.progress_path, lambda f: np.save(f, self.progress))

    def finish(self, data_fd: int) -> None:
        self.save_progress(data_fd)
        off = self.progress[:, 0]
        with open(self.data_path, "rb") as f:
            header = f.read(self.data_offset)
        manifest = {"version": FORMAT_VERSION, "key": self.key, "files_key": self.files_key, "kind": self.kind,
                    "shape": list(self.shape), "data_offset": self.data_offset, "params": self.params,
                    "first_file": str(self.files[0]), "off_palette_pixels": int(off.sum()),
                    "off_palette_files": int(np.count_nonzero(off)), "prepared": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "header_crc32": zlib.crc32(header), "items_crc32": zlib.crc32(self.progress.tobytes())}
        manifest["manifest_crc32"] = _manifest_crc(manifest)
        atomic_write(self.manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode() + b"\n"))
        self.manifest = manifest


def _manifest_crc(manifest: dict) -> int:
    """crc32 of the manifest's content without its own checksum (keys sorted: the order on disk is free)."""
    rest = {key: value for key, value in manifest.items() if key != "manifest_crc32"}
    return zlib.crc32(json.dumps(rest, sort_keys=True).encode())


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


def _work(task: tuple[int, tuple[int, ...]]) -> tuple[int, int, dict[int, int]]:
    """Decode and resize item `index` exactly as the uncached loader does, write the parts in `need`;
    (index, off-palette pixels, {target: crc32 of the bytes written})."""
    index, need = task
    ds, targets, fds = _WORKER["dataset"], _WORKER["targets"], _WORKER["fds"]
    kinds = {targets[k][0] for k in need}
    image, label, off = ds.load_uncached(index, image="images" in kinds, label="labels" in kinds)
    crcs = {}
    for k in need:
        kind, path, offset, nbytes = targets[k]
        part = image.permute(1, 2, 0) if kind == "images" else label
        data = np.ascontiguousarray(part.numpy())
        if data.nbytes != nbytes:
            raise DatasetError(f"{ds.images[index] if kind == 'images' else ds.labels[index]}: gives a {kind[:-1]} of "
                               f"shape {tuple(data.shape)}, expected {nbytes} bytes like the other items of {path.parent}")
        os.pwrite(fds[k], memoryview(data).cast("B"), offset + index * nbytes)
        crcs[k] = zlib.crc32(data)
    return index, off, crcs


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
    for index, off, crcs in results:
        for k in need_of[index]:
            entries[k].mark_done(index, off if entries[k].kind == "labels" else 0, crcs[k])
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
