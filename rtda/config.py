"""Run configuration: typed dataclass defaults <- YAML file (+ one level of `_base_`) <- `key=value` overrides.

    cfg = load_config("configs/gta5_bisenet_adv.yaml", ["train.lr=1e-3", "adapt.lambda_adv=0.002"])
    cfg.train.lr, cfg.data.source.size, cfg.adapt.name

Strict by construction: an unknown key is an error that names the key and the nearest valid one, a value
of the wrong type names the key, the value and the type expected, and a choice outside its `Literal`
names the allowed values. `dump_config` writes YAML that `load_config` reads back to an equal object.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file, key or value that is not what the schema expects."""


# ----------------------------------------------------------------------------------------------- schema
@dataclass
class DatasetConfig:
    name: Literal["gta5", "cityscapes", "synthetic"] = "cityscapes"
    root: str = "data/Cityscapes"
    split: str = "train"
    size: list[int] = field(default_factory=lambda: [1024, 512])  # [width, height] after resizing
    # synthetic only: which generated domain to read, `source` (GTA5 layout) or `target` (Cityscapes layout)
    domain: Literal["source", "target"] = "target"
    list_file: str | None = None  # gta5: optional text file of image names (e.g. 00001.png), one per line
    pseudo_labels: str | None = None  # cityscapes: folder of train-id pseudo-label PNGs used as labels
    # How images are resized to `size` (labels always nearest): `bicubic` is what AdaptSegNet, FDA and DACS do
    # to GTA5 (PIL BICUBIC; torchvision's antialiased bicubic matches it to 1 grey level).
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    # What the label PNGs hold: `auto` tells it from the values and modes of a sample of the files (README,
    # "Data"); `label_ids` (Cityscapes ids 0..33), `train_ids` (0..18, 255 = ignore) or `color` (RGB in the
    # Cityscapes palette) override the detection.
    label_form: Literal["auto", "label_ids", "train_ids", "color"] = "auto"


@dataclass
class AugmentConfig:
    """Training augmentations of the labelled source; each value is that augmentation's probability (0 = off)."""

    hflip: float = 0.0
    scale_crop: float = 0.0
    scale_range: list[float] = field(default_factory=lambda: [0.75, 1.5])
    color_jitter: float = 0.0
    jitter_strength: float = 0.25
    blur: float = 0.0
    blur_sigma: list[float] = field(default_factory=lambda: [0.15, 1.15])
    brightness: float = 0.0
    brightness_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    noise: float = 0.0
    noise_std: float = 8.0  # on the 0-255 pixel scale
    grayscale: float = 0.0


# The augmentation probabilities of `data.augment` (its other keys are their parameters), in declaration order.
AUGMENTATIONS = ("hflip", "scale_crop", "color_jitter", "blur", "brightness", "noise", "grayscale")


@dataclass
class SyntheticConfig:
    """How `datasets.synthetic` generates the two domains when a `synthetic` root does not exist yet."""

    num_source: int = 600
    num_target: int = 600
    num_val: int = 150
    height: int = 128
    width: int = 256
    seed: int = 0


@dataclass
class RareClassConfig:
    """DAFormer's rare class sampling of the labelled source (datasets/rare_class.py); off unless `enabled`.

    Item i of an epoch draws a class c with P(c) = softmax((1 - f_c) / temperature) (f_c: c's share of the source
    label pixels), then a source image holding more than `min_pixels` of c (counted as on a 1914x1052 GTA5
    frame), then re-draws its augmentation and crop up to `tries` times until the sample holds more than
    `min_pixels * min_crop_ratio` pixels of c (counted as on a 1280x720 image); pixel counts scale by area.
    """

    enabled: bool = False
    temperature: float = 0.01
    min_pixels: int = 3000
    min_crop_ratio: float = 0.5
    tries: int = 10
    # folder of the cached class statistics (one JSON per set of label files); null = the source data root
    cache_dir: str | None = None


