"""One writer per run (issue 27, group 1), and run folders that stay under --work-dir (group 7).

A run folder's `run.lock` (`rtda.runs.RunLock`) is held by the process that trains it: a second writer is one
line naming the holder, exit 1, nothing written; a lock left by a killed process is taken over with a note; the
lock is released after a finish, a stop and an exception. CLI cases check the message, the exit code and the
checksums of the work folder before and after, as tests/test_never_lost.py does."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rtda import engine as train
from rtda import runs
from rtda.config import ConfigError, load_config
from rtda.utils.files import load_checkpoint

from conftest import tiny_overrides
from test_never_lost import ENV, REPO, SOURCE_ONLY, checksums, run_cli, unfinished_run

HOLDER = """
import sys, time
from rtda.runs import RunLock
RunLock(sys.argv[1]).acquire()
print("HELD", flush=True)
time.sleep(120)
"""

# Asks from another process (where this process's own locks conflict) whether the lock is free, and what the
# file holds; only fcntl, so it starts fast and never takes the lock for long.
PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except OSError:
    print("held")
"""


def lock_state(run_dir: Path) -> tuple[str, str]:
    """('free' or 'held', the text of run.lock) as another process sees it."""
    path = run_dir / runs.LOCK
    probe = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=60)
    return probe.stdout.strip(), path.read_text()


def hold(run_dir: Path) -> subprocess.Popen:
    """A live process holding `run_dir`'s lock (as a training process would) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "HELD"
    return proc


@pytest.fixture
def data_root(synthetic_root) -> Path:
    return synthetic_root


def test_a_second_writer_is_refused_then_a_killed_holders_lock_is_taken_over(data_root, tmp_path, capsys):
    work = tmp_path / "runs"
    run_dir = unfinished_run(data_root, work)
    holder = hold(run_dir)
    try:
        before = checksums(work)
        for resume in ("auto", str(run_dir / "last.pt")):
            code, err, out = run_cli(capsys, SOURCE_ONLY, *tiny_overrides(data_root), "--work-dir", str(work),
                                     "--resume", resume)
            assert code == 1 and len(err) == 1, err
            assert err[0].startswith(f"error: {run_dir} is being trained by pid {holder.pid} on host "
                                     f"{socket.gethostname()} since "), err
            assert err[0].endswith(f"({Path(sys.executable).name} -c {run_dir}); one process writes a run: wait "
                                   f"for it to finish, or stop it (Ctrl-C saves last.pt) and resume"), err
            assert checksums(work) == before  # nothing written, the holder's lock file included
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL: the kernel dropped the lock; the holder's details stay in the file
    left = (run_dir / runs.LOCK).read_text()
    assert json.loads(left)["pid"] == holder.pid and lock_state(run_dir) == ("free", left)
    code, err, out = run_cli(capsys, SOURCE_ONLY, *tiny_overrides(data_root), "--work-dir", str(work),
                             "--resume", "auto")
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith(f"note: {run_dir / runs.LOCK}: taking over the lock left by "
                                                   f"pid {holder.pid} on host {socket.gethostname()} since "), out
    assert notes[0].endswith("(that process is gone)")
    assert (run_dir / "metrics.json").exists() and load_checkpoint(run_dir / "last.pt")["iteration"] == 4
    assert lock_state(run_dir) == ("free", "")  # released cleanly after the finish


def test_a_lock_left_by_a_pid_that_does_not_exist_is_taken_over_with_a_note(tmp_path):
    left = {"pid": 2**22 + 1, "host": socket.gethostname(), "since": "2026-01-01 00:00:00", "command": "train.py"}
    (tmp_path / runs.LOCK).write_text(json.dumps(left))  # above Linux's largest pid: no such process
    lock = runs.RunLock(tmp_path)
    note = lock.acquire()
    assert note == (f"note: {tmp_path / runs.LOCK}: taking over the lock left by pid {2**22 + 1} on host "
                    f"{socket.gethostname()} since 2026-01-01 00:00:00 (train.py) (that process is gone)")
    assert json.loads((tmp_path / runs.LOCK).read_text())["pid"] == os.getpid()
    assert lock_state(tmp_path)[0] == "held"
    with pytest.raises(runs.RunLockError, match=f"is being trained by pid {os.getpid()} on host"):
        runs.RunLock(tmp_path).acquire()  # flock: a second open conflicts within one process too
    assert lock_state(tmp_path)[0] == "held"  # ...and opening and closing the file again kept the lock
    lock.release()
    assert lock_state(tmp_path) == ("free", "")
    with runs.RunLock(tmp_path) as again:  # a clean release leaves nothing to report
        assert again.fd is not None


FORKING_HOLDER = HOLDER.replace('print("HELD"', 'import os\nif os.fork() == 0:\n    time.sleep(3)\n    os._exit(0)\nprint("HELD"')


def test_a_killed_holders_forked_children_are_waited_for(tmp_path):
    """DataLoader workers forked by a trainer share its flock until they see their parent die: a resume right
    after a SIGKILL waits for them instead of refusing in the name of a dead pid."""
    proc = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(tmp_path)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "HELD"
    proc.kill()
    proc.wait()
    assert lock_state(tmp_path)[0] == "held"  # by the child, for about three more seconds
    lock = runs.RunLock(tmp_path)
    assert lock.acquire().endswith("(that process is gone)")
    lock.release()


def test_the_lock_is_released_after_a_ctrl_c_stop(data_root, tmp_path, capsys):
    work = tmp_path / "runs"
    overrides = tiny_overrides(data_root, **{"train.iters": 200, "train.checkpoint_interval": 1000})
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(SOURCE_ONLY), *overrides,
                             "--work-dir", str(work)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # the run has started (and holds its lock) once it prints its folder
        if line.startswith("run folder:"):
            break
    (run_dir,) = work.glob("gta5_bisenet/*")
    assert lock_state(run_dir)[0] == "held"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert lock_state(run_dir) == ("free", "")
    cfg = load_config(SOURCE_ONLY, tiny_overrides(data_root, **{"train.iters": 200, "train.checkpoint_interval":
                                                                 1000, "train.max_wall_time": 1e-6}))
    assert train.train(cfg, work_dir=work, resume="auto") == run_dir  # a second run resumes it
    assert "note:" not in capsys.readouterr().out


def test_the_lock_is_released_after_an_exception(data_root, tmp_path, monkeypatch):
    from rtda.engine import trainer

    real_step, calls = trainer.train_step, []

    def failing_step(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in the second step")
        return real_step(*args)

    monkeypatch.setattr(trainer, "train_step", failing_step)
    work = tmp_path / "runs"
    cfg = load_config(SOURCE_ONLY, tiny_overrides(data_root, **{"train.checkpoint_interval": 1}))
    with pytest.raises(RuntimeError, match="a bug in the second step"):
        train.train(cfg, work_dir=work)
    (run_dir,) = work.glob("gta5_bisenet/*")
    assert lock_state(run_dir) == ("free", "")
    monkeypatch.setattr(trainer, "train_step", real_step)
    assert train.train(cfg, work_dir=work, resume="auto") == run_dir
    assert (run_dir / "metrics.json").exists()


TWO_RANKS = """
import os, sys
from pathlib import Path
from rtda.engine.resume import lock_run
from rtda.runs import RunLockError
from rtda.utils.distributed import broadcast_object, close_distributed, init_distributed

