"""Every network of the zoo under the model contract: every strategy trains it for two iterations, the supervised
loss reaches every parameter, and its deploy form and ONNX file compute what the eval-mode model computes.

Parametrised over `rtda.models.MODELS`, so a new network is covered the moment it is registered. DeepLabV2
(ResNet-101) is left to test_models/test_adapt/test_sota, which run it already and would cost minutes here.
"""
from __future__ import annotations

import pytest
import torch

from rtda import adapt
from rtda.config import from_dict
from rtda.models import MODELS, build_model, deploy

from test_adapt import FakeContext
from test_distill import write_teacher

ZOO = sorted(set(MODELS) - {"deeplabv2"})
C, H, W = 5, 32, 64
# each strategy with the parts that touch the network: multi-level discriminators on the first aux output, FDA's
# entropy and its self-supervised round, DACS's teacher, DAFormer's feature distance, MIC's masked images, and a
# frozen teacher's labels and KL with ClassMix
STRATEGIES = {
    "none": {"name": "none"},
    "adversarial_multi": {"name": "adversarial", "multi_level": True},
    "advent": {"name": "advent"},
    "minent": {"name": "minent"},
    "fda": {"name": "fda", "beta": 0.09},
    "fda_ssl": {"name": "fda", "beta": 0.09},
    "dacs": {"name": "dacs"},
    "daformer_dacs": {"name": "dacs", "fd_lambda": 0.005, "fd_classes": [1, 2],
                      "pseudo_ignore_top": 8, "pseudo_ignore_bottom": 8},
    "mic": {"name": "mic"},
    "distill": {"name": "distill", "mix": True},  # the teacher: `zoo_teacher`'s
}


def zoo_cfg(net: str, case: str, teacher: tuple | None = None):
    keys = dict(STRATEGIES[case])
    if case == "distill":
        keys["teacher"] = {"config": str(teacher[0]), "checkpoint": str(teacher[1])}
    if case == "daformer_dacs" and not has_imagenet_features(net):
        keys.pop("fd_lambda"), keys.pop("fd_classes")  # trained from scratch: no ImageNet features to keep
    data = {"source": {"size": [W, H]}, "target": {"size": [W, H]}}
    if case == "fda_ssl":
        data["target"]["pseudo_labels"] = "pseudo"  # the step reads the target batch's labels
    return from_dict({"model": {"name": net, "num_classes": C}, "adapt": keys, "data": data})


def has_imagenet_features(net: str) -> bool:
    return build_model({"name": net, "num_classes": C}).bottleneck_stage is not None


def batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    source = {"image": torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8, generator=g),
              "label": torch.randint(0, C, (2, H, W), generator=g)}
    source["label"][:, :4] = 255
    target = {"image": torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8, generator=g),
              "label": torch.randint(0, C, (2, H, W), generator=g)}
    return source, target


@pytest.fixture(scope="module")
def zoo_teacher(tmp_path_factory):
    """A frozen BiSeNet-R18 teacher (untrained, target read at the students' size) for the distill case."""
    return write_teacher(tmp_path_factory.mktemp("teacher"), classes=C, size=(W, H))


@pytest.mark.parametrize("case", list(STRATEGIES))
@pytest.mark.parametrize("net", ZOO)
def test_every_strategy_trains_every_network_for_two_iterations(net, case, request):
    torch.manual_seed(0)
    cfg = zoo_cfg(net, case, request.getfixturevalue("zoo_teacher") if case == "distill" else None)
    model = build_model(cfg.model).train()
    strategy = adapt.build_strategy(cfg, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for iteration in range(2):
        ctx = FakeContext(iteration=iteration)
        optimizer.zero_grad(set_to_none=True)
        losses = strategy.training_step(model, *batches(iteration), ctx)
        optimizer.step()
        strategy.after_step(model, ctx)
        assert losses and all(torch.isfinite(v).all() for v in losses.values()), (net, case, losses)
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("net", ZOO)
def test_the_supervised_loss_reaches_every_parameter_and_the_first_aux_output_is_class_logits(net):
    """DDP needs every trainable parameter in each backward; multi-level methods read the first aux output."""
    torch.manual_seed(0)
    model = build_model({"name": net, "num_classes": C}).train()
    # 256x256: at 64x64 a stride-64 stage (DDRNet's and PIDNet's layer5) is 1x1, where the training-mode BNs
    # opening the pyramid pooling cancel the biases before them exactly; from a 4x4 map on, the zero-padded
    # average pools pass them a gradient
    g = torch.Generator().manual_seed(0)
    source = {"image": torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=g),
              "label": torch.randint(0, C, (2, 256, 256), generator=g)}
    output = model(source["image"])
    assert output.logits.shape[:2] == (2, C) and output.aux
    assert next(iter(output.aux.values())).shape[:2] == (2, C)
    loss = adapt.losses.segmentation_loss(model, output, source["label"])
    loss.backward()
    missed = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missed, f"{net}: no gradient reaches {missed[:5]}"


@pytest.mark.parametrize("net", ZOO)
def test_eval_output_is_full_size_logits_at_any_size_and_the_deploy_form_agrees(net):
    torch.manual_seed(0)
    model = build_model({"name": net, "num_classes": C})
    with torch.no_grad():  # a few training batches give the BN layers statistics that are not the identity
        for seed in range(2):
            model(batches(seed)[0]["image"])
    model.eval()
    image = torch.randint(0, 256, (1, 3, 72, 88), dtype=torch.uint8).float()
    with torch.no_grad():
        logits, fast = model(image), deploy(model)(image)
    assert logits.shape == (1, C, 72, 88)
    assert torch.allclose(fast, logits, atol=1e-3, rtol=1e-3), (fast - logits).abs().max()


@pytest.mark.parametrize("net", ZOO)
def test_the_onnx_file_of_every_network_computes_what_pytorch_does(net, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from rtda.models.export import OnnxModel, export_onnx, parity

    torch.manual_seed(0)
    model = build_model({"name": net, "num_classes": C})
    # BN statistics from a few batches, as in the deploy test: with the fresh identity statistics a deep network
    # (PIDNet-S: logits ~150) is 4e-3 off its own float64 result in float32 eager, above the absolute 1e-3 below
    with torch.no_grad():
        for seed in range(2):
            model(batches(seed)[0]["image"])
    model.eval()
    export_onnx(deploy(model), tmp_path / f"{net}.onnx", (H, W))
    image = torch.randint(0, 256, (1, 3, H, W), dtype=torch.uint8).float()
    with torch.no_grad():
        result = parity(model(image), OnnxModel(tmp_path / f"{net}.onnx")(image))
    assert result["max_abs_diff"] < 1e-3 and result["argmax_agreement"] > 0.999, result