@dataclass
class DataConfig:
    source: DatasetConfig = field(
        default_factory=lambda: DatasetConfig(name="gta5", root="data/GTA5", split="train", size=[1280, 720]))
    target: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="train"))
    val: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="val"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    rcs: RareClassConfig = field(default_factory=RareClassConfig)
    # Folder of the prepared copies `python -m rtda.datasets prepare` writes (images and train-id labels at each
    # role's size); the loaders read a complete matching entry there instead of the PNGs, and the PNGs otherwise.
    # null = never look.
    cache: str | None = "data/cache"


@dataclass
class ModelConfig:
    name: Literal["deeplabv2", "bisenet"] = "bisenet"
    backbone: Literal["resnet18", "resnet101"] = "resnet18"  # BiSeNet's context path; DeepLabV2 is always ResNet-101
    pretrained: str = "none"  # none | imagenet | PATH to a state dict
    # Models take raw 0-255 RGB pixels and normalise on the device, the way their weights expect:
    # `imagenet` = RGB / 255 with ImageNet mean/std (torchvision); `caffe` = BGR minus the caffe means (DeepLab).
    input_norm: Literal["imagenet", "caffe"] = "imagenet"
    num_classes: int = 19
    # Where a ResNet bottleneck strides: `v1.5` (torchvision, in the 3x3) or `v1` (caffe DeepLab weights, in the 1x1,
    # with caffe's ceil-mode max-pool: the course's 374.7 GFLOPs DeepLabV2 is this variant).
    resnet_variant: Literal["v1", "v1.5"] = "v1.5"
    # DeepLabV2 ASPP rates; [6, 12] is the head AdaptSegNet and DACS actually ran (DAFormer's `dlv2red`).
    aspp_dilations: list[int] = field(default_factory=lambda: [6, 12, 18, 24])
    # Freeze the backbone BN affine parameters (running stats still update); null = the model's recipe:
    # frozen for DeepLabV2, trained for BiSeNet.
    freeze_bn: bool | None = None
    aux_head: bool = False  # DeepLabV2: extra classifier on layer3 (multi-level training)
    aux_weight: float = 1.0  # weight of each auxiliary segmentation loss


