"""Files: one atomic write for every writer (`atomic_write`), checkpoints built on it, reads with one-line errors."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import torch


def atomic_write(path: str | Path, write, mode: str = "wb", remove_stale: bool = True) -> None:
    """Replace `path` with what `write(handle)` writes, all at once or not at all.

    `write` fills a temporary file in the same folder (opened with `mode`), which is flushed, fsynced and renamed
    over `path`; the folder is created if missing. Any failure (an exception from `write`, a full disk, a crash)
    leaves the previous file at `path` untouched and no temporary file behind. `remove_stale`: first delete the
    temporaries a killed writer of `path` left; pass False where several processes may write `path` at once.
    The file gets the permissions of any file the process creates (0o666 less the umask), not mkstemp's 0o600.
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
            with contextlib.suppress(OSError):  # team-mates on a shared file system read it (where chmod works)
                os.fchmod(handle.fileno(), 0o666 & ~current_umask())
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


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (`os.umask` sets it to read it, which
    for a moment would let another thread create files with no mask at all)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write` of a text file (UTF-8): readers see the old file or the whole new one, never a part."""
    atomic_write(path, lambda handle: handle.write(text.encode()))


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` with `atomic_write`: a crash or a full disk at any point leaves the previous file at `path`
    untouched. A failed write raises CheckpointError naming the free space and whether an earlier file is kept.
    A KeyboardInterrupt during the write (a second Ctrl-C) stays a KeyboardInterrupt, the previous file kept: torch's
    zip writer turns an exception raised inside its write callback into a RuntimeError, which is not a disk fault.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _interrupts_recorded() as interrupted:
            atomic_write(path, lambda handle: torch.save(state, handle))
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as a RuntimeError
        if interrupted:
            raise KeyboardInterrupt from None
        free = shutil.disk_usage(path.parent).free
        kept = f"the previous {path.name} is untouched" if path.exists() else "no earlier one was written"
        raise CheckpointError(f"{path}: could not write the checkpoint ({exc}); {free / 2**20:.0f} MiB free in "
                              f"{path.parent}; {kept}") from exc


@contextlib.contextmanager
def _interrupts_recorded():
    """Within the block, a KeyboardInterrupt raised by the SIGINT handler is also appended to the yielded list.

    The handler in place (Python's default, or a trainer's StopRequest whose second Ctrl-C interrupts) still
    decides; a handler that is not a Python function, or a thread other than the main one, records nothing."""
    seen: list[KeyboardInterrupt] = []
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield seen
        return

    def record(signum, frame):
        try:
            previous(signum, frame)
        except KeyboardInterrupt as exc:
            seen.append(exc)
            raise

    signal.signal(signal.SIGINT, record)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


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


# ------------------------------------------------------------------------------------------ outputs
OUTPUTS_MANIFEST = ".rtda-outputs.jsonl"  # beside a command's outputs: {"file": name, "sha256": ...} per line


class OverwriteError(FileExistsError):
    """An output would replace a file the project did not write; the message is one line naming it and --overwrite."""


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(root: Path) -> dict[str, str]:
    """file name (relative to `root`, '/'-separated) -> sha256 of what a command last wrote there."""
    written = {}
    with contextlib.suppress(OSError):
        for line in (root / OUTPUTS_MANIFEST).read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                entry = json.loads(line)
                written[str(entry["file"])] = str(entry["sha256"])
    return written


def check_overwrite(root: str | Path, names, overwrite: bool = False) -> None:
    """Refuse (OverwriteError) if an output `root/name` exists and is not what a command of this project wrote.

    A file counts as the project's when `root/.rtda-outputs.jsonl` (see `record_outputs`) holds its name with its
    current checksum: a file the user put there, or edited since, is never replaced unless `overwrite` (the
    command's `--overwrite`). Call it before anything is written, with every name the command will write.
    """
    if overwrite:
        return
    root = Path(root)
    written = _manifest(root)
    foreign = [root / name for name in names if (root / name).is_file() and
               written.get(Path(name).as_posix()) != file_sha256(root / name)]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise OverwriteError(f"{foreign[0]}{more}: exists and was not written by this project (not in "
                             f"{root / OUTPUTS_MANIFEST}); nothing was written: move it, choose another output, "
                             "or pass --overwrite to replace it")


def record_outputs(root: str | Path, names) -> None:
    """Note the files `root/name` just written in `root/.rtda-outputs.jsonl`, so that a later run may replace them.

    Appends one line per file (the last line of a name wins), so a run killed midway keeps what it noted.
    """
    root = Path(root)
    lines = "".join(json.dumps({"file": Path(name).as_posix(), "sha256": file_sha256(root / name)}) + "\n"
                    for name in names)
    with open(root / OUTPUTS_MANIFEST, "a", encoding="utf-8") as handle:
        handle.write(lines)


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
