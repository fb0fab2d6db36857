"""eval.py --images: colour maps and overlays for a folder of images or a video, with PyTorch or ONNX models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rtda import evaluation as evaluator
from rtda.evaluation.predict import video_frames
from rtda.models import build_model
from rtda.utils.files import save_checkpoint

HEIGHT, WIDTH = 64, 128


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A config (val size 128x64), a BiSeNet-R18 checkpoint and a folder of images of several sizes, two broken."""
    root = tmp_path_factory.mktemp("predict")
    config = root / "bisenet.yaml"
    config.write_text("model: {name: bisenet, backbone: resnet18, pretrained: none}\n"
                      f"data: {{val: {{name: cityscapes, size: [{WIDTH}, {HEIGHT}]}}}}\n")
    torch.manual_seed(0)
    checkpoint = root / "best.pt"
    save_checkpoint({"model": build_model({"name": "bisenet"}).state_dict()}, checkpoint)
    rng = np.random.default_rng(0)
    images = root / "images"
    (images / "city").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (70, 40, 3), dtype=np.uint8)).save(images / "city" / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(images / "grey.png")  # mode L
    (images / "truncated.png").write_bytes((images / "a.png").read_bytes()[:150])
    (images / "text.jpg").write_text("not an image")
    (images / "notes.txt").write_text("ignored: not an image suffix")
    return config, checkpoint, images


def test_folder_of_images_of_any_size_with_broken_files_skipped(setup, tmp_path, capsys):
    config, checkpoint, images = setup
    out = tmp_path / "out"
    assert evaluator.main(["--config", str(config), "--checkpoint", str(checkpoint), "--images", str(images),
                           "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "predicted 3 images" in captured.out and "images/s end to end" in captured.out
    assert "2 unreadable images skipped" in captured.out
    assert "truncated.png" in captured.out and "text.jpg" in captured.out
    assert "predicting" in captured.err  # the progress bar
    for stem, size in [("a", (90, 50)), ("city/b", (40, 70)), ("grey", (30, 30))]:
        for kind in ("color", "overlay"):
            with Image.open(out / f"{stem}_{kind}.png") as written:
                assert written.size == size and written.mode == "RGB"  # at the image's own size
    assert not list(out.glob("truncated*")) and not list(out.glob("text*"))


def test_colour_map_holds_cityscapes_colours(setup, tmp_path):
    config, checkpoint, images = setup
    out = tmp_path / "out"
    assert evaluator.main(["--config", str(config), "--checkpoint", str(checkpoint), "--images", str(images),
                           "--out", str(out), "--no-progress"]) == 0
    from rtda.datasets.labels import PALETTE

    colours = np.asarray(Image.open(out / "a_color.png")).reshape(-1, 3)
    palette = {tuple(c) for c in PALETTE.tolist()}
    assert {tuple(c) for c in np.unique(colours, axis=0).tolist()} <= palette


def test_onnx_model_predicts_the_same_as_pytorch(setup, tmp_path):
    pytest.importorskip("onnxruntime")
    from rtda.models import export

    config, checkpoint, images = setup
    onnx_file = tmp_path / "model.onnx"
    assert export.main(["--config", str(config), "--checkpoint", str(checkpoint), "--out", str(onnx_file)]) == 0
    outs = {}
    for name, ckpt in (("torch", checkpoint), ("onnx", onnx_file)):
        outs[name] = tmp_path / name
        assert evaluator.main(["--config", str(config), "--checkpoint", str(ckpt), "--images", str(images),
                               "--out", str(outs[name]), "--no-progress"]) == 0
    for stem in ("a", "city/b", "grey"):
        a = np.asarray(Image.open(outs["torch"] / f"{stem}_color.png"))
        b = np.asarray(Image.open(outs["onnx"] / f"{stem}_color.png"))
        assert (a == b).all(-1).mean() > 0.999


def test_fixed_size_onnx_on_images_of_another_size_is_one_line(setup, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from rtda.models import export

    config, checkpoint, images = setup
    onnx_file = tmp_path / "model.onnx"
    assert export.main(["--config", str(config), "--checkpoint", str(checkpoint), "--out", str(onnx_file)]) == 0
    capsys.readouterr()
    assert evaluator.main(["--config", str(config), "--checkpoint", str(onnx_file), "--images", str(images),
                           "--out", str(tmp_path / "out"), "--input-size", "original", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[-1].startswith("error:")  # the "running ... on ..." line, then the error
    assert "takes 64x128 images" in err[-1] and "--dynamic" in err[-1]
    # an ONNX file with another number of classes than the config's model
    other = tmp_path / "seven.yaml"
    other.write_text(config.read_text().replace("pretrained: none", "pretrained: none, num_classes: 7"))
    assert evaluator.main(["--config", str(other), "--checkpoint", str(onnx_file), "--images", str(images),
                           "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "19 classes" in err and "num_classes is 7" in err


def write_video(path, frames: int = 6, corrupt: int | None = None):
    """A tiny MJPG AVI written with OpenCV; `corrupt` zeroes the JPEG data of that frame."""
    cv2 = pytest.importorskip("cv2")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for i in range(frames):
        frame = np.full((HEIGHT, WIDTH, 3), 30 * i, np.uint8)
        frame[:, : 16 * (i + 1)] = 255
        writer.write(frame)
    writer.release()
    if corrupt is not None:
        data = bytearray(path.read_bytes())
        starts = [i for i in range(len(data) - 2) if data[i : i + 3] == b"\xff\xd8\xff"]  # JPEG starts
        assert len(starts) == frames
        data[starts[corrupt] + 2 : starts[corrupt] + 200] = bytes(198)
        path.write_bytes(bytes(data))


def count_frames(path) -> tuple[int, tuple[int, int]]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    n, size = 0, None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        n, size = n + 1, frame.shape[:2]
    capture.release()
    return n, size


def test_video_gets_an_overlaid_video_and_a_corrupt_frame_is_skipped(setup, tmp_path, capsys):
    config, checkpoint, _ = setup
    video = tmp_path / "drive.avi"
    write_video(video, frames=6, corrupt=2)
    out = tmp_path / "out"
    assert evaluator.main(["--config", str(config), "--checkpoint", str(checkpoint), "--images", str(video),
                           "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "predicted 5 frames" in printed and "frames/s end to end" in printed
    assert "1 unreadable frames skipped: frame 2" in printed
    assert count_frames(out / "drive_overlay.mp4") == (5, (HEIGHT, WIDTH))


class FakeCapture:
    """cv2.VideoCapture.read results: True/False per call."""

    def __init__(self, oks):
        self.oks = list(oks)

    def read(self):
        ok = self.oks.pop(0) if self.oks else False
        return ok, np.zeros((4, 4, 3), np.uint8) if ok else None


def test_video_frames_tells_corrupt_frames_from_the_end():
    frames = list(video_frames(FakeCapture([True, False, False, True, False, False]), announced=9))
    assert [(i, f is None) for i, f in frames] == [(0, False), (1, True), (2, True), (3, False)]
    # a container announcing fewer (or no) frames: a failure ends it
    frames = list(video_frames(FakeCapture([True, True, False, True]), announced=0))
    assert [i for i, _ in frames] == [0, 1]


def test_bad_inputs_are_one_line(setup, tmp_path, capsys):
    config, checkpoint, images = setup
    base = ["--config", str(config), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
    cases = [(["--images", str(tmp_path / "missing")], "missing: no such folder or video file"),
             (["--images", str(config)], "takes a folder of images or a video file"),
             (["--images", str(tmp_path / "empty")], "no images"),
             (["--images", str(images), "--input-size", "big"], "--input-size 'big'")]
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    (tmp_path / "empty").mkdir()  # beside --out: an --out inside --images is refused before the folder is read
    cases.append((["--images", str(tmp_path / "broken.mp4")], "broken.mp4"))
    for extra, expected in cases:
        assert evaluator.main(base + extra + ["--no-progress"]) == 1, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error:") and expected in err[-1], (extra, err)
    for argv in (["--images", str(images)],  # no --out
                 ["--images", str(images), "--out", "o", "--each"],  # a scoring option
                 ["--input-size", "64x128"]):  # a prediction option without --images
        with pytest.raises(SystemExit):  # argparse's usage error
            evaluator.parse_args(["--config", str(config), "--checkpoint", str(checkpoint), *argv])