@dataclass
class AdaptConfig:
    """Every constant of every adaptation recipe; defaults are the papers' values (docs/architecture.md)."""

    name: Literal["none", "adversarial", "fda", "dacs", "minent", "advent", "mic"] = "none"
    # adversarial (AdaptSegNet): output-space discriminator(s) on the softmax of the upsampled logits
    multi_level: bool = False  # a second discriminator on the first auxiliary output (model.aux)
    lambda_adv: float = 0.001
    lambda_adv_aux: float = 0.0002
    gan: Literal["bce", "ls"] = "bce"  # vanilla GAN (BCE with logits) or least-squares GAN (MSE)
    discriminator: Literal["standard", "light"] = "standard"
    d_lr: float = 1e-4  # Adam, decayed with the model's poly schedule (train.poly_power)
    d_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    source_label: float = 0.0
    target_label: float = 1.0
    # FDA: low-frequency amplitude of the target in the source image, entropy on the target
    beta: float = 0.01  # half-width of the swapped band = floor(min(H, W) * beta)
    entropy_weight: float = 0.005
    entropy_eta: float = 2.0  # Charbonnier exponent: (ent^2 + eps)^eta
    entropy_eps: float = 1e-8
    entropy_start: int = 0  # iteration from which the entropy term is on
    pseudo_weight: float = 1.0  # self-supervised round: weight of the CE on data.target.pseudo_labels
    pseudo_percentile: float = 0.66  # `adapt.py pseudo-labels`: per-class confidence percentile kept
    pseudo_cap: float = 0.9  # ... and the cap on that per-class threshold
    # [width, height] random crop the recipe's loader takes: FDA crops the source (1024x512), DACS both (512x512)
    crop: list[int] | None = None
    # DACS: ClassMix with an EMA teacher
    mix_fraction: float = 0.5  # share of a source image's classes pasted (rounded up)
    # Count the ignore label (255) as one more class that ClassMix may pick, as DACS's trainUDA.py does
    # (torch.unique of the label, its ignore filter commented out); false = the paper's "half of the classes".
    mix_ignore_as_class: bool = False
    ema_alpha: float = 0.99  # teacher alpha = min(1 - 1 / (iteration + 1), ema_alpha)
    pseudo_threshold: float = 0.968  # pseudo-label weight = share of target pixels at or above it
    jitter_strength: float = 0.25  # brightness, contrast, saturation and hue
    jitter_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.15, 1.15])
    blur_kernel: float = 0.1  # Gaussian kernel side as a share of the image height (made odd)
    mix_weight: float = 1.0
    # ADVENT MinEnt: normalised entropy of the target softmax (main; first auxiliary output with multi_level).
    # AdvEnt (`advent`) takes the adversarial keys above, its discriminators see the self-information map.
    lambda_ent: float = 0.001
    lambda_ent_aux: float = 0.0002
    # DAFormer options of `dacs` (and `mic`); the defaults leave DACS as it was, the DAFormer values in comments.
    fd_lambda: float = 0.0  # thing-class ImageNet feature distance on the source (DAFormer 0.005)
    fd_classes: list[int] = field(default_factory=lambda: [6, 7, 11, 12, 13, 14, 15, 16, 17, 18])  # thing classes
    fd_min_ratio: float = 0.75  # a feature cell counts as its majority class when that class covers this share
    # pseudo-label weight zeroed in these many top / bottom rows of the target (DAFormer 15 / 120), given for a
    # target 512 rows high (the protocol's 1024x512) and scaled to data.target.size's height
    pseudo_ignore_top: int = 0
    pseudo_ignore_bottom: int = 0
    # MIC (`mic` = dacs + masked image consistency): square patches of mask_block px (at a 512-row target, scaled
    # like the rows above), each masked with probability mask_ratio, on the colour-augmented target
    mask_block: int = 64
    mask_ratio: float = 0.7
    mask_lambda: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 50
    iters: int | None = None  # when set, overrides epochs
    batch_size: int = 8
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"  # adamw: decoupled weight decay (DAFormer, MIC)
    lr: float = 2.5e-2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    head_lr_mult: float = 10.0
    poly_power: float = 0.9
    # Iteration at which poly would reach 0; null = the stop iteration. AdaptSegNet decays over 250k and stops
    # at 150k (its LR ends at 44% of base), FDA over 150k and stops at 100k (37%). Strategy optimisers follow.
    poly_horizon: int | None = None
    warmup_iters: int = 0
    # Autocast dtype. auto: bf16 on GPUs of compute capability >= 8.0, fp16 + GradScaler on older ones (T4, P100),
    # float32 on CPU; bf16 / fp16 force that dtype (on CPU too, under CPU autocast); none: float32 everywhere.
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    workers: int = 4
    log_interval: int = 50
    eval_interval: int = 0  # iterations between validations; 0 = at the end only
    checkpoint_interval: int = 500
    sync_bn: bool = False
    deterministic: bool = False
    vis_images: int = 4  # validation images drawn into TensorBoard
    # Gradient accumulation: each iteration runs `accumulate` micro-batches of batch_size / accumulate images
    # and steps once, so batch_size keeps its meaning (the global batch) with less memory.
    accumulate: int = 1
    # Stop cleanly (last.pt saved) once this session has trained this long, e.g. "3h30m", "90m" or seconds;
    # `--resume auto` continues. Leave a margin for one validation and one checkpoint before a hard limit.
    max_wall_time: str | float | None = None
    keep_every: int = 0  # also keep the weights every N iterations in snapshots/iter_NNNNNNN.pt; 0 = off


@dataclass
class TTAConfig:
    """Test-time augmentation in eval.py (not in the trainer's validation): the softmax of every variant is averaged."""

    flip: bool = False  # also predict the horizontally flipped image (and flip the prediction back)
    scales: list[float] = field(default_factory=lambda: [1.0])  # image scales, e.g. [0.75, 1.0, 1.25, 1.5]


