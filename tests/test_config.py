"""The config system: defaults, one-level _base_, overrides, strictness, the YAML round trip and the key roles."""
import json

import pytest

from rtda.config import (
    AUGMENTATIONS,
    KEY_ROLES,
    NOT_RESULT_KEYS,
    RANGES,
    RESUME_FREE_KEYS,
    ROLES,
    STRUCTURE_KEYS,
    Config,
    ConfigError,
    dump_config,
    flatten,
    from_dict,
    learning_differences,
    load_config,
    to_dict,
)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def leaf(tmp_path):
    write(tmp_path / "_base_" / "data.yaml", "data:\n  source: {name: gta5, root: /d/GTA5, size: [1280, 720]}\n")
    write(tmp_path / "_base_" / "schedule.yaml", "train:\n  lr: 2.5e-4\n  epochs: 50\n")
    return write(tmp_path / "exp.yaml",
                 "_base_: [_base_/data.yaml, _base_/schedule.yaml]\ntrain:\n  epochs: 3\nmodel: {name: deeplabv2}\n")


def test_defaults_bases_and_leaf(leaf):
    cfg = load_config(leaf)
    assert cfg.name == "exp"
    assert cfg.data.source.root == "/d/GTA5" and cfg.data.source.size == [1280, 720]
    assert cfg.train.lr == 2.5e-4  # PyYAML reads `2.5e-4` as a string; the schema makes it a float
    assert cfg.train.epochs == 3  # the leaf wins over its base
    assert cfg.model.name == "deeplabv2" and cfg.model.backbone == "resnet18"  # untouched keys keep defaults
    assert cfg.data.source.split == "train"  # a partial section merges into the defaults


def test_overrides_use_dotted_names(leaf):
    cfg = load_config(leaf, ["train.lr=1e-3", "adapt.name=fda", "data.source.size=[64, 32]", "train.iters=null"])
    assert cfg.train.lr == 1e-3 and cfg.adapt.name == "fda"
    assert cfg.data.source.size == [64, 32] and cfg.train.iters is None


def test_a_file_read_again_gives_its_current_content_and_no_earlier_override(leaf):
    """The parsed YAML is cached by content: an override or merge never reaches the cache, an edit always does."""
    assert load_config(leaf, ["data.source.size=[64, 32]", "train.epochs=7"]).train.epochs == 7
    again = load_config(leaf)
    assert again.train.epochs == 3 and again.data.source.size == [1280, 720]
    write(leaf.parent / "_base_" / "data.yaml", "data:\n  source: {name: gta5, root: /d/GTA5, size: [640, 360]}\n")
    assert load_config(leaf).data.source.size == [640, 360]


@pytest.mark.parametrize("override, words", [
    ("train.lrr=1", ["unknown key `train.lrr`", "did you mean `train.lr`"]),
    ("trian.lr=1", ["unknown key `trian`", "did you mean `train`"]),
    ("train.lr=fast", ["`train.lr` = 'fast'", "expected float"]),
    ("train.epochs=2.5", ["`train.epochs` = 2.5", "expected int"]),
    ("model.name=bisnet", ["`model.name` = 'bisnet'", "did you mean 'bisenet'"]),
    ("train.amp=fp8", ["`train.amp`", "'bf16', 'fp16', 'none'"]),
    ("data.source.size=[1, x]", ["`data.source.size[1]` = 'x'", "expected int"]),
    ("train.lr", ["expected section.key=value"]),
])
def test_bad_values_name_key_value_and_expectation(leaf, override, words):
    with pytest.raises(ConfigError) as info:
        load_config(leaf, [override])
    message = str(info.value)
    assert str(leaf) in message or "override" in message
    for word in words:
        assert word in message


