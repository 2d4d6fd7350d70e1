import dataclasses

import pytest
import yaml

from mbv2train.config import Config, ModelConfig, describe_settings, load_config
from mbv2train.errors import ConfigError


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model == ModelConfig(width_mult=1.0, dropout=0.2, num_classes=None, round_nearest=8)


def test_file_values_are_read_and_missing_keys_keep_defaults(write_yaml):
    cfg = load_config(write_yaml("model:\n  width_mult: 0.75\n"))
    assert cfg.model.width_mult == 0.75
    assert cfg.model.dropout == 0.2


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config(None).model.width_mult = 2.0


def test_integer_widens_to_float_and_exponent_notation_is_a_number(write_yaml):
    cfg = load_config(write_yaml("model:\n  width_mult: 1\n  dropout: 1e-1\n"))
    assert cfg.model.width_mult == 1.0 and isinstance(cfg.model.width_mult, float)
    assert cfg.model.dropout == 0.1


def test_empty_file_and_empty_section_mean_defaults(write_yaml):
    assert load_config(write_yaml("")) == Config()
    assert load_config(write_yaml("model:\n")) == Config()


def test_overrides_apply_after_the_file_and_parse_as_yaml(write_yaml):
    path = write_yaml("model:\n  width_mult: 0.5\n  num_classes: 10\n")
    cfg = load_config(path, ["model.width_mult=1.4", "model.dropout=0", "model.num_classes=100"])
    assert cfg.model == ModelConfig(width_mult=1.4, dropout=0.0, num_classes=100)


def test_last_override_wins():
    assert load_config(None, ["model.num_classes=5", "model.num_classes=6"]).model.num_classes == 6