@dataclass
class EvalConfig:
    # `protocol`: score at the configured val size (1024x512); `full`: at the original label size (2048x1024)
    label_size: Literal["protocol", "full"] = "protocol"
    batch_size: int = 1
    tta: TTAConfig = field(default_factory=TTAConfig)
    # Sliding-window inference in eval.py, for inputs too large for one pass: [width, height] crops whose logits
    # are averaged where they overlap; null = the whole image at once. `window_stride` (null = 2/3 of the window)
    # must not exceed the window. Used at every TTA scale.
    window: list[int] | None = None
    window_stride: list[int] | None = None


@dataclass
class Config:
    name: str = ""  # the config file's stem when empty; names the run folder
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (its `_base_` files first), apply `section.key=value` overrides, validate."""
    path = Path(path)
    raw = _read_yaml(path)
    merged: dict = {}
    bases = raw.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list):
        raise ConfigError(f"{path}: `_base_` must be a list of YAML paths, got {bases!r}")
    for base in bases:
        base_path = (path.parent / base).resolve()
        base_raw = _read_yaml(base_path)
        if "_base_" in base_raw:
            raise ConfigError(f"{base_path}: a `_base_` file cannot have a `_base_` of its own (one level only)")
        _deep_merge(merged, base_raw)
    _deep_merge(merged, raw)
    for item in overrides:
        _apply_override(merged, item)
    merged.setdefault("name", path.stem)
    return from_dict(merged, source=str(path))


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Validate a plain nested dict against the schema (types, choices, value ranges) and build the Config."""
    cfg = _build(Config, raw, prefix="", source=source)
    check_ranges(cfg, source)
    return cfg


# Allowed values of numeric keys as intervals: `[` `]` inclusive, `(` `)` exclusive; a null value is not checked.
RANGES = {
    "train.epochs": "[1, inf)", "train.iters": "[1, inf)", "train.batch_size": "[1, inf)",
    "train.lr": "[0, inf)", "train.momentum": "[0, 1)", "train.weight_decay": "[0, inf)",
    "train.head_lr_mult": "(0, inf)", "train.poly_power": "[0, inf)", "train.warmup_iters": "[0, inf)",
    "train.poly_horizon": "[1, inf)",
    "train.workers": "[0, inf)", "train.log_interval": "[1, inf)", "train.eval_interval": "[0, inf)",
    "train.checkpoint_interval": "[1, inf)", "train.vis_images": "[0, inf)", "train.accumulate": "[1, inf)",
    "train.keep_every": "[0, inf)",
    "eval.batch_size": "[1, inf)", "model.num_classes": "[1, inf)", "model.aux_weight": "[0, inf)",
    "adapt.lambda_adv": "[0, inf)", "adapt.lambda_adv_aux": "[0, inf)", "adapt.d_lr": "[0, inf)",
    "adapt.beta": "[0, 0.5)", "adapt.entropy_weight": "[0, inf)", "adapt.entropy_start": "[0, inf)",
    "adapt.pseudo_weight": "[0, inf)", "adapt.pseudo_percentile": "[0, 1]", "adapt.pseudo_cap": "[0, 1]",
    "adapt.mix_fraction": "(0, 1]", "adapt.ema_alpha": "[0, 1]", "adapt.pseudo_threshold": "[0, 1]",
    "adapt.jitter_p": "[0, 1]", "adapt.blur_p": "[0, 1]", "adapt.mix_weight": "[0, inf)",
    "data.synthetic.num_source": "[1, inf)", "data.synthetic.num_target": "[1, inf)",
    "data.synthetic.num_val": "[1, inf)", "data.synthetic.height": "[8, inf)", "data.synthetic.width": "[8, inf)",
    **{f"data.augment.{p}": "[0, 1]" for p in AUGMENTATIONS},
}


