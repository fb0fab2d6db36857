"""Run configuration: typed dataclass defaults <- YAML file (+ one level of `_base_`) <- `key=value` overrides.

    cfg = load_config("configs/gta5_bisenet_adv.yaml", ["train.lr=1e-3", "adapt.lambda_adv=0.002"])
    cfg.train.lr, cfg.data.source.size, cfg.adapt.name

Strict by construction: an unknown key is an error that names the key and the nearest valid one, a value
of the wrong type names the key, the value and the type expected, and a choice outside its `Literal`
names the allowed values. `dump_config` writes YAML that `load_config` reads back to an equal object.

    schema.py  the dataclasses (each key's default, type and role)
    load.py    reading, overrides, validation, value ranges, writing
    keys.py    dotted key names, and the key sets a resume and the result tables use (from the roles)
"""
from rtda.config.keys import (
    KEY_ROLES,
    NOT_RESULT_KEYS,
    RESUME_FREE_KEYS,
    STRUCTURE_KEYS,
    flatten,
    learning_differences,
)
from rtda.config.load import (
    RANGES,
    ConfigError,
    check_ranges,
    dump_config,
    from_dict,
    load_config,
    parse_duration,
    to_dict,
)
from rtda.config.schema import (
    AUGMENTATIONS,
    ROLES,
    AdaptConfig,
    AugmentConfig,
    Config,
    DataConfig,
    DatasetConfig,
    EvalConfig,
    ModelConfig,
    RareClassConfig,
    SyntheticConfig,
    TeacherConfig,
    TrainConfig,
    TTAConfig,
)

__all__ = [
    "AUGMENTATIONS", "KEY_ROLES", "NOT_RESULT_KEYS", "RANGES", "RESUME_FREE_KEYS", "ROLES", "STRUCTURE_KEYS",
    "AdaptConfig", "AugmentConfig", "Config", "ConfigError", "DataConfig", "DatasetConfig", "EvalConfig",
    "ModelConfig", "RareClassConfig", "SyntheticConfig", "TTAConfig", "TeacherConfig", "TrainConfig",
    "check_ranges", "dump_config", "flatten", "from_dict", "learning_differences", "load_config",
    "parse_duration", "to_dict",
]
