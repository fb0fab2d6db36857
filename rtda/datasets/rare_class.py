"""Rare class sampling (DAFormer, Hoyer et al. 2022) as a wrapper of the labelled source data set.

    source = rare_class_sampling(build_dataset(cfg.data.source, cfg, "source"), cfg)   # build_dataset does this

Item i of epoch e no longer means image i. From a generator seeded by (seed, e, i) it draws a class
c ~ softmax((1 - f_c) / T) (f_c: the share of c among the source label pixels, T = data.rcs.temperature), then
one of the source images holding more than `min_pixels` pixels of c. When the sample's geometry is random (a
crop, or the scale-crop augmentation) the augmentation and crop are drawn again, up to `tries` times, until the
sample holds more than `min_pixels * min_crop_ratio` pixels of c; if none does, the crop is placed around a
random pixel of c (in the last augmentation that kept c), so a crop always holds the sampled class unless every
augmentation drawn cut it out.

DAFormer counts `min_pixels` (3000) on the 1914x1052 GTA5 frames and the crop threshold (1500) on the 1280x720
resize; here both scale with the area of the label they are counted on, so they mean the same at any size.

The crop is the recipe loader's crop, `adapt.crop`: with rare class sampling it is taken here, where the class
is known, so the source reaches the strategy at the crop size and the strategy's own source crop is a no-op.
The wrapped set's augmentation (`data.augment`) moves here too (it must run before the crop is checked).

The per-image class pixel counts are computed once and cached in a JSON file named by a hash of the label
files (paths, sizes, modification times), next to the data or in `data.rcs.cache_dir`; a file of that name
that is not such a cache is an error, never overwritten.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rtda.config import Config, ConfigError
from rtda.datasets.io import DatasetError
from rtda.datasets.labels import NUM_CLASSES
from rtda.datasets.transforms import augment_sample
from rtda.utils.files import atomic_write

STATS_AREA = 1914 * 1052  # a GTA5 frame: where DAFormer counts `min_pixels`
SAMPLE_AREA = 1280 * 720  # GTA5 resized for training: where DAFormer counts the crop threshold
CACHE_FORMAT = "rare-class-statistics/1"
_CLASS_STREAM = 0x5C5  # separates the class/image/crop generator from other per-sample streams


def class_probabilities(pixel_counts: np.ndarray, temperature: float) -> np.ndarray:
    """P(c) = softmax((1 - f_c) / T) over the classes with pixels (f_c their share of all pixels); 0 for others."""
    counts = np.asarray(pixel_counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise DatasetError("rare class sampling: the source labels hold no pixel of any class")
    logits = (1.0 - counts[present] / counts[present].sum()) / temperature
    weights = np.exp(logits - logits.max())  # stable: (1 - f) / 0.01 reaches 100
    probs = np.zeros_like(counts)
    probs[present] = weights / weights.sum()
    return probs


# ---------------------------------------------------------------------------------------- statistics
class _LabelCounts(Dataset):
    """Index -> (label height, width, per-class pixel counts) of the wrapped set's stored label maps."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset.labels)

    def __getitem__(self, index):
        label = self.dataset.read_train_ids(index)
        counts = np.bincount(label.ravel(), minlength=256)[:NUM_CLASSES]
        return [int(label.shape[0]), int(label.shape[1]), [int(n) for n in counts]]


