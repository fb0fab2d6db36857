"""Config keys as flat dotted names, and the role each key plays for a resume and for the result tables."""
from __future__ import annotations

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

