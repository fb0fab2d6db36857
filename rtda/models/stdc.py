"""STDC-Seg (Fan et al., "Rethinking BiSeNet For Real-time Semantic Segmentation", CVPR 2021): STDC1 and STDC2.

Official code: MichaelFan01/STDC-Seg (MIT): `nets/stdcnet.py` (backbone), `models/model_stages.py` (head),
`loss/detail_loss.py` (detail aggregation loss), `train.py` (recipe). Followed layer by layer:

    backbone    STDCNet813 (STDC1, stages of 2/2/2 blocks) or STDCNet1446 (STDC2, 4/5/3): two ConvX stems
                (3x3 stride 2, 32 and 64 channels; 1/2, 1/4), then stages at 1/8, 1/16, 1/32 (256, 512, 1024
                channels) of STDC modules (`CatBottleneck`, 4 ConvX: 1x1 to C/2, 3x3 to C/4, C/8, C/8,
                concatenated; the stride-2 module puts a depthwise 3x3 stride-2 conv + BN after its first ConvX
                and a 3x3 stride-2 avg-pool on that first output's skip). The ImageNet classifier (`conv_last`,
                `fc`, `bn`, `linear`) is not part of the segmentation network (`use_conv_last` False).
    context     global average of the 1/32 features -> 1x1 ConvBNReLU (128) added to ARM32(1/32) (3x3
                ConvBNReLU to 128, x * sigmoid(BN(1x1 conv(global average)))) -> nearest to 1/16 ->
                3x3 ConvBNReLU; + ARM16(1/16) -> nearest to 1/8 -> 3x3 ConvBNReLU ("cp8", 128 channels)
    fusion      FFM(1/8 backbone features, cp8): 1x1 ConvBNReLU 384 -> 256, x + x * SE(x) (256 -> 64 -> 256)
    outputs     main: 3x3 ConvBNReLU 256 + 1x1 conv to the classes, at 1/8.
                training only: `out16` (on cp8, at 1/8) and `out32` (on the 1/32 branch after its 1/16
                upsampling, at 1/16), each 3x3 ConvBNReLU 64 + 1x1 conv; `detail` (on the 1/8 backbone
                features, the official `use_boundary_8`): 3x3 ConvBNReLU 64 + 1x1 conv to one channel.

Training loss (`supervised_loss`, official `train.py`): OHEM cross-entropy (thresh 0.7, model.ohem_*) of the main
logits and of `out16` and `out32` (weight 1 each, model.aux_weight), plus the detail aggregation loss on `detail`:
BCE + dice against the label's detail map (`detail_targets`), weight 1 each.

Deviations: the detail head's logits are upsampled on the model's grid (`model.align_corners`; the official code
always uses align_corners=True, which the STDC configs set); InPlaceABNSync is plain BatchNorm + ReLU (the same
function; SyncBN is `train.sync_bn`). The official model also builds detail heads on the 1/2, 1/4 and 1/16
features that its recipe never uses; they are left out (docs/models.md gives both parameter counts).
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from rtda.config import ConfigError
from rtda.models.base import SegmentationModel, SegOutput, freeze_bn_affine
from rtda.models.grid import upsample
from rtda.models.losses import segmentation_loss

# blocks per stage at 1/8, 1/16, 1/32 (STDCNet813 / STDCNet1446 `layers`), and the authors' ImageNet file
LAYOUTS = {"stdc1": (2, 2, 2), "stdc2": (4, 5, 3)}
IMAGENET_FILES = {"stdc1": ("STDCNet813", "STDCNet813M_73.91.tar"), "stdc2": ("STDCNet1446", "STDCNet1446_76.47.tar")}
# the detail aggregation loss (loss/detail_loss.py): a Laplacian, the fixed 1x1 fusion of the stride 1, 2, 4
# boundary maps, the 0.1 thresholds
LAPLACIAN = ((-1.0, -1.0, -1.0), (-1.0, 8.0, -1.0), (-1.0, -1.0, -1.0))
FUSE_WEIGHTS = (0.6, 0.3, 0.1)
DETAIL_THRESHOLD = 0.1


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """The official ConvX / ConvBNReLU: conv (no bias), BN, ReLU, under their key names (conv, bn)."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        bn=nn.BatchNorm2d(out_channels), relu=nn.ReLU(inplace=True)))