def _cache_key(dataset) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}\n{dataset.label_form}\n".encode())
    for path in dataset.labels:
        path = Path(path).resolve()
        st = path.stat()
        digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def class_statistics(dataset, cache_dir: str | Path | None, workers: int = 0) -> tuple[np.ndarray, np.ndarray, Path]:
    """(label sizes [N, 2] as (h, w), class pixel counts [N, 19], cache file) of the labels of `dataset`."""
    key = _cache_key(dataset)
    default = getattr(dataset, "root", None) or Path(dataset.labels[0]).parent
    folder = Path(cache_dir if cache_dir is not None else default)
    path = folder / f"rare_class_stats_{key[:16]}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            ok = isinstance(cached, dict) and cached.get("format") == CACHE_FORMAT and cached.get("key") == key
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"data.rcs: {path} exists but is not the class statistics of these labels; it is left "
                              "as it is: move it, or set data.rcs.cache_dir to another folder")
        rows = cached["images"]
    else:
        print(f"rare class sampling: counting the classes of {len(dataset.labels)} source labels once "
              f"(cached in {path})", flush=True)
        loader = DataLoader(_LabelCounts(dataset), batch_size=None, num_workers=workers)
        rows = list(loader)
        record = {"format": CACHE_FORMAT, "key": key, "what": "per-image [height, width, class pixel counts] "
                  "of the label files, for rare class sampling (datasets/rare_class.py)",
                  "names": list(dataset.names), "images": rows}
        try:
            # concurrent processes (torchrun ranks) write the same content: none removes another's temporary file
            atomic_write(path, lambda handle: json.dump(record, handle, separators=(",", ":")), mode="w",
                         remove_stale=False)
        except OSError as exc:
            raise ConfigError(f"data.rcs.cache_dir = {cache_dir!r}: cannot write the class statistics to {folder} "
                              f"({exc.strerror or exc}); expected a writable folder") from None
    sizes = np.array([[h, w] for h, w, _ in rows], dtype=np.int64).reshape(-1, 2)
    counts = np.array([c for _, _, c in rows], dtype=np.int64).reshape(-1, NUM_CLASSES)
    return sizes, counts, path


