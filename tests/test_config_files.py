"""Every YAML under configs/ loads, and the protocol configs carry the protocol's settings."""
from __future__ import annotations

import typing
from pathlib import Path

import pytest

from rtda.adapt import STRATEGIES
from rtda.config import AdaptConfig, DatasetConfig, ModelConfig, load_config
from rtda.datasets import DATASETS
from rtda.models import MODELS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LEAVES = sorted(p for p in CONFIGS.rglob("*.yaml") if "_base_" not in p.parts)
BASES = sorted((CONFIGS / "_base_").glob("*.yaml"))


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.adapt.name in STRATEGIES
    assert cfg.model.num_classes == 19


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.name)
def test_every_base_file_is_a_valid_partial_config(path):
    load_config(path)  # a base file alone must also fit the schema (unknown keys are errors)


def test_configs_exist():
    names = {p.relative_to(CONFIGS).as_posix() for p in LEAVES}
    assert {"cityscapes_deeplabv2.yaml", "cityscapes_bisenet.yaml", "gta5_bisenet.yaml", "gta5_bisenet_aug.yaml",
            "synthetic/gta5_bisenet.yaml", "synthetic/gta5_bisenet_aug.yaml", "synthetic/oracle_bisenet.yaml"} <= names


def test_protocol_settings():
    for name in ("cityscapes_deeplabv2", "cityscapes_bisenet", "gta5_bisenet", "gta5_bisenet_aug"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.train.epochs == 50 and cfg.train.iters is None, name
        assert cfg.data.val.name == "cityscapes" and cfg.data.val.split == "val" and cfg.data.val.size == [1024, 512]
        assert cfg.model.pretrained == "imagenet" and cfg.train.poly_power == 0.9, name
        expected_source = [1280, 720] if name.startswith("gta5") else [1024, 512]
        assert cfg.data.source.size == expected_source, name

    deeplab = load_config(CONFIGS / "cityscapes_deeplabv2.yaml")
    assert (deeplab.model.name, deeplab.model.backbone, deeplab.model.freeze_bn) == ("deeplabv2", "resnet101", True)
    assert (deeplab.train.optimizer, deeplab.train.lr, deeplab.train.momentum, deeplab.train.weight_decay,
            deeplab.train.head_lr_mult) == ("sgd", 2.5e-4, 0.9, 5e-4, 10.0)
    # torchvision ImageNet weights: the v1.5 bottleneck and ImageNet normalisation (caffe/v1 only for caffe weights)
    assert (deeplab.model.resnet_variant, deeplab.model.input_norm) == ("v1.5", "imagenet")

    bisenet = load_config(CONFIGS / "gta5_bisenet.yaml")
    assert (bisenet.model.name, bisenet.model.backbone) == ("bisenet", "resnet18")
    assert (bisenet.train.optimizer, bisenet.train.lr, bisenet.train.momentum, bisenet.train.weight_decay) == \
        ("sgd", 2.5e-2, 0.9, 1e-4)
    assert bisenet.data.augment.hflip == 0 and bisenet.adapt.name == "none"

    augmented = load_config(CONFIGS / "gta5_bisenet_aug.yaml")
    probabilities = {k: v for k, v in vars(augmented.data.augment).items() if not isinstance(v, list) and v > 0
                     and k in ("hflip", "scale_crop", "color_jitter", "blur", "brightness", "noise", "grayscale")}
    assert probabilities and set(probabilities.values()) == {0.5}


def test_synthetic_configs_share_one_generated_root():
    """Configs reading the same synthetic root must ask for the same generated data, or loading fails."""
    settings = {}
    for path in LEAVES:
        cfg = load_config(path)
        for ds in (cfg.data.source, cfg.data.target, cfg.data.val):
            if ds.name == "synthetic":
                settings.setdefault(ds.root, {})[path.name] = vars(cfg.data.synthetic)
    assert settings, "no synthetic configs found"
    for root, by_config in settings.items():
        first = next(iter(by_config.values()))
        assert all(s == first for s in by_config.values()), f"{root}: data.synthetic differs between configs"


@pytest.mark.parametrize("schema, table", [(AdaptConfig, STRATEGIES), (ModelConfig, MODELS), (DatasetConfig, DATASETS)],
                         ids=["adapt.name", "model.name", "data.*.name"])
def test_the_schema_names_exactly_what_the_component_tables_build(schema, table):
    # The schema lists the names so that a typo fails when the config loads, before any data is read; a new
    # strategy, model or data set adds its name there too (docs/architecture.md, checklists).
    names = set(typing.get_args(typing.get_type_hints(schema)["name"]))
    assert names == set(table), f"{schema.__name__}.name lists {sorted(names)}; the table builds {sorted(table)}"
