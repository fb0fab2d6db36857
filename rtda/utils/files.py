"""Files: one atomic write for every writer (`atomic_write`), checkpoints built on it, reads with one-line errors."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

import torch


def atomic_write(path: str | Path, write, mode: str = "wb", remove_stale: bool = True) -> None:
    """Replace `path` with what `write(handle)` writes, all at once or not at all.

    `write` fills a temporary file in the same folder (opened with `mode`), which is flushed, fsynced and renamed
    over `path`; the folder is created if missing. Any failure (an exception from `write`, a full disk, a crash)
    leaves the previous file at `path` untouched and no temporary file behind. `remove_stale`: first delete the
    temporaries a killed writer of `path` left; pass False where several processes may write `path` at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if remove_stale:
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    with contextlib.suppress(OSError):  # persist the rename itself (not possible on every file system)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write` of a text file (UTF-8): readers see the old file or the whole new one, never a part."""
    atomic_write(path, lambda handle: handle.write(text.encode()))


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` with `atomic_write`: a crash or a full disk at any point leaves the previous file at `path`
    untouched. A failed write raises CheckpointError naming the free space and whether an earlier file is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda handle: torch.save(state, handle))
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as a RuntimeError
        free = shutil.disk_usage(path.parent).free
        kept = f"the previous {path.name} is untouched" if path.exists() else "no earlier one was written"
        raise CheckpointError(f"{path}: could not write the checkpoint ({exc}); {free / 2**20:.0f} MiB free in "
                              f"{path.parent}; {kept}") from exc


def output_folder_problem(folder: Path) -> str | None:
    """Why `folder` cannot receive outputs (a file where it or a parent should be, no write permission), or None."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # os.stat fails on it: a loop, or a link to nothing
            return f"{existing} is a symbolic link that cannot be followed (a loop or a missing target)"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, expected a folder (nothing was written)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def os_error_line(exc: OSError) -> str:
    """An OSError as the one line a command prints: the path(s), the system's words, and for a full disk the free
    space (a command's entry point catches what its own checks could not foresee: a disk that fills, a folder made
    read-only or replaced by a file, a symlink loop)."""
    paths = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    words = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        with contextlib.suppress(OSError):
            folder = Path(exc.filename).parent if exc.filename else Path.cwd()
            while not folder.is_dir() and folder != folder.parent:  # a new run folder is already removed
                folder = folder.parent
            words += f" ({shutil.disk_usage(folder).free / 2**20:.0f} MiB free in {folder})"
    return f"{paths}: {words}" if paths else words


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