def check_ranges(cfg: Config, source: str = "<dict>") -> None:
    """Every key of RANGES within its range: an error names the key, the value and the range."""
    for key, interval in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None:
            continue
        low, high = (float(v) for v in interval[1:-1].split(","))
        too_low = value < low if interval[0] == "[" else value <= low
        too_high = value > high if interval[-1] == "]" else value >= high
        if too_low or too_high:
            raise ConfigError(f"{source}: `{key}` = {value!r} is out of range: expected a value in {interval}")
    if cfg.train.max_wall_time is not None:
        try:
            parse_duration(cfg.train.max_wall_time)
        except ValueError as exc:
            raise ConfigError(f"{source}: `train.max_wall_time` = {cfg.train.max_wall_time!r}: {exc}") from None


def parse_duration(value: str | float) -> float:
    """Seconds in a duration: a number of seconds, or text such as "3h30m", "90m", "45s", "1h"."""
    if isinstance(value, str):
        try:
            value = float(value)  # PyYAML reads `1e-3` (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", value)
        if not match or not any(match.groups()):
            raise ValueError("expected seconds or a duration such as 3h30m, 90m or 45s")
        h, m, sec = (float(g) if g else 0.0 for g in match.groups())
        seconds = 3600 * h + 60 * m + sec
    if seconds <= 0:
        raise ValueError("expected a positive duration")
    return seconds


# Keys that do not change what a run learns: a resume may change them freely (the others must match the run's
# config unless `--apply-changes` is given). `train.amp` is the machine's precision (a run moved from a T4 to an
# A100 under `auto` changes it anyway), not the recipe.
RESUME_FREE_KEYS = ("name", "train.amp", "train.workers", "train.log_interval", "train.checkpoint_interval",
                    "train.eval_interval", "train.vis_images", "train.max_wall_time", "train.keep_every",
                    "eval.batch_size", "data.source.root", "data.target.root", "data.val.root",
                    "data.cache")  # the cache gives byte-identical items
# Keys that do not change what a run learns: runs differing only in these (and the seed) are one table row.
NOT_RESULT_KEYS = ("seed", "name", "train.workers", "train.log_interval", "train.checkpoint_interval",
                   "train.vis_images", "data.source.root", "data.target.root", "data.val.root",
                   "data.cache")  # the cache gives byte-identical items
# Keys that decide which tensors a checkpoint holds: no resume can change them.
STRUCTURE_KEYS = ("model.name", "model.backbone", "model.num_classes", "model.aux_head", "model.aspp_dilations",
                  "model.resnet_variant", "adapt.name", "adapt.multi_level", "adapt.discriminator")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}"""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def learning_differences(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (old, new)} for the keys, other than RESUME_FREE_KEYS, whose values differ."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in RESUME_FREE_KEYS and a.get(k) != b.get(k)}


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}: key `{key}` appears twice in one section (lines {seen[key]} "
                                  f"and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loader = _StrictLoader(path.read_text())
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _deep_merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.lr=1e-3")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key!r} is a value, not a section")
    node[keys[-1]] = yaml.safe_load(text) if text.strip() else None


# --------------------------------------------------------------------------------------- validation
def _build(cls: type, raw: Any, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: `{prefix.rstrip('.') or 'config'}` must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean `{prefix}{near[0]}`?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key `{prefix}{key}`{hint}")
        kwargs[key] = _check(hints[key], value, f"{prefix}{key}", source)
    return cls(**kwargs)


def _check(hint: Any, value: Any, key: str, source: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(option, value, key, source)
            except ConfigError:
                continue
        raise _type_error(key, value, " or ".join(_type_name(o) for o in options), source)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
            hint_text = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{source}: `{key}` = {value!r} is not one of {', '.join(map(repr, allowed))}{hint_text}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, value, _type_name(hint), source)
        return [_check(item_type, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, "bool", source)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, value, "int", source)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, value, "float", source)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, "str", source)
    raise ConfigError(f"{source}: `{key}` has an unsupported schema type {hint!r}")


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _type_error(key: str, value: Any, expected: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: `{key}` = {value!r} has type {type(value).__name__}, expected {expected}")
