"""rtda.utils.files.atomic_write: the one atomic file write every writer uses."""
import pytest

from rtda.utils.files import CheckpointError, atomic_write, save_checkpoint


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "stats.json"
    atomic_write(path, lambda handle: handle.write("old"), mode="w")

    def fail(handle):
        handle.write("half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, fail, mode="w")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]


def test_writes_replace_and_stale_temporaries_go(tmp_path):
    path = tmp_path / "sub" / "manifest.json"
    atomic_write(path, lambda handle: handle.write(b"one"))
    stale = path.parent / ".manifest.json.abc123.tmp"  # what a killed writer leaves
    stale.write_bytes(b"partial")
    atomic_write(path, lambda handle: handle.write(b"two"))
    assert path.read_bytes() == b"two" and not stale.exists()
    other = path.parent / ".manifest.json.theirs.tmp"  # another process's write in progress
    other.write_bytes(b"in progress")
    atomic_write(path, lambda handle: handle.write(b"three"), remove_stale=False)
    assert path.read_bytes() == b"three" and other.exists()


class _DiskFull:
    def __reduce__(self):
        raise OSError(28, "No space left on device")


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"iteration": 1}, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"could not write the checkpoint .*the previous last.pt is untouched"):
        save_checkpoint({"weights": _DiskFull()}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
