"""Nothing lost, the smaller cases of issue 27 (group 7): checkpoints that team-mates can read, temporaries of
killed saves that do not stay forever, a second Ctrl-C that is not blamed on the disk, a seed run twice that is
one seed in a table, photos predicted the way they are shown.

CLI cases assert the message, the exit code and what is on disk before and after, as tests/test_never_lost.py."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from rtda.utils.files import atomic_write_text, load_checkpoint, save_checkpoint

from conftest import tiny_overrides
from test_never_lost import ENV, REPO, SOURCE_ONLY, checksums, run_cli


@pytest.fixture
def umask():
    """Set the process umask for the test (restored after): what a user's shell or a shared folder sets."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------ permissions of what is written
def test_checkpoints_and_atomic_writes_follow_the_umask(umask, tmp_path):
    umask(0o022)
    save_checkpoint({"iteration": 1}, tmp_path / "last.pt")
    atomic_write_text(tmp_path / "metrics.json", "{}")
    assert mode(tmp_path / "last.pt") == mode(tmp_path / "metrics.json") == 0o644  # mkstemp alone gives 0o600
    umask(0o027)  # a group-shared project folder
    save_checkpoint({"iteration": 2}, tmp_path / "last.pt")
    assert mode(tmp_path / "last.pt") == 0o640


# --------------------------------------------------------------------------- temporaries left by killed saves
KILL_IN_FIRST_SAVE = """
import sys, time, torch
real_save = torch.save
def save(obj, handle, *args, **kwargs):  # the first save of last.pt: die with half a file written
    if "optimizer" not in obj:  # best.pt (weights only) is written first
        return real_save(obj, handle, *args, **kwargs)
    handle.write(b"half a checkpoint" * 1000)
    handle.flush()
    print("SAVING", flush=True)
    time.sleep(300)
torch.save = save
from rtda import engine as train
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_run_killed_in_its_first_save_leaves_no_temporary_after_the_next_start(synthetic_root, tmp_path, capsys,
                                                                                 umask):
    work = tmp_path / "runs"
    overrides = tiny_overrides(synthetic_root, **{"train.iters": 2})
    proc = subprocess.Popen([sys.executable, "-c", KILL_IN_FIRST_SAVE, "--config", str(SOURCE_ONLY), *overrides,
                             "--work-dir", str(work)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.strip() == "SAVING":
            break
    proc.kill()
    proc.wait()
    (killed,) = work.glob("gta5_bisenet/*")
    (left,) = killed.glob(".last.pt.*.tmp")
    assert not (killed / "last.pt").exists()
    # a run of the same config that another live process trains: its temporary may be a save in progress
    busy = work / "gta5_bisenet" / "19990101-000000"
    busy.mkdir()
    (busy / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    (busy / ".last.pt.abcd1234.tmp").write_bytes(b"being written")
    (killed / ".notes.txt").write_text("a user's hidden file: not a temporary of ours")
    before = checksums(work)

    code, err, out = run_cli(capsys, SOURCE_ONLY, *overrides, "--work-dir", str(work), "--resume", "auto")
    assert code == 0, err
    assert f"the newest run {killed} has no last.pt" in out and "starting a new run" in out
    (note,) = [line for line in out.splitlines() if "left by killed saves" in line]
    assert note.startswith("note: removed 1 temporary file") and str(left) in note
    assert not left.exists()
    after = checksums(work)
    assert {k: v for k, v in before.items() if k != str(left)} == {k: v for k, v in after.items() if k in before}
    (new,) = set(work.glob("gta5_bisenet/*")) - {killed, busy}
    assert mode(new / "last.pt") == 0o644  # through the trainer too (umask 022)


# -------------------------------------------------------------------------------------- a second Ctrl-C
DOUBLE_CTRL_C_IN_SAVE = """
import os, signal, sys, time, torch
real_save, saves = torch.save, []
class Impatient:  # the user presses Ctrl-C twice while the second last.pt is being written
    def __init__(self, handle):
        self.handle, self.writes = handle, 0
    def write(self, data):
        self.writes += 1
        if self.writes == 2:
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
        return self.handle.write(data)
    def flush(self):
        self.handle.flush()
def save(obj, handle, *args, **kwargs):
    saves.append(1)
    return real_save(obj, Impatient(handle) if len(saves) == 2 else handle, *args, **kwargs)
