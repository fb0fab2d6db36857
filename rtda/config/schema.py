"""The config schema: one dataclass per section, whose defaults are the run's defaults.

Every field is a key of the YAML files (`section.key`); its type hint is what the loader accepts (rtda.config.load).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Literal

# The role of a key, declared once as field metadata (rtda.config.keys derives the resume and table key sets):
#   learning   (a field without a role) changes what a run learns: a resume must keep it, tables split rows on it
#   structure  learning, and it also decides which tensors a checkpoint holds: no resume can change it
#   free       changes nothing learned: a resume may change it, and runs differing only in it are one table row
#   machine    the machine's setting: a resume may change it, but tables keep runs differing in it apart
#   seed       learning for a resume, but the seeds of one config are one table row (its mean and spread)
ROLES = ("learning", "structure", "free", "machine", "seed")
STRUCTURE = MappingProxyType({"role": "structure"})
FREE = MappingProxyType({"role": "free"})
MACHINE = MappingProxyType({"role": "machine"})
SEED = MappingProxyType({"role": "seed"})
# An AugmentConfig field that is an augmentation's probability (the unmarked ones are parameters).
AUGMENTATION = MappingProxyType({"augmentation": True})


@dataclass
class DatasetConfig:
    name: Literal["gta5", "cityscapes", "synthetic"] = "cityscapes"
    root: str = field(default="data/Cityscapes", metadata=FREE)  # where the files are, not what they hold
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
    """Training augmentations of the labelled source (rtda.datasets.transforms applies them).

    Each field marked AUGMENTATION is one augmentation's probability (0 = off; RANGES keeps it in [0, 1]) and
    AUGMENTATIONS lists them in declaration order; the unmarked fields are their parameters.
    """

    hflip: float = field(default=0.0, metadata=AUGMENTATION)
    scale_crop: float = field(default=0.0, metadata=AUGMENTATION)
    scale_range: list[float] = field(default_factory=lambda: [0.75, 1.5])
    color_jitter: float = field(default=0.0, metadata=AUGMENTATION)
    jitter_strength: float = 0.25
    blur: float = field(default=0.0, metadata=AUGMENTATION)
    blur_sigma: list[float] = field(default_factory=lambda: [0.15, 1.15])
    brightness: float = field(default=0.0, metadata=AUGMENTATION)
    brightness_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    noise: float = field(default=0.0, metadata=AUGMENTATION)
    noise_std: float = 8.0  # on the 0-255 pixel scale
    grayscale: float = field(default=0.0, metadata=AUGMENTATION)


# The augmentation probabilities of `data.augment`, in declaration order.
AUGMENTATIONS = tuple(f.name for f in fields(AugmentConfig) if f.metadata.get("augmentation"))


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
    cache: str | None = field(default="data/cache", metadata=FREE)  # the cache gives byte-identical items


@dataclass
class ModelConfig:
    name: Literal["deeplabv2", "bisenet", "bisenetv2", "stdc1", "stdc2", "ddrnet23_slim", "ddrnet23", "pidnet_s",
                  "pidnet_m"] = field(default="bisenet", metadata=STRUCTURE)
    # BiSeNet's context path; DeepLabV2 is always ResNet-101
    backbone: Literal["resnet18", "resnet101"] = field(default="resnet18", metadata=STRUCTURE)
    pretrained: str = "none"  # none | imagenet | PATH to a state dict
    # Models take raw 0-255 RGB pixels and normalise on the device, the way their weights expect:
    # `imagenet` = RGB / 255 with ImageNet mean/std (torchvision); `caffe` = BGR minus the caffe means (DeepLab).
    input_norm: Literal["imagenet", "caffe"] = "imagenet"
    num_classes: int = field(default=19, metadata=STRUCTURE)
    # Where a ResNet bottleneck strides: `v1.5` (torchvision, in the 3x3) or `v1` (caffe DeepLab weights, in the 1x1,
    # with caffe's ceil-mode max-pool: the course's 374.7 GFLOPs DeepLabV2 is this variant).
    resnet_variant: Literal["v1", "v1.5"] = field(default="v1.5", metadata=STRUCTURE)
    # DeepLabV2 ASPP rates; [6, 12] is the head AdaptSegNet and DACS actually ran (DAFormer's `dlv2red`).
    aspp_dilations: list[int] = field(default_factory=lambda: [6, 12, 18, 24], metadata=STRUCTURE)
    # Freeze the backbone BN affine parameters (running stats still update); null = the model's recipe:
    # frozen for DeepLabV2, trained for BiSeNet.
    freeze_bn: bool | None = None
    # DeepLabV2: extra classifier on layer3 (multi-level training)
    aux_head: bool = field(default=False, metadata=STRUCTURE)
    aux_weight: float = 1.0  # weight of each auxiliary segmentation loss
    # Online hard example mining on the labelled losses (BiSeNetV2, STDC, DDRNet, PIDNet): the mean CE over the
    # pixels whose label probability is below `ohem_thresh`, at least `ohem_min_kept` of them per batch
    # (null: a 16th of the labelled pixels). null = plain cross-entropy.
    ohem_thresh: float | None = None
    ohem_min_kept: int | None = None
    # How logits and softmaxes are resized (bilinear) everywhere: the model's output, the losses, evaluation and
    # pseudo-labels (images keep align_corners=False, labels nearest). `true` is the caffe DeepLab grid that
    # AdaptSegNet, ADVENT, FDA and DACS upsample with; DAFormer and MIC (mmseg) use false.
    align_corners: bool = False


@dataclass
class TeacherConfig:
    """The frozen teacher of `adapt.name: distill` (rtda/adapt/distill.py): a trained model of this project, built
    from its own config (model section, input normalisation, data.target.size) and checkpoint. The teacher is not
    in the student's checkpoint; the student's strategy state records the file's path and sha256, and a resume
    with another file is refused."""

    config: str | None = None  # the teacher's YAML config, e.g. configs/gta5_deeplabv2_daformer_dacs.yaml
    checkpoint: str | None = None  # its trainer checkpoint (best.pt, last.pt) or a model state dict
    # average the teacher's softmax of the target image and of its horizontal flip (flipped back)
    flip: bool = False


@dataclass
class AdaptConfig:
    """Every constant of every adaptation recipe; defaults are the papers' values (docs/architecture.md).

    One flat section, so that every resolved config.yaml and old run folder keeps loading; the keys are grouped
    below by the strategy that reads them (each strategy class in rtda.adapt declares its own list), and the field
    order is the order `dump_config` writes.
    """

    name: Literal["none", "adversarial", "fda", "dacs", "minent", "advent", "mic", "distill"] = field(
        default="none", metadata=STRUCTURE)
    # -- adversarial (AdaptSegNet): output-space discriminator(s) on the softmax of the upsampled logits.
    # AdvEnt (`advent`) reads these too: its discriminators see the self-information map.
    # A second discriminator on the first auxiliary output (model.aux); MinEnt reads it too (entropy of that output)
    multi_level: bool = field(default=False, metadata=STRUCTURE)
    lambda_adv: float = 0.001
    lambda_adv_aux: float = 0.0002
    gan: Literal["bce", "ls"] = "bce"  # vanilla GAN (BCE with logits) or least-squares GAN (MSE)
    discriminator: Literal["standard", "light"] = field(default="standard", metadata=STRUCTURE)
    d_lr: float = 1e-4  # Adam, decayed with the model's poly schedule (train.poly_power)
    d_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    source_label: float = 0.0
    target_label: float = 1.0
    # -- fda: low-frequency amplitude of the target in the source image, entropy on the target
    beta: float = 0.01  # half-width of the swapped band = floor(min(H, W) * beta)
    entropy_weight: float = 0.005
    entropy_eta: float = 2.0  # Charbonnier exponent: (ent^2 + eps)^eta
    entropy_eps: float = 1e-8
    entropy_start: int = 0  # iteration from which the entropy term is on
    pseudo_weight: float = 1.0  # self-supervised round: weight of the CE on data.target.pseudo_labels
    # -- the pseudo-label tool (`python -m rtda.adapt.pseudo_labels`), which writes FDA's self-supervised labels
    pseudo_percentile: float = 0.66  # per-class confidence percentile kept
    pseudo_cap: float = 0.9  # ... and the cap on that per-class threshold
    # -- fda and dacs (and mic): the [width, height] random crop the recipe's loader takes: FDA crops the source
    # (1024x512), DACS both (512x512)
    crop: list[int] | None = None
    # -- dacs (and mic): ClassMix with an EMA teacher
    mix_fraction: float = 0.5  # share of a source image's classes pasted (rounded up)
    # Count the ignore label (255) as one more class that ClassMix may pick, as DACS's trainUDA.py does
    # (torch.unique of the label, its ignore filter commented out); false = the paper's "half of the classes".
    mix_ignore_as_class: bool = False
    # Draw the classes from the whole batch's labels (each image pastes its own pixels of them), as DAFormer's
    # get_class_masks does (torch.unique over the batch); false = each image's own classes (DACS).
    mix_classes_from_batch: bool = False
    ema_alpha: float = 0.99  # teacher alpha = min(1 - 1 / (iteration + 1), ema_alpha)
    pseudo_threshold: float = 0.968  # pseudo-label weight = share of target pixels at or above it
    jitter_strength: float = 0.25  # brightness, contrast, saturation and hue
    jitter_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.15, 1.15])
    blur_kernel: float = 0.1  # Gaussian kernel side as a share of the image height (made odd)
    mix_weight: float = 1.0
    # -- minent (ADVENT MinEnt): normalised entropy of the target softmax (main; first auxiliary output with
    # multi_level)
    lambda_ent: float = 0.001
    lambda_ent_aux: float = 0.0002
    # -- DAFormer options of dacs (and mic); the defaults leave DACS as it was, the DAFormer values in comments.
    fd_lambda: float = 0.0  # thing-class ImageNet feature distance on the source (DAFormer 0.005)
    fd_classes: list[int] = field(default_factory=lambda: [6, 7, 11, 12, 13, 14, 15, 16, 17, 18])  # thing classes
    fd_min_ratio: float = 0.75  # a feature cell counts as its majority class when that class covers this share
    # pseudo-label weight zeroed in these many top / bottom rows of the target (DAFormer 15 / 120), given for a
    # target 512 rows high (the protocol's 1024x512) and scaled to data.target.size's height
    pseudo_ignore_top: int = 0
    pseudo_ignore_bottom: int = 0
    # -- mic (= dacs + masked image consistency): square patches of mask_block px (at a 512-row target, scaled
    # like the rows above), each masked with probability mask_ratio, on the colour-augmented target
    mask_block: int = 64
    mask_ratio: float = 0.7
    mask_lambda: float = 1.0
    # -- distill: a frozen adapted teacher's knowledge into the student on the target: CE on its pseudo-labels with
    # DACS's confidence weight (pseudo_threshold), kd_lambda * T^2 * KL(teacher || student) at temperature T, and
    # with `mix` ClassMix of source and target as DACS mixes (mix_*, jitter_*, blur_*, crop). Not a paper's values.
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    kd_lambda: float = 1.0
    kd_temperature: float = 1.0
    mix: bool = False


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
    # SGD only: update each backbone parameter as many times per step as the official optimisers of AdaptSegNet,
    # ADVENT, FDA and DACS list it (their module walk names a bottleneck conv 3 times, a downsample conv 4; about
    # 3x the stated backbone LR), with the SGD loop of the PyTorch they ran: torch0.4 (the weight decay added into
    # .grad in place, so it accumulates over the repeats) or torch1 (1.x up to 1.7: on a copy); repeated_sgd.py.
    official_param_repeats: Literal["none", "torch1", "torch0.4"] = "none"
    poly_power: float = 0.9
    # Iteration at which poly would reach 0; null = the stop iteration. AdaptSegNet decays over 250k and stops
    # at 150k (its LR ends at 44% of base), FDA over 150k and stops at 100k (37%). Strategy optimisers follow.
    poly_horizon: int | None = None
    warmup_iters: int = 0
    # Autocast dtype. auto: bf16 on GPUs of compute capability >= 8.0, fp16 + GradScaler on older ones (T4, P100),
    # float32 on CPU; bf16 / fp16 force that dtype (on CPU too, under CPU autocast); none: float32 everywhere.
    # The machine's precision, not the recipe: a run moved from a T4 to an A100 under `auto` changes it anyway.
    amp: Literal["auto", "bf16", "fp16", "none"] = field(default="auto", metadata=MACHINE)
    workers: int = field(default=4, metadata=FREE)
    log_interval: int = field(default=50, metadata=FREE)
    eval_interval: int = field(default=0, metadata=FREE)  # iterations between validations; 0 = at the end only
    checkpoint_interval: int = field(default=500, metadata=FREE)
    sync_bn: bool = False
    deterministic: bool = False
    vis_images: int = field(default=4, metadata=FREE)  # validation images drawn into TensorBoard
    # Gradient accumulation: each iteration runs `accumulate` micro-batches of batch_size / accumulate images
    # and steps once, so batch_size keeps its meaning (the global batch) with less memory.
    accumulate: int = 1
    # Stop cleanly (last.pt saved) once this session has trained this long, e.g. "3h30m", "90m" or seconds;
    # `--resume auto` continues. Leave a margin for one validation and one checkpoint before a hard limit.
    max_wall_time: str | float | None = field(default=None, metadata=FREE)
    # also keep the weights every N iterations in snapshots/iter_NNNNNNN.pt; 0 = off
    keep_every: int = field(default=0, metadata=FREE)


@dataclass
class TTAConfig:
    """Test-time augmentation in eval.py (not in the trainer's validation): the softmax of every variant is averaged."""

    flip: bool = False  # also predict the horizontally flipped image (and flip the prediction back)
    scales: list[float] = field(default_factory=lambda: [1.0])  # image scales, e.g. [0.75, 1.0, 1.25, 1.5]


@dataclass
class EvalConfig:
    # `protocol`: score at the configured val size (1024x512); `full`: at the original label size (2048x1024)
    label_size: Literal["protocol", "full"] = "protocol"
    batch_size: int = field(default=1, metadata=FREE)
    tta: TTAConfig = field(default_factory=TTAConfig)
    # Sliding-window inference in eval.py, for inputs too large for one pass: [width, height] crops whose logits
    # are averaged where they overlap; null = the whole image at once. `window_stride` (null = 2/3 of the window)
    # must not exceed the window. Used at every TTA scale.
    window: list[int] | None = None
    window_stride: list[int] | None = None


@dataclass
class Config:
    name: str = field(default="", metadata=FREE)  # the config file's stem when empty; names the run folder
    seed: int = field(default=0, metadata=SEED)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
