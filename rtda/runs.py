"""The run-folder format, in one place: where runs go, what their files are called, how to find them again.

    <work dir>/<config name>/<YYYYmmdd-HHMMSS>[-N]/    one training run (-N when two start in the same second)
        config.yaml          the resolved config (rewritten by a resume that applied changes)
        last.pt              everything a resume needs; written at intervals and on a stop
        best.pt              weights only, of the best validation so far
        snapshots/iter_NNNNNNN.pt   weights only, every train.keep_every iterations
        resume_log.jsonl     one line per resume that applied changes
        run.lock             the one writer's lock (pid, host, since, command while held; empty once released)
        metrics.json         written when the run finishes: a run folder without it is unfinished
        events.out.tfevents.*   TensorBoard

Folder names sort in start order, so the newest run of a config is the last name in sorted order.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path, PurePath

from rtda.config import ConfigError
from rtda.utils.files import atomic_write_text

LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.json"
SNAPSHOTS = "snapshots"
SNAPSHOT_NAME = re.compile(r"^iter_(\d+)\.pt$")
LOCK = "run.lock"


def check_run_name(name: str) -> None:
    """A run name (`name`, the config's stem by default) is a folder under --work-dir: ConfigError for an absolute
    path or a `..` part, which would put the run outside it."""
    if PurePath(name).is_absolute() or ".." in PurePath(name).parts:
        raise ConfigError(f"`name` = {name!r}: a run name is a folder under --work-dir; expected a relative name "
                          f"without '..' (e.g. gta5_bisenet_dacs)")


def new_run_dir(work_dir: Path, name: str) -> Path:
    """Create and return a new, empty run folder `work_dir/name/<timestamp>` (suffixed -1, -2, ... when taken).

    Safe when several processes start runs of the same config within one second: `mkdir` decides who owns a name.
    """
    check_run_name(name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (work_dir / name).mkdir(parents=True, exist_ok=True)
    run_dir, n = work_dir / name / stamp, 1
    while True:  # two runs started within the same second, in this process or another: mkdir is the arbiter
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            run_dir, n = work_dir / name / f"{stamp}-{n}", n + 1


def snapshot_path(run_dir: Path, iteration: int) -> Path:
    """Where the weights kept at `iteration` go: `run_dir/snapshots/iter_NNNNNNN.pt` (the inverse of
    `snapshot_iteration`)."""
    return run_dir / SNAPSHOTS / f"iter_{iteration:07d}.pt"


def snapshot_iteration(path: Path) -> int | None:
    """The iteration in a snapshot file's name (`iter_0001000.pt` -> 1000); None for any other name."""
    match = SNAPSHOT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every snapshot file of a run, in iteration order; [] when it kept none."""
    folder = Path(run_dir) / SNAPSHOTS
    if not folder.is_dir():
        return []
    found = [(snapshot_iteration(path), path) for path in folder.iterdir()]
    return sorted((iteration, path) for iteration, path in found if iteration is not None and path.is_file())


def newest_unfinished_run(work_dir: Path, name: str) -> tuple[Path | None, str]:
    """What `--resume auto` continues: (the newest run's last.pt, "") when that run is unfinished and has one;
    otherwise (None, why not). Only the newest run of `name` is considered, never an older one."""
    runs = sorted((p for p in (work_dir / name).glob("*") if p.is_dir()), key=lambda p: p.name)
    if not runs:
        return None, f"no run of {name} in {work_dir}"
    if (runs[-1] / METRICS).exists():
        return None, (f"the newest run {runs[-1]} is finished (to extend it, name its last.pt and a larger "
                      f"train.iters with --apply-changes)")
    if not (runs[-1] / LAST).exists():
        return None, f"the newest run {runs[-1]} has no last.pt (it stopped before its first checkpoint)"
    return runs[-1] / LAST, ""


def interrupted_run(work_dir: Path, name: str, seed: int) -> Path | None:
    """The last.pt of the newest unfinished run of `name` whose config.yaml has this seed (older runs included);
    None when there is none."""
    import yaml

    for run in sorted((work_dir / name).glob(f"*/{LAST}"), key=lambda p: p.parent.name, reverse=True):
        config = run.parent / "config.yaml"
        finished = (run.parent / METRICS).exists()
        if not finished and config.is_file() and (yaml.safe_load(config.read_text()) or {}).get("seed") == seed:
            return run
    return None


def write_metrics(run_dir: Path, summary: dict) -> None:
    """Write `run_dir/metrics.json` (schema in docs/architecture.md); its presence marks the run finished."""
    atomic_write_text(run_dir / METRICS, json.dumps(summary, indent=2))


def read_metrics(run_dir: Path) -> dict:
    """The parsed `run_dir/metrics.json` (FileNotFoundError for an unfinished run)."""
    return json.loads((Path(run_dir) / METRICS).read_text())


class RunLockError(RuntimeError):
    """A run folder that another live process trains (or whose lock file cannot be used); one line."""


ORPHAN_WAIT_S = 30.0  # how long a lock of a gone process may stay held by the workers it forked (see RunLock)


class RunLock:
    """The one-writer lock of a run folder, `run_dir/run.lock`: held from `acquire` to `release` (or the `with`
    block) by the process that trains the run; a second writer is refused with one line naming the holder.

    Why flock on an open file descriptor: the kernel drops it when the last descriptor of that open file closes,
    so a killed run (SIGKILL, OOM) never blocks its resume, and two opens conflict even within one process. POSIX
    (fcntl/lockf) locks were tried and rejected: a process loses them when it closes *any* descriptor of the
    file, so one stray read of run.lock would silently admit a second writer. flock's cost: forked DataLoader
    workers share the descriptor, so after a SIGKILL of the trainer they hold the lock until they notice their
    parent is gone (seconds); `acquire` waits for them (up to ORPHAN_WAIT_S) when the holder's pid is gone.
    The holder's JSON (pid, host, since, command) is written into the locked file in place (a rename-based
    atomic write would swap the locked inode); an unreadable one reads as "no details".
    NFS: Linux emulates flock with the server's byte-range locks, which hold across hosts only where the mount
    has locking (not `nolock`); a holder on another host cannot be checked for liveness, so its lock is obeyed.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; return a one-line note when a lock left by a process that is gone was taken over
        (None otherwise). RunLockError, with nothing written, when a live process holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise RunLockError(f"{self.path}: cannot open the run's lock file ({exc.strerror})") from None
        try:
            holder = _lock_or_holder(fd)
        except RunLockError as exc:
            os.close(fd)
            raise RunLockError(f"{self.path}: cannot lock the run folder ({exc})") from None
        if holder is not False:
            os.close(fd)
            raise RunLockError(f"{self.path.parent} is being trained by {_describe(holder)}; one process "
                               f"writes a run: wait for it to finish, or stop it (Ctrl-C saves last.pt) and resume")
        previous = _read_holder(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([Path(sys.executable).name, *sys.argv])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if previous is None:  # a lock file released cleanly is empty
            return None
        gone = ("that process is gone" if previous.get("host") == me["host"] and not _alive(previous.get("pid"))
                else "its lock was released")
        return f"note: {self.path}: taking over the lock left by {_describe(previous)} ({gone})"

    def release(self) -> None:
        """Empty the lock file (a later taker sees a clean release) and drop the lock; a no-op when not held.

        The file stays: unlinking it would let a process still waiting on the old file and one creating a new
        file both believe they hold the lock."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # now, not when forked workers close their copies
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_or_holder(fd: int) -> dict | None | bool:
    """flock `fd` without blocking: False when taken, else the holder's details (None: none readable).

    A holder on this host whose pid is gone left the lock to its forked children: wait for them to exit."""
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise RunLockError(exc.strerror) from None
        holder = _read_holder(fd)
        orphaned = holder is not None and holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))
        if not orphaned or time.monotonic() > deadline:
            return holder
        time.sleep(0.2)


def _read_holder(fd: int) -> dict | None:
    """The JSON a lock file holds (None when empty or unreadable: a clean release, or a write in progress)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "another process (its run.lock gives no details)"
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}{command}"


def _alive(pid) -> bool:
    """Whether a process of this id runs on this host (one of another user counts as running)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # atomic_write's temporary: .<target>.<mkstemp's 8 chars>.tmp


def leftover_temporaries(work_dir: Path, name: str) -> list[Path]:
    """The temporary files that killed saves left in the run folders of `name` (`.last.pt.XXXXXXXX.tmp` and the
    like, in a run folder or its snapshots/), where no writer can be saving now.

    A save removes the temporaries of its own target, but a run killed during its first save is never resumed
    (`--resume auto` starts a new run) and keeps its ~100 MB temporary otherwise. A folder whose run.lock names a
    live process on this host, or any process on another host (its liveness cannot be checked), is skipped."""
    found = []
    for run in sorted(p for p in (Path(work_dir) / name).glob("*") if p.is_dir()):
        if _may_be_writing(run):
            continue
        for folder in (run, run / SNAPSHOTS):
            found += sorted(p for p in folder.glob(".*.tmp") if TEMPORARY.match(p.name) and p.is_file())
    return found


def remove_leftover_temporaries(work_dir: Path, name: str) -> str | None:
    """Delete `leftover_temporaries(work_dir, name)`; a one-line note naming them and the space freed, or None."""
    removed, freed = [], 0
    for path in leftover_temporaries(work_dir, name):
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:  # gone meanwhile, or not ours to delete: left as it is
            continue
        removed.append(str(path))
        freed += size
    if not removed:
        return None
    shown = ", ".join(removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
    return (f"note: removed {len(removed)} temporary file{'s' if len(removed) > 1 else ''} left by killed saves "
            f"({freed / 2**20:.1f} MiB): {shown}")


def _may_be_writing(run_dir: Path) -> bool:
    """Whether a process may be writing `run_dir` now, from its run.lock's holder (read only: never locked here,
    so a writer starting at this moment is not refused). No lock file, an empty one (released) or a holder
    whose pid is gone on this host: no."""
    try:
        text = (run_dir / LOCK).read_text()
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError):
        return True
    if not text.strip():
        return False
    try:
        holder = json.loads(text)
    except ValueError:
        return True  # a holder writing its details at this moment
    if not isinstance(holder, dict) or holder.get("host") != socket.gethostname():
        return True
    return _alive(holder.get("pid"))