class CatBottleneck(nn.Module):
    """The STDC module: 4 ConvX of shrinking width (C/2, C/4, C/8, C/8) whose outputs are concatenated; with
    stride 2, a depthwise stride-2 conv + BN (`avd_layer`) follows the first, whose own output is avg-pooled."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        widths = [out_channels // 2, out_channels // 4, out_channels // 8, out_channels // 8]
        self.conv_list = nn.ModuleList([conv_bn_relu(in_channels, widths[0], kernel=1)])
        self.conv_list.extend(conv_bn_relu(widths[i - 1], widths[i]) for i in range(1, 4))
        if stride == 2:
            half = out_channels // 2
            self.avd_layer = nn.Sequential(nn.Conv2d(half, half, 3, 2, 1, groups=half, bias=False),
                                           nn.BatchNorm2d(half))
            self.skip = nn.AvgPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.conv_list[0](x)
        out = self.avd_layer(first) if self.stride == 2 else first
        outs = []
        for conv in self.conv_list[1:]:
            out = conv(out)
            outs.append(out)
        return torch.cat([self.skip(first) if self.stride == 2 else first, *outs], dim=1)


class STDCNet(nn.Module):
    """The STDC backbone under the official `features` keys: stems at 1/2 and 1/4, stages at 1/8, 1/16, 1/32."""

    def __init__(self, layout: tuple[int, int, int], base: int = 64):
        super().__init__()
        blocks = [conv_bn_relu(3, base // 2, 3, 2), conv_bn_relu(base // 2, base, 3, 2)]
        in_channels = base
        for stage, count in enumerate(layout):
            out_channels = base * 4 * 2 ** stage
            for j in range(count):
                blocks.append(CatBottleneck(in_channels, out_channels, 2 if j == 0 else 1))
                in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        # features[:end] reaches 1/8, 1/16, 1/32 (the official x8, x16, x32 slices)
        self.stage_ends = [2 + sum(layout[:i + 1]) for i in range(3)]
        for m in self.modules():  # init_params: the backbone's initialisation without ImageNet weights
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The 1/8, 1/16 and 1/32 features (256, 512, 1024 channels)."""
        feats = []
        for i, block in enumerate(self.features, start=1):
            x = block(x)
            if i in self.stage_ends:
                feats.append(x)
        return feats


class AttentionRefinement(nn.Module):
    """ARM: 3x3 ConvBNReLU to `out_channels`, scaled by sigmoid(BN(1x1 conv(its global average)))."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, out_channels)
        self.attention = nn.Sequential(nn.Conv2d(out_channels, out_channels, 1, bias=False),
                                       nn.BatchNorm2d(out_channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x * self.attention(x.mean((2, 3), keepdim=True))


class ContextPath(nn.Module):
    """The 1/32 and 1/16 features refined, summed top-down and brought to 1/8 (nearest, as the official)."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.conv_avg = conv_bn_relu(1024, channels, kernel=1)
        self.arm32, self.arm16 = AttentionRefinement(1024, channels), AttentionRefinement(512, channels)
        self.conv_head32, self.conv_head16 = conv_bn_relu(channels, channels), conv_bn_relu(channels, channels)

    def forward(self, feat8, feat16, feat32) -> tuple[torch.Tensor, torch.Tensor]:
        """(cp8: the context at 1/8, cp16: the 1/32 branch at 1/16)."""
        # the global context broadcast over the 1/32 map = the official nearest upsampling of a 1x1 map
        context32 = self.arm32(feat32) + self.conv_avg(feat32.mean((2, 3), keepdim=True))
        cp16 = self.conv_head32(F.interpolate(context32, size=feat16.shape[-2:], mode="nearest"))
        cp8 = self.conv_head16(F.interpolate(self.arm16(feat16) + cp16, size=feat8.shape[-2:], mode="nearest"))
        return cp8, cp16