# --------------------------------------------------------------------------------------------- wrapper
class RareClassSampling(Dataset):
    """The items of `dataset` (an ImageLabelDataset built without augmentation) drawn by rare class sampling."""

    def __init__(self, dataset, sizes: np.ndarray, counts: np.ndarray, temperature: float, min_pixels: int,
                 min_crop_ratio: float, tries: int, crop: list[int] | None, augment, seed: int):
        self.dataset, self.augment, self.seed, self.tries = dataset, augment, seed, tries
        self.crop_hw = None if crop is None else (crop[1], crop[0])
        self.probs = class_probabilities(counts.sum(0), temperature)
        self.classes = np.flatnonzero(self.probs > 0)
        self.probs = self.probs[self.classes] / self.probs[self.classes].sum()
        scaled = counts * (STATS_AREA / np.prod(sizes, axis=1, dtype=np.float64))[:, None]
        self.images_with, self.fallback_classes = {}, []
        for c in self.classes:
            chosen = np.flatnonzero(scaled[:, c] > min_pixels)
            if chosen.size == 0:  # DAFormer asserts here; small data sets may have no such image
                chosen = np.flatnonzero(counts[:, c] > 0)
                self.fallback_classes.append(int(c))
            self.images_with[int(c)] = chosen
        h, w = dataset.size_hw
        self.sample_pixels = min_pixels * min_crop_ratio * (h * w) / SAMPLE_AREA
        scale_crop = augment is not None and augment.cfg.scale_crop > 0
        self.random_geometry = self.crop_hw is not None or scale_crop

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        """What the wrapped set offers (labels, names, read_train_ids, root, ...), for tools that inspect it."""
        if name.startswith("__") or name == "dataset":  # not during unpickling in a worker, before `dataset` is set
            raise AttributeError(name)
        return getattr(self.dataset, name)

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)  # shared memory: the workers see it

    def draw(self, index: int, epoch: int | None = None) -> tuple[int, int, np.random.Generator]:
        """(class, image index, the generator that continues with the crops) of item `index` of `epoch`."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng(np.random.SeedSequence([self.seed % 2**63, epoch, index, _CLASS_STREAM]))
        c = int(rng.choice(self.classes, p=self.probs))
        candidates = self.images_with[c]
        return c, int(candidates[rng.integers(len(candidates))]), rng

    def __getitem__(self, index: int) -> dict:
        epoch = self.epoch
        c, image_index, rng = self.draw(index, epoch)
        item = self.dataset[image_index]
        image, label = item["image"], item["label"].to(torch.uint8)
        holding = None  # the last augmented sample that still holds c
        for attempt in range(self.tries if self.random_geometry else 1):
            full_image, full_label = image, label
            if self.augment is not None:  # a new augmentation stream per (index, attempt)
                full_image, full_label = augment_sample(self.augment, image, label, self.seed, epoch,
                                                        index * self.tries + attempt)
            out_image, out_label = full_image, full_label
            if self.crop_hw is not None:
                y, x = self._random_box(full_label.shape, rng)
                out_image, out_label = self._crop(full_image, full_label, y, x)
            if not self.random_geometry or int((out_label == c).sum()) > self.sample_pixels:
                break
            if self.crop_hw is not None and (full_label == c).any():
                holding = full_image, full_label
        else:  # no random crop held enough of c: place the crop around one of its pixels
            if holding is not None:
                full_image, full_label = holding
                ys, xs = (full_label == c).nonzero(as_tuple=True)
                k = int(rng.integers(len(ys)))
                y, x = self._box_around(full_label.shape, int(ys[k]), int(xs[k]), rng)
                out_image, out_label = self._crop(full_image, full_label, y, x)
        return {"image": out_image.contiguous(), "label": out_label.to(torch.uint8), "name": item["name"]}

    def _random_box(self, shape, rng) -> tuple[int, int]:
        (h, w), (ch, cw) = shape, self.crop_hw
        return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))

    def _box_around(self, shape, py: int, px: int, rng) -> tuple[int, int]:
        """A crop position whose box contains pixel (py, px), uniform over the offsets that allow it."""
        (h, w), (ch, cw) = shape, self.crop_hw
        y = min(max(py - int(rng.integers(ch)), 0), h - ch)
        x = min(max(px - int(rng.integers(cw)), 0), w - cw)
        return y, x

    def _crop(self, image, label, y, x):
        ch, cw = self.crop_hw
        return image[:, y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]


def rare_class_sampling(dataset, cfg: Config) -> RareClassSampling:
    """Wrap the source set of `cfg` (built by build_dataset) in rare class sampling, as `cfg.data.rcs` asks."""
    r = cfg.data.rcs
    checks = [("temperature", r.temperature > 0, "a temperature > 0 (DAFormer: 0.01)"),
              ("min_pixels", r.min_pixels >= 0, "a pixel count >= 0 (DAFormer: 3000)"),
              ("min_crop_ratio", r.min_crop_ratio >= 0, "a ratio >= 0 (DAFormer: 0.5)"),
              ("tries", r.tries >= 1, "at least 1 (DAFormer: 10)")]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"data.rcs.{key} = {getattr(r, key)!r}: expected {expected}")
    if getattr(dataset, "labels", None) is None:
        raise ConfigError("data.rcs.enabled = true needs a labelled source data set")
    crop = cfg.adapt.crop
    h, w = dataset.size_hw
    if crop is not None and (len(crop) != 2 or not (0 < crop[1] <= h and 0 < crop[0] <= w)):
        raise ConfigError(f"adapt.crop = {crop}: expected [width, height] no larger than data.source.size [{w}, {h}]")
    sizes, counts, path = class_statistics(dataset, r.cache_dir, cfg.train.workers)
    augment, dataset.augment = dataset.augment, None  # augmentation runs in the wrapper, before the crop check
    wrapped = RareClassSampling(dataset, sizes, counts, r.temperature, r.min_pixels, r.min_crop_ratio, r.tries,
                                crop, augment, cfg.seed)
    shown = ", ".join(f"{c}: {p:.3f}" for c, p in sorted(zip(wrapped.classes.tolist(), wrapped.probs.tolist()),
                                                         key=lambda cp: -cp[1])[:5])
    note = (f"; classes {wrapped.fallback_classes} have no image above data.rcs.min_pixels, any image holding them "
            "is drawn" if wrapped.fallback_classes else "")
    print(f"rare class sampling: {len(wrapped.classes)} classes, most likely {shown} (statistics {path.name}){note}",
          flush=True)
    return wrapped
