"""PIDNet-S and PIDNet-M (Xu, Xiong and Bhattacharyya, "PIDNet: A Real-time Semantic Segmentation Network Inspired
by PID Controllers", CVPR 2023), layer by layer as the official code builds them (XuJiacong/PIDNet, MIT:
models/pidnet.py, models/model_utils.py; S: planes 32, M: planes 64; both m=2, n=3, PAPPM 96, head 128, Light-Bag).

    I branch (integral, context):  conv1 (2x 3x3 s2 conv+BN+ReLU, 1/4) -> layer1 -> layer2 (1/8) -> layer3 (1/16)
                                   -> layer4 (1/32) -> layer5 (Bottlenecks, 1/64) -> PAPPM -> up to 1/8
    P branch (proportional, detail at 1/8): layer3_ -> Pag(., compression3(I)) -> layer4_ -> Pag(., compression4(I))
                                   -> layer5_
    D branch (derivative, boundaries at 1/8): layer3_d + diff3(I) -> layer4_d + diff4(I) -> layer5_d
    fusion:   Light-Bag(P, I, D): sigmoid(D) weighs the detail against the context -> seg head (BN-ReLU-3x3-BN-ReLU-1x1)
    training: the P-branch auxiliary seg head on the P features after the first Pag ("p_branch", class logits) and
              the boundary head (1 channel, "boundary") on the D features after diff4; output stride 8.

Losses (PIDNet.supervised_loss; utils/criterion.py, utils/utils.py FullModel, the Cityscapes configs):
    1.0 * OHEM CE (thresh 0.9, min_kept 131072: model.ohem_*) of the main logits
  + 0.4 (model.aux_weight) * CE of the P-branch logits. The official OhemCrossEntropy runs OHEM on the *last* output
        only and plain per-pixel CE on the others, whose mean FullModel takes over all pixels (ignored ones count 0):
        so here, as there, the auxiliary CE is a mean over every pixel of the label, not over the labelled ones.
  + 20 * class-balanced BCE of the boundary head against the edge target (BondaryLoss / weighted_bce): positives
        weighted by the batch's share of negatives and vice versa, mean over all pixels
  + 1.0 (SB_WEIGHTS) * OHEM CE of the main logits on the pixels where sigmoid(boundary) > 0.8 (the rest ignored).
Every output is upsampled (bilinear) to the label first, as FullModel does.

Edge target (datasets/base_dataset.py gen_sample): the official dataset runs cv2.Canny(label, 0.1, 0.2) on the CPU,
blanks 6 pixels at each image border and dilates with a 4x4 kernel. `boundary_target` computes it from the label
tensor on its device with no host sync: a pixel is a (thin) edge where its label differs from its right or lower
neighbour, which is the pixel Canny keeps on a step (its non-maximum suppression keeps the first of the two equal
gradient peaks), then the same border blank and 4x4 dilation (offsets -2..+1), so a straight boundary gets the band
of 2 + 2 pixels Canny gives. Deviations: on oblique boundaries and corners Canny's thin line may sit one pixel off
(a few pixels per corner); and the target is made from the label the loss sees (after scale and crop), so the band
is 4 pixels wide at every scale and the 6-pixel blank applies to the crop's border, where the official code makes it
at the full image size before the multi-scale resize.

Pseudo-labels (a pixel `weight`, DACS/MIC): the edge target comes from the pseudo-label as from a label, and every
term is weighted per pixel the same way: the CE terms become weight * CE averaged over all pixels (OHEM is for true
labels), the BCE keeps its class balance times the weight. So the boundary head learns the (mixed) target's class
edges with the confidence DACS gives them, instead of idling on target images.

Deviations: Light-Bag's two BN biases, whose gradient the seg head's BN cancels, are frozen (PIDNet.__init__).
In the forward: the 1/8 size is that of the layer2 output (the official code takes input // 8, which breaks on sizes
that are not multiples of 8); the auxiliary heads see the ReLU of the P and D features, which is what the official
in-place ReLUs hand them; the seg heads are nn.Sequential (keys differ from the official segmenthead's, which no
ImageNet file holds).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtda.config import ConfigError
from rtda.models.base import SegmentationModel, SegOutput, freeze_bn_affine
from rtda.models.ddrnet import BasicBlock, Bottleneck, make_stage, stem
from rtda.models.grid import upsample
from rtda.models.losses import pixel_cross_entropy
from rtda.models.pidnet_parts import PAPPM, LightBag, PagFM, conv_bn, seg_head

# width of each variant (models/pidnet.py get_seg_model): planes, PPM branch planes, seg head planes
VARIANTS = {"pidnet_s": (32, 96, 128), "pidnet_m": (64, 96, 128)}
BOUNDARY_WEIGHT = 20.0  # utils/criterion.py BondaryLoss(coeff_bce=20.0)
BOUNDARY_AWARE_WEIGHT = 1.0  # configs/cityscapes/pidnet_*_cityscapes.yaml LOSS.SB_WEIGHTS
BOUNDARY_THRESHOLD = 0.8  # utils/utils.py FullModel: sigmoid(boundary) > 0.8
EDGE_BORDER, EDGE_KERNEL = 6, 4  # datasets/base_dataset.py: y_k_size = x_k_size = 6, edge_size = 4
IGNORE = 255


class PIDNetBackbone(nn.Module):
    """The part of PIDNet the authors' ImageNet files hold, under the official names: the I branch through layer5
    and the P branch with its two Pag fusions (the D branch, PAPPM and Bag are trained from scratch)."""

    def __init__(self, planes: int):
        super().__init__()
        self.conv1 = stem(planes)
        self.layer1 = make_stage(BasicBlock, planes, planes, 2)
        self.layer2 = make_stage(BasicBlock, planes, planes * 2, 2, stride=2)
        self.layer3 = make_stage(BasicBlock, planes * 2, planes * 4, 3, stride=2)
        self.layer4 = make_stage(BasicBlock, planes * 4, planes * 8, 3, stride=2)
        self.layer5 = make_stage(Bottleneck, planes * 8, planes * 8, 2, stride=2)
        self.compression3 = conv_bn(planes * 4, planes * 2, 1)
        self.compression4 = conv_bn(planes * 8, planes * 2, 1)
        self.pag3 = PagFM(planes * 2, planes)
        self.pag4 = PagFM(planes * 2, planes)
        self.layer3_ = make_stage(BasicBlock, planes * 2, planes * 2, 2)
        self.layer4_ = make_stage(BasicBlock, planes * 2, planes * 2, 2)
        self.layer5_ = make_stage(Bottleneck, planes * 2, planes * 2, 1)


class PIDNet(SegmentationModel):
    # the deepest I-branch stage, before the PPM (DAFormer's ImageNet feature distance)
    bottleneck_stage = "backbone.layer5"

    def __init__(self, variant: str = "pidnet_s", num_classes: int = 19, freeze_bn: bool = False,
                 input_norm: str = "imagenet"):
        super().__init__(input_norm)
        planes, ppm_planes, head_planes = VARIANTS[variant]
        self.backbone = PIDNetBackbone(planes)
        # D branch (m = 2: one BasicBlock and one Bottleneck), the PPM and the fusion
        self.layer3_d = BasicBlock(planes * 2, planes, downsample=conv_bn(planes * 2, planes, 1), relu_out=False)
        self.layer4_d = make_stage(Bottleneck, planes, planes, 1)
        self.layer5_d = make_stage(Bottleneck, planes * 2, planes * 2, 1)
        self.diff3 = conv_bn(planes * 4, planes, 3)
        self.diff4 = conv_bn(planes * 8, planes * 2, 3)
        self.spp = PAPPM(planes * 16, ppm_planes, planes * 4)
        self.dfm = LightBag(planes * 4, planes * 4)
        self.final_layer = seg_head(planes * 4, head_planes, num_classes)
        # class logits first (multi-level methods read the first), then the 1-channel boundary map
        self.aux_heads = nn.ModuleDict({"p_branch": seg_head(planes * 2, head_planes, num_classes),
                                        "boundary": seg_head(planes * 2, planes, 1)})
        for m in self.modules():  # the official initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
        # Light-Bag's two BN biases add a per-channel constant to its sum, which the seg head's train-mode BN removes:
        # no gradient ever reaches them (in the official network too, where only weight decay moves them, which no
        # output can see). Frozen, so no parameter silently gets nothing.
        for bn in (self.dfm.conv_p[1], self.dfm.conv_i[1]):
            bn.bias.requires_grad_(False)
        if freeze_bn:
            freeze_bn_affine(self.backbone)

    def forward_logits(self, x, with_aux):
        b = self.backbone
        x = F.relu(b.layer2(F.relu(b.layer1(b.conv1(x)))))
        size = x.shape[-2:]  # 1/8: where the P and D branches live
        p, d = b.layer3_(x), self.layer3_d(x)
        x = F.relu(b.layer3(x))
        p = F.relu(b.pag3(p, b.compression3(x)))
        d = F.relu(d + _resize(self.diff3(x), size))
        aux_p = p
        x = F.relu(b.layer4(x))
        p, d = b.layer4_(p), self.layer4_d(d)
        p = F.relu(b.pag4(p, b.compression4(x)))
        d = F.relu(d + _resize(self.diff4(x), size))
        aux_d = d
        p, d = b.layer5_(p), self.layer5_d(d)
        x = _resize(self.spp(b.layer5(x)), size)
        logits = self.final_layer(self.dfm(p, x, d))
        aux = {}
        if with_aux:
            aux = {"p_branch": self.aux_heads["p_branch"](aux_p), "boundary": self.aux_heads["boundary"](aux_d)}
        return logits, aux

    def supervised_loss(self, output: SegOutput, label: torch.Tensor,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
        """PIDNet's training loss (module docstring): OHEM CE of the main logits, `aux_weight` x CE of the P
        branch (mean over all pixels), 20 x balanced BCE of the boundary head against `boundary_target(label)`,
        OHEM CE of the main logits where sigmoid(boundary) > 0.8. With `weight`, every term is weighted per pixel."""
        grid, size = output.align_corners, label.shape[-2:]
        logits = upsample(output.logits, size, grid)
        boundary = upsample(output.aux["boundary"], size, grid)[:, 0].float()
        every_pixel = torch.ones(label.shape, device=label.device) if weight is None else weight
        loss = pixel_cross_entropy(logits, label, grid, weight, self.ohem)
        loss = loss + self.aux_weight * pixel_cross_entropy(output.aux["p_branch"], label, grid, every_pixel)
        loss = loss + BOUNDARY_WEIGHT * balanced_bce(boundary, boundary_target(label), weight)
        on_boundary = torch.where(torch.sigmoid(boundary) > BOUNDARY_THRESHOLD, label, torch.full_like(label, IGNORE))
        if weight is None and self.ohem is None:  # plain CE: the mean over the boundary pixels, 0 (not NaN) if none
            ce = F.cross_entropy(logits.float(), on_boundary, ignore_index=IGNORE, reduction="sum")
            return loss + BOUNDARY_AWARE_WEIGHT * ce / (on_boundary != IGNORE).sum().clamp(min=1)
        return loss + BOUNDARY_AWARE_WEIGHT * pixel_cross_entropy(logits, on_boundary, grid, weight, self.ohem)

    @staticmethod
    def convert_pretrained(state: dict, path: str) -> dict:
        return convert_imagenet(state, path)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    # feature maps inside the network: bilinear, align_corners False (the official `algc`)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def boundary_target(label: torch.Tensor) -> torch.Tensor:
    """The official edge target of a label [B, H, W] (module docstring), as float 0/1 [B, H, W] on its device:
    thin edges where a pixel's label differs from its right or lower neighbour (255 is a label like any other),
    none within 6 pixels of the border, dilated by a 4x4 square (offsets -2..+1, as cv2.dilate anchors it)."""
    thin = torch.zeros(label.shape, dtype=torch.bool, device=label.device)
    thin[:, :, :-1] |= label[:, :, :-1] != label[:, :, 1:]
    thin[:, :-1, :] |= label[:, :-1, :] != label[:, 1:, :]
    inner = torch.zeros_like(thin)
    inner[:, EDGE_BORDER:-EDGE_BORDER, EDGE_BORDER:-EDGE_BORDER] = True
    edges = (thin & inner).float().unsqueeze(1)
    before, after = EDGE_KERNEL // 2, EDGE_KERNEL - 1 - EDGE_KERNEL // 2
    return F.max_pool2d(F.pad(edges, (before, after, before, after)), EDGE_KERNEL, stride=1).squeeze(1)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """utils/criterion.py weighted_bce: BCE with logits, each positive pixel weighted by the share of negatives in
    the batch and each negative by the share of positives, mean over all pixels (times `weight` per pixel)."""
    positives = target.sum()
    share_pos = positives / target.numel()
    balance = torch.where(target > 0.5, 1 - share_pos, share_pos)
    if weight is not None:
        balance = balance * weight
    return F.binary_cross_entropy_with_logits(logits, target, balance)


# The ImageNet classifier of the authors' files (PIDNet_S/M_ImageNet.pth.tar), which no segmentation model uses:
# get_seg_model keeps only the keys whose names and shapes the segmentation model has.
IMAGENET_CLASSIFIER = ("down5.", "last_layer.", "linear.")
_SIGNATURE = "pag3.f_x.0.weight"  # a key only a PIDNet trunk has


def convert_imagenet(state: dict, path: str) -> dict:
    """The authors' ImageNet file -> `PIDNetBackbone` keys: the same names (a `module.` prefix dropped, as a
    DataParallel save would add), the classifier dropped. A file that is no PIDNet ImageNet file is one
    ConfigError; a PIDNet of another width fails the shape check of load_backbone_weights."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if _SIGNATURE not in state:
        example = next(iter(state), "nothing")
        raise ConfigError(f"model.pretrained = {path}: holds {len(state)} tensors like {example!r}, which is not a "
                          f"PIDNet ImageNet checkpoint (PIDNet_S_ImageNet.pth.tar / PIDNet_M_ImageNet.pth.tar)")
    return {k: v for k, v in state.items() if not k.startswith(IMAGENET_CLASSIFIER)}