class FeatureFusion(nn.Module):
    """FFM: 1x1 ConvBNReLU of the concatenation, then x + x * sigmoid(conv(relu(conv(global average of x))))."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.convblk = conv_bn_relu(in_channels, out_channels, kernel=1)
        self.attention = nn.Sequential(nn.Conv2d(out_channels, out_channels // 4, 1, bias=False), nn.ReLU(inplace=True),
                                       nn.Conv2d(out_channels // 4, out_channels, 1, bias=False), nn.Sigmoid())

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.convblk(torch.cat([spatial, context], dim=1))
        return torch.addcmul(x, x, self.attention(x.mean((2, 3), keepdim=True)))


def output_head(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """The official BiSeNetOutput: 3x3 ConvBNReLU, then a 1x1 conv (no bias)."""
    return nn.Sequential(conv_bn_relu(in_channels, mid_channels), nn.Conv2d(mid_channels, out_channels, 1, bias=False))


class STDCSeg(SegmentationModel):
    """STDC-Seg with the STDC1 (`stdc1`) or STDC2 (`stdc2`) backbone; see the module docstring."""

    def __init__(self, variant: str = "stdc1", num_classes: int = 19, freeze_bn: bool = False,
                 input_norm: str = "imagenet"):
        super().__init__(input_norm)
        if variant not in LAYOUTS:
            raise ValueError(f"STDC variant = {variant!r}: expected one of {sorted(LAYOUTS)}")
        self.variant = variant
        self.backbone = STDCNet(LAYOUTS[variant])
        self.context_path = ContextPath(128)
        self.ffm = FeatureFusion(256 + 128, 256)
        self.classifier = output_head(256, 256, num_classes)
        # class logits first (multi-level methods read the first), the one-channel detail map after them
        self.aux_heads = nn.ModuleDict({"out16": output_head(128, 64, num_classes),
                                        "out32": output_head(128, 64, num_classes),
                                        "detail": output_head(256, 64, 1)})
        for name, m in self.named_modules():  # the official heads' init (kaiming_normal_, a=1)
            if isinstance(m, nn.Conv2d) and not name.startswith("backbone."):
                nn.init.kaiming_normal_(m.weight, a=1)
        # DAFormer's feature distance hooks the last block of the 1/32 stage (the official `x32` output)
        self.bottleneck_stage = f"backbone.features.{len(self.backbone.features) - 1}"
        self.convert_pretrained = partial(convert_stdc_imagenet, variant=variant)
        if freeze_bn:
            freeze_bn_affine(self.backbone)

    def forward_logits(self, x, with_aux):
        if self.training and x.shape[0] < 2:
            raise ValueError("STDC-Seg trains on batches of at least 2 images: the BN layers of its attention "
                             "modules normalise globally pooled features across the batch")
        feat8, feat16, feat32 = self.backbone(x)
        cp8, cp16 = self.context_path(feat8, feat16, feat32)
        logits = self.classifier(self.ffm(feat8, cp8))
        aux = {}
        if with_aux:
            aux = {"out16": self.aux_heads["out16"](cp8), "out32": self.aux_heads["out32"](cp16),
                   "detail": self.aux_heads["detail"](feat8)}
        return logits, aux

    def supervised_loss(self, output: SegOutput, label: torch.Tensor,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
        """OHEM CE of the main logits + `aux_weight` x that of `out16` and `out32`, plus the detail aggregation
        loss (BCE + dice, weight 1 each) of the `detail` output when present (official train.py).

        With `weight` (pixel-weighted pseudo-labels), the detail targets come from the pseudo-label as from a
        label, and each pixel's detail terms are scaled by its weight (`detail_aggregation_loss`)."""
        classes = {k: v for k, v in output.aux.items() if k != "detail"}
        loss = segmentation_loss(output._replace(aux=classes), label, self.aux_weight, weight, self.ohem)
        if "detail" in output.aux:
            bce, dice = detail_aggregation_loss(output.aux["detail"], label, output.align_corners, weight)
            loss = loss + bce + dice
        return loss

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """As the official `get_params`: the backbone and the context path (ARMs, their heads, the global
        context conv) learn at the base LR ("backbone"), the FFM and the output heads 10x faster ("head")."""
        base = {id(p) for m in (self.backbone, self.context_path) for p in m.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        return {"backbone": [p for p in trainable if id(p) in base],
                "head": [p for p in trainable if id(p) not in base]}


def detail_targets(label: torch.Tensor) -> torch.Tensor:
    """The detail ground truth [B, 1, H, W] (0/1, float32) of a label map [B, H, W], as loss/detail_loss.py.

    The label values themselves (ignored pixels as 255, zero padding at the image border) are convolved with the
    Laplacian at strides 1, 2 and 4; each map, upsampled (nearest) to the label size, is 1 where above 0.1;
    the three are fused with the fixed 1x1 kernel [0.6, 0.3, 0.1] and thresholded at 0.1 again. Consequences
    kept from the official code: a boundary lies on the side of the higher label value (the clamp at 0), so the
    edges of ignored regions are detail pixels on their ignored side; image-border pixels of any class but 0 are
    detail pixels (the zero padding); and the 1/4 map alone (0.1) does not pass the last threshold. Computed on
    the label's device with no host sync.
    """
    x = label.unsqueeze(1).float()
    kernel = torch.tensor(LAPLACIAN, dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
    fused = torch.zeros_like(x)
    for stride, w in zip((1, 2, 4), FUSE_WEIGHTS):
        edges = F.conv2d(x, kernel, stride=stride, padding=1)
        if stride > 1:
            edges = F.interpolate(edges, size=x.shape[-2:], mode="nearest")
        fused = fused + w * (edges > DETAIL_THRESHOLD).float()
    return (fused > DETAIL_THRESHOLD).float()


def dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2 sum(p t) + 1) / (sum p + sum t + 1) per image, averaged over the batch (official dice_loss_func)."""
    p, t = probs.flatten(1), target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def detail_aggregation_loss(detail_logits: torch.Tensor, label: torch.Tensor, align_corners: bool,
                            weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, dice) of the detail head's logits [B, 1, h, w], upsampled bilinearly to the label, against
    `detail_targets(label)`; the BCE is the mean over all pixels, ignored ones included (as the official).

    `weight` [B, H, W] (DACS/MIC pseudo-labels): the BCE becomes the mean of weight x BCE over all pixels (the
    form of the weighted CE), and the dice compares weight x sigmoid with weight x target, so pixels of weight 0
    (unconfident, ignored rows) take no part in either term."""
    target = detail_targets(label)
    logits = upsample(detail_logits, label.shape[-2:], align_corners).float()
    if weight is None:
        return F.binary_cross_entropy_with_logits(logits, target), dice_loss(logits.sigmoid(), target)
    w = weight.unsqueeze(1).float()
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w).mean()
    return bce, dice_loss(logits.sigmoid() * w, target * w)


def convert_stdc_imagenet(state: dict, path: str, variant: str) -> dict:
    """The authors' ImageNet file (`STDCNet813M_73.91.tar` / `STDCNet1446_76.47.tar`, read with its
    `state_dict` nesting removed) -> `STDCNet` keys: the `features.*` tensors, as the official `init_weight`
    loads them. The file's copies of the same tensors under the stage aliases (`x2.` ... `x32.`) and its
    ImageNet classifier (`conv_last`, `fc`, `bn`, `linear`) are dropped. A file of another network: ConfigError."""
    official, filename = IMAGENET_FILES[variant]
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    blocks = {int(k.split(".")[1]) for k in features if k.split(".")[1].isdigit()}
    expected = 2 + sum(LAYOUTS[variant])
    if not features or blocks != set(range(expected)):
        first = next(iter(state), "nothing")
        raise ConfigError(f"model.pretrained = {path}: holds {len(state)} tensors like {first!r}, which is not "
                          f"a {official} ImageNet checkpoint ({filename}, the {expected} blocks features.0-"
                          f"{expected - 1}) for model.name {variant}")
    return features