def test_to_dict_round_trips_through_yaml(write_yaml):
    cfg = load_config(None, ["model.width_mult=0.35"])
    again = load_config(write_yaml(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


def test_every_setting_has_help_text():
    rows = describe_settings()
    assert {r["key"] for r in rows} >= {"model.width_mult", "model.dropout", "model.num_classes"}
    assert all(r["help"] for r in rows)


# Each bad config: (file text, fragments the one-line message must contain).
BAD_FILES = {
    "invalid_yaml": ("model:\n  width_mult: [1.0\n", ["invalid YAML", "line"]),
    "tab_indent": ("model:\n\twidth_mult: 1.0\n", ["invalid YAML"]),
    "top_level_list": ("- model\n- data\n", ["top level must be a mapping"]),
    "top_level_scalar": ("1.0\n", ["top level must be a mapping"]),
    "unknown_section": ("modle:\n  width_mult: 1.0\n", ["unknown section 'modle'", "did you mean 'model'"]),
    "unknown_key": ("model:\n  width_mul: 1.0\n", ["unknown key 'model.width_mul'", "did you mean 'model.width_mult'"]),
    "unknown_key_far_from_any": ("model:\n  colour: red\n", ["unknown key 'model.colour'", "valid: model.width_mult"]),
    "section_not_mapping": ("model: 5\n", ["section 'model' must be a mapping"]),
    "width_string": ("model:\n  width_mult: wide\n", ["model.width_mult", "expected a number", "'wide'"]),
    "width_zero": ("model:\n  width_mult: 0\n", ["model.width_mult", "must be > 0", "0.0"]),
    "width_negative": ("model:\n  width_mult: -1.0\n", ["model.width_mult", "must be > 0"]),
    "width_nan": ("model:\n  width_mult: .nan\n", ["model.width_mult", "finite"]),
    "width_list": ("model:\n  width_mult: [1.0]\n", ["model.width_mult", "expected a number"]),
    "dropout_one": ("model:\n  dropout: 1.0\n", ["model.dropout", "must be < 1"]),
    "dropout_negative": ("model:\n  dropout: -0.1\n", ["model.dropout", "must be >= 0"]),
    "num_classes_zero": ("model:\n  num_classes: 0\n", ["model.num_classes", "must be >= 1"]),
    "num_classes_float": ("model:\n  num_classes: 10.5\n", ["model.num_classes", "expected an integer"]),
    "num_classes_bool": ("model:\n  num_classes: true\n", ["model.num_classes", "expected an integer", "True"]),
    "num_classes_string": ("model:\n  num_classes: ten\n", ["model.num_classes", "expected an integer"]),
    "duplicate_key": ("model:\n  dropout: 0.1\n  dropout: 0.3\n", ["duplicate key 'dropout'", "line 3"]),
}


@pytest.mark.parametrize("text, fragments", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_raises_config_error_naming_file_and_problem(write_yaml, text, fragments):
    path = write_yaml(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("text, fragments", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_exits_2_with_one_line(cli, write_yaml, text, fragments):
    path = write_yaml(text)
    for command in (["config", "show"], ["summary"]):
        result = cli(*command, "--config", path)
        assert result.exit_code == 2
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert all(fragment in lines[0] for fragment in fragments)


BAD_OVERRIDES = {
    "no_equals": ("model.width_mult", ["expected section.key=value"]),
    "no_section": ("width_mult=1.0", ["expected section.key=value"]),
    "too_deep": ("model.width.mult=1.0", ["expected section.key=value"]),
    "unknown_section": ("modle.width_mult=1.0", ["unknown section 'modle'", "did you mean 'model'"]),
    "unknown_key": ("model.dropuot=0.1", ["unknown key 'model.dropuot'", "did you mean 'model.dropout'"]),
    "wrong_type": ("model.width_mult=abc", ["--set model.width_mult=abc", "expected a number"]),
    "empty_value": ("model.dropout=", ["model.dropout", "expected a number"]),
    "out_of_range": ("model.dropout=1.5", ["--set model.dropout=1.5", "must be < 1"]),
    "bad_yaml_value": ("model.width_mult=[1", ["--set model.width_mult=[1", "not valid YAML"]),
}


@pytest.mark.parametrize("item, fragments", BAD_OVERRIDES.values(), ids=BAD_OVERRIDES.keys())
def test_bad_override_exits_2_with_one_line(cli, item, fragments):
    result = cli("config", "show", "--set", item)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def test_missing_file_exits_2_naming_it(cli, tmp_path):
    missing = tmp_path / "nope.yaml"
    result = cli("config", "show", "--config", missing)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: config file not found: {missing}"


def test_unreadable_file_exits_2_naming_it(cli, tmp_path):
    folder = tmp_path / "a_folder.yaml"
    folder.mkdir()
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    for path in (folder, binary):
        result = cli("config", "show", "--config", path)
        assert result.exit_code == 2
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and f"cannot read config file {path}" in lines[0]


def test_override_error_names_the_override_not_the_file(write_yaml):
    path = write_yaml("model:\n  width_mult: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.width_mult=-2"])
    assert str(info.value).startswith("--set model.width_mult=-2: model.width_mult: must be > 0")


def test_config_show_prints_the_resolved_config(cli, write_yaml):
    path = write_yaml("model:\n  width_mult: 0.5\n")
    result = cli("config", "show", "--config", path, "--set", "model.num_classes=10")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["model"] == {"width_mult": 0.5, "dropout": 0.2, "num_classes": 10, "round_nearest": 8,
                              "pretrained": None, "pretrained_ema": False, "pretrained_sha256": None}
    assert shown["train"]["epochs"] == Config().train.epochs


def test_command_line_options_apply_last_and_are_named_in_errors(write_yaml):
    path = write_yaml("model:\n  width_mult: 0.5\n")
    cfg = load_config(path, ["model.width_mult=0.75"], options={"model.width_mult": ("--width-mult", 1.4),
                                                                "model.num_classes": ("--num-classes", None)})
    assert cfg.model.width_mult == 1.4 and cfg.model.num_classes is None
    with pytest.raises(ConfigError, match=r"^--num-classes 0: model.num_classes: must be >= 1, got 0$"):
        load_config(path, options={"model.num_classes": ("--num-classes", 0)})


def test_a_clash_between_keys_names_the_override_that_caused_it(write_yaml):
    path = write_yaml("schedule:\n  warmup_epochs: 1\ntrain:\n  epochs: 30\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.epochs=1"])
    assert str(info.value) == ("--set train.epochs=1: schedule.warmup_epochs: 1 is not shorter than train.epochs 1 "
                               f"(schedule.warmup_epochs from {path})")


def test_a_clash_between_two_overrides_names_both(write_yaml):
    with pytest.raises(ConfigError, match=r"^--set schedule.warmup_epochs=5, --set train.epochs=2: "
                                          r"schedule.warmup_epochs: 5 is not shorter than train.epochs 2$"):
        load_config(None, ["schedule.warmup_epochs=5", "train.epochs=2"])
    with pytest.raises(ConfigError, match=r"^--set optim.momentum=0: optim.nesterov: needs optim.name sgd with "
                                          r"optim.momentum > 0 \(optim.nesterov from .*config.yaml\)$"):
        load_config(write_yaml("optim:\n  nesterov: true\n"), ["optim.momentum=0"])


def test_a_clash_within_one_file_still_names_the_file(write_yaml):
    path = write_yaml("data:\n  val_resize: 128\n  val_crop: 160\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.dropout=0.1"])  # an override that has nothing to do with it
    assert str(info.value) == f"{path}: data.val_crop: 160 is larger than data.val_resize 128"


def test_the_override_of_a_clash_is_named_on_the_command_line(cli):
    result = cli("config", "show", "--config", "configs/finetune.yaml", "--set", "train.epochs=1")
    assert result.exit_code == 2
    assert result.stderr == ("error: --set train.epochs=1: schedule.warmup_epochs: 1 is not shorter than "
                             "train.epochs 1 (schedule.warmup_epochs from configs/finetune.yaml)\n")
