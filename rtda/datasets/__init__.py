"""Data sets of a run: the labelled source, the unlabelled target and the labelled val set.

    source = build_dataset(cfg.data.source, cfg, "source")   # labels + cfg.data.augment
    target = build_dataset(cfg.data.target, cfg, "target")   # images only (or pseudo-labels)
    val    = build_dataset(cfg.data.val, cfg, "val")         # labels; full size when eval.label_size = full

    source.check_files()                                     # pre-flight: headers of every file, seconds

`DATASETS` is a plain dict name -> builder(ds_cfg, cfg, role). The label form of each set is detected from its
files (`data.<role>.label_form` overrides it), and a prepared cache in `data.cache` is read where it matches.
`synthetic` generates the two synthetic domains on first use and reads them with the real loaders, so the code
that runs on the real data sets is what runs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from rtda.config import Config, ConfigError, DatasetConfig
from rtda.datasets.cityscapes import CityscapesDataset
from rtda.datasets.gta5 import GTA5Dataset
from rtda.datasets.io import DatasetError
from rtda.datasets.transforms import build_augment

ROLES = ("source", "target", "val")

__all__ = ["DATASETS", "ROLES", "CityscapesDataset", "DatasetError", "GTA5Dataset", "build_dataset"]


def build_dataset(ds_cfg: DatasetConfig, cfg: Config, role: str):
    """The data set of `ds_cfg` in `role` (source | target | val); see the module docstring."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    size = ds_cfg.size
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"data.{role}.size = {size}: expected [width, height], two positive ints")
    dataset = DATASETS[ds_cfg.name](ds_cfg, cfg, role)
    if role == "source" and cfg.data.rcs.enabled:  # DAFormer's rare class sampling (datasets/rare_class.py)
        from rtda.datasets.rare_class import rare_class_sampling

        dataset = rare_class_sampling(dataset, cfg)
    return dataset



def _cityscapes(ds_cfg: DatasetConfig, cfg: Config, role: str) -> CityscapesDataset:
    return CityscapesDataset(
        ds_cfg.root, ds_cfg.split, ds_cfg.size,
        labels=role != "target" or ds_cfg.pseudo_labels is not None,
        augment=build_augment(cfg.data.augment) if role == "source" else None,
        full_labels=role == "val" and cfg.eval.label_size == "full",
        pseudo_labels=ds_cfg.pseudo_labels, seed=cfg.seed, label_form=ds_cfg.label_form, cache=cfg.data.cache,
        label_form_key=f"data.{role}.label_form", interpolation=ds_cfg.interpolation)


def _gta5(ds_cfg: DatasetConfig, cfg: Config, role: str) -> GTA5Dataset:
    if role == "val" and cfg.eval.label_size == "full":
        raise ConfigError("eval.label_size = 'full' needs a Cityscapes-layout val set; GTA5 label maps vary in size")
    if ds_cfg.pseudo_labels is not None:
        raise ConfigError(f"data.{role}.pseudo_labels is for Cityscapes-layout sets, not GTA5")
    return GTA5Dataset(
        ds_cfg.root, ds_cfg.size, list_file=ds_cfg.list_file,
        augment=build_augment(cfg.data.augment) if role == "source" else None,
        seed=cfg.seed, labels=role != "target", label_form=ds_cfg.label_form, cache=cfg.data.cache,
        label_form_key=f"data.{role}.label_form", interpolation=ds_cfg.interpolation)


def _synthetic(ds_cfg: DatasetConfig, cfg: Config, role: str):
    from rtda.datasets import synthetic  # imported on use: the real-data paths need nothing from it

    root = Path(synthetic.ensure_generated(ds_cfg.root, cfg.data.synthetic))
    # The source domain is laid out like GTA5 (no split folders), the target like Cityscapes.
    if ds_cfg.domain == "source":
        return _gta5(dataclasses.replace(ds_cfg, root=str(root / "GTA5")), cfg, role)
    return _cityscapes(dataclasses.replace(ds_cfg, root=str(root / "Cityscapes")), cfg, role)


DATASETS = {"gta5": _gta5, "cityscapes": _cityscapes, "synthetic": _synthetic}