torch.save = save
from rtda import engine as train
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_second_ctrl_c_during_a_save_is_not_blamed_on_the_disk(synthetic_root, tmp_path):
    work = tmp_path / "runs"
    overrides = tiny_overrides(synthetic_root, **{"train.iters": 6})
    proc = subprocess.run([sys.executable, "-c", DOUBLE_CTRL_C_IN_SAVE, "--config", str(SOURCE_ONLY), *overrides,
                           "--work-dir", str(work)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 130, proc.stderr
    assert "could not write" not in proc.stderr and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "second Ctrl-C" in line]
    assert len(lines) == 1 and "checkpoints written before are intact" in lines[0]
    (run_dir,) = work.glob("gta5_bisenet/*")
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 2  # the previous last.pt, whole
    assert not list(run_dir.glob(".*.tmp"))


# ------------------------------------------------------------------------------------ tables: one seed once
def write_finished_run(folder: Path, seed: int, miou: float, when: int) -> Path:
    """A run folder holding what `benchmark.py tables` reads: metrics.json (written at time `when`)."""
    from rtda.config import from_dict, to_dict

    cfg = to_dict(from_dict({"name": "gta5_bisenet", "seed": seed, "data": {"source": {"name": "gta5"}}}))
    folder.mkdir(parents=True)
    classes = ["road", "sidewalk"]
    (folder / "metrics.json").write_text(json.dumps({
        "config_name": "gta5_bisenet", "seed": seed, "final": {"mIoU": miou, "IoU": {"road": miou, "sidewalk": miou}},
        "classes": classes, "config": cfg}))
    os.utime(folder / "metrics.json", (when, when))
    return folder


def test_a_seed_run_twice_counts_once_the_newest(tmp_path, capsys):
    from rtda import bench as benchmark

    root = tmp_path / "runs"
    old = write_finished_run(root / "gta5_bisenet" / "20260101-000000", 0, 10.0, when=1_000)
    new = write_finished_run(root / "gta5_bisenet" / "20260102-000000", 0, 30.0, when=2_000)  # a rerun of seed 0
    write_finished_run(root / "gta5_bisenet" / "20260103-000000", 1, 34.0, when=3_000)
    capsys.readouterr()
    assert benchmark.main(["tables", "--runs", str(root), "--table", "domain-shift"]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("| BiSeNet")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[2].startswith("32.0 ± 2.8")  # seeds 0 (the rerun) and 1: mean 32, not 24.7
    (note,) = [line for line in out.splitlines() if "ran 2 times" in line]
    assert note.startswith("seed 0 of one configuration") and f"{new} (the newest) counts, not {old}" in note


# --------------------------------------------------------------------------------------- EXIF-rotated photos
@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    from rtda.models import build_model

    root = tmp_path_factory.mktemp("exif")
    config = root / "bisenet.yaml"
    config.write_text("model: {name: bisenet, backbone: resnet18, pretrained: none}\n"
                      "data: {val: {name: cityscapes, size: [64, 32]}}\n")
    torch.manual_seed(0)
    save_checkpoint({"model": build_model({"name": "bisenet"}).state_dict()}, root / "best.pt")
    return config, root / "best.pt"


def photo_with_orientation(path: Path, orientation: int) -> None:
    """A 40x24 JPEG as a phone stores it: pixels in sensor order, the EXIF tag saying how to turn them."""
    pixels = np.random.default_rng(orientation).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    pixels[:4, :4] = 255  # a corner that shows which way is up
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def test_exif_rotated_photos_are_predicted_upright_at_their_displayed_size(model_files, tmp_path, capsys):
    from rtda import evaluation as evaluator
    from rtda.datasets.io import read_image

    config, checkpoint = model_files
    photos = tmp_path / "photos"
    photos.mkdir()
    for orientation in range(1, 9):
        photo_with_orientation(photos / f"o{orientation}.jpg", orientation)
    out = tmp_path / "out"
    assert evaluator.main(["--config", str(config), "--checkpoint", str(checkpoint), "--images", str(photos),
                           "--out", str(out)]) == 0
    assert "predicted 8 images" in capsys.readouterr().out
    for orientation in range(1, 9):
        turned = orientation >= 5  # 5-8 swap width and height: shown 24 wide, 40 high
        for kind in ("color", "overlay"):
            with Image.open(out / f"o{orientation}_{kind}.png") as written:
                assert written.size == ((24, 40) if turned else (40, 24)), (orientation, kind)

    from rtda.evaluation.predict import displayed  # the pixels the model sees: as PIL shows the photo

    for orientation in range(1, 9):
        path = photos / f"o{orientation}.jpg"
        with Image.open(path) as image:
            upright = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        assert np.array_equal(displayed(read_image(path).permute(1, 2, 0).numpy(), path), upright), orientation