def say(line):  # one write per line: the ranks share a pipe, and print's separate writes interleave between them
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()

dist = init_distributed()
with lock_run(Path(sys.argv[1]), dist):  # a free folder: rank 0 takes it, rank 1 follows
    lock_text = broadcast_object(Path(sys.argv[1], "run.lock").read_text() if dist.is_main else None)
    say(f"rank {dist.rank} pid {os.getpid()} in; lock file pid " + lock_text.replace("\\n", " "))
try:
    with lock_run(Path(sys.argv[2]), dist):  # held by another process: every rank is refused
        say(f"rank {dist.rank} in")
except RunLockError as exc:
    say(f"rank {dist.rank} refused: " + str(exc).replace("\\n", " "))
close_distributed()
"""


def test_under_torchrun_rank_0_takes_the_lock_and_every_rank_follows(tmp_path):
    free, held = tmp_path / "free", tmp_path / "held"
    free.mkdir()
    held.mkdir()
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    holder = hold(held)
    try:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(script), str(free), str(held)], cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)},
                                capture_output=True,
                                text=True, timeout=180)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    entered = {int(line.split()[1]): line for line in lines if " in; " in line}
    assert sorted(entered) == [0, 1]
    rank0_pid = int(entered[0].split()[3])
    assert all(f'"pid": {rank0_pid},' in line for line in entered.values())  # one lock, rank 0's
    refused = sorted(line for line in lines if "refused:" in line)
    assert [line.split()[1] for line in refused] == ["0", "1"]
    assert all(f"is being trained by pid {holder.pid} " in line for line in refused)
    assert (free / runs.LOCK).read_text() == ""  # released by rank 0


# ------------------------------------------------------------------ group 7: run folders stay under --work-dir
@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/tmp/escape_abs"])
def test_a_run_name_outside_the_work_dir_is_one_line(name, data_root, tmp_path, capsys):
    work = tmp_path / "inner" / "runs"
    before = checksums(tmp_path)
    code, err, _ = run_cli(capsys, SOURCE_ONLY, *tiny_overrides(data_root), f"name={name}", "--work-dir", str(work))
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: `name` = {name!r}: a run name is a folder under --work-dir"), err
    assert checksums(tmp_path) == before and not Path("/tmp/escape_abs").exists()
    with pytest.raises(ConfigError, match="`name`"):
        runs.new_run_dir(work, name)


def test_resume_of_a_run_folder_suggests_its_last_pt(data_root, tmp_path, capsys):
    work = tmp_path / "runs"
    run_dir = unfinished_run(data_root, work)
    before = checksums(work)
    code, err, _ = run_cli(capsys, SOURCE_ONLY, *tiny_overrides(data_root), "--work-dir", str(work),
                           "--resume", str(run_dir))
    assert code == 1 and err == [f"error: --resume {run_dir}: a folder, expected a checkpoint file (did you mean "
                                 f"--resume {run_dir / 'last.pt'}?)"], err
    code, err, _ = run_cli(capsys, SOURCE_ONLY, *tiny_overrides(data_root), "--work-dir", str(work),
                           "--resume", str(work))
    assert code == 1 and err == [f"error: --resume {work}: a folder, expected a checkpoint file (it holds no "
                                 f"last.pt)"], err
    assert checksums(work) == before