def test_nested_base_is_refused(tmp_path):
    write(tmp_path / "a.yaml", "_base_: [b.yaml]\n")
    write(tmp_path / "b.yaml", "_base_: [c.yaml]\n")
    with pytest.raises(ConfigError, match="one level only"):
        load_config(tmp_path / "a.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "train: [1,\n"))


def test_dump_and_load_round_trip(leaf, tmp_path):
    cfg = load_config(leaf, ["adapt.name=dacs", "train.iters=7"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_from_dict_defaults_equal_dataclass_defaults():
    assert from_dict({}) == Config()


# The three key sets as rtda/config.py wrote them by hand before the roles moved onto the schema.
RESUME_FREE_BEFORE = {"name", "train.amp", "train.workers", "train.log_interval", "train.checkpoint_interval",
                      "train.eval_interval", "train.vis_images", "train.max_wall_time", "train.keep_every",
                      "eval.batch_size", "data.source.root", "data.target.root", "data.val.root", "data.cache"}
NOT_RESULT_BEFORE = {"seed", "name", "train.workers", "train.log_interval", "train.checkpoint_interval",
                     "train.vis_images", "data.source.root", "data.target.root", "data.val.root", "data.cache"}
STRUCTURE_BEFORE = {"model.name", "model.backbone", "model.num_classes", "model.aux_head", "model.aspp_dilations",
                    "model.resnet_variant", "adapt.name", "adapt.multi_level", "adapt.discriminator"}


# Free keys the hand-written NOT_RESULT_KEYS lacked: runs differing only in them became separate table rows.
NOT_RESULT_FIXED = {"train.eval_interval", "train.max_wall_time", "train.keep_every", "eval.batch_size"}


def test_key_sets_derived_from_the_schema_roles_equal_the_hand_written_ones():
    assert set(RESUME_FREE_KEYS) == RESUME_FREE_BEFORE
    assert set(NOT_RESULT_KEYS) == NOT_RESULT_BEFORE | NOT_RESULT_FIXED
    assert set(STRUCTURE_KEYS) == STRUCTURE_BEFORE
    for keys in (RESUME_FREE_KEYS, NOT_RESULT_KEYS, STRUCTURE_KEYS):
        assert len(set(keys)) == len(keys)


def test_every_key_has_a_known_role_and_sections_have_none():
    assert set(KEY_ROLES) == set(flatten(to_dict(Config())))
    assert set(KEY_ROLES.values()) <= set(ROLES)
    assert KEY_ROLES["train.lr"] == "learning" and KEY_ROLES["seed"] == "seed"


def test_a_resume_may_change_only_free_and_machine_keys():
    old = to_dict(Config())
    new = to_dict(from_dict({"train": {"amp": "none", "workers": 0}, "data": {"cache": "/kaggle/working/cache"},
                             "seed": 1, "model": {"name": "deeplabv2"}}))
    assert learning_differences(old, new) == {"seed": (0, 1), "model.name": ("bisenet", "deeplabv2")}


def test_augmentations_are_the_marked_augment_fields_in_declaration_order():
    assert AUGMENTATIONS == ("hflip", "scale_crop", "color_jitter", "blur", "brightness", "noise", "grayscale")
    assert all(RANGES[f"data.augment.{name}"] == "[0, 1]" for name in AUGMENTATIONS)
    with pytest.raises(ConfigError, match=r"`data.augment.noise` = 1.5 is out of range"):
        from_dict({"data": {"augment": {"noise": 1.5}}})


@pytest.mark.parametrize("section, key, value", [("train", "eval_interval", 500), ("train", "max_wall_time", "3h"),
                                                 ("train", "keep_every", 100), ("eval", "batch_size", 4)])
def test_runs_differing_only_in_a_free_key_are_one_table_row(tmp_path, section, key, value):
    from rtda import bench

    classes = ["road", "sidewalk"]
    for seed, raw in enumerate([{}, {section: {key: value}}]):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        config = to_dict(from_dict({**raw, "seed": seed, "data": {"source": {"name": "gta5"}}}))
        (run / "metrics.json").write_text(json.dumps({"config": config, "classes": classes,
                                                      "final": {"mIoU": 30.0 + seed, "IoU": {"road": 80.0}}}))
    runs, problems = bench.find_runs([tmp_path])
    assert len(runs) == 2 and not problems
    (table,) = bench.build_tables(runs, "domain-shift")
    (row,) = table.rows
    assert row[1] == 2  # both runs, as two seeds of one config
