"""Malformed configs through the real CLI: each must end with exit code 2, nothing on stdout, and exactly
one stderr line "error: ..." naming the file (or the --set option), the key and, where there is one, the
value. tests/test_config.py covers the basics (unknown names, duplicate keys, model.* types and ranges);
this file covers the rest of the sections, YAML oddities and cross-key checks.

Cases marked xfail(strict=True) document bugs found when the file was written: the CLI ends in a
traceback or breaks the one-line rule. Once a bug is fixed the test XPASSes, which fails the run;
remove its entry from XFAIL_FILES / XFAIL_OVERRIDES then.
"""

import pytest

COMMANDS = {"config_show": ("config", "show"), "summary": ("summary",)}

# (id, file contents (bytes are written as is), fragments the one error line must contain besides the path)
BAD_FILES = [
    # -- YAML that does not parse, or that the safe loader refuses
    ("unclosed_quote", 'model:\n  width_mult: "0.5\n', ["invalid YAML", "unexpected end of stream", "line 3"]),
    ("key_indented_too_far", "model:\n  width_mult: 1.0\n   dropout: 0.1\n",
     ["invalid YAML", "mapping values are not allowed here", "line 3"]),
    ("key_dedented_inside_section", "model:\n    width_mult: 1.0\n  dropout: 0.1\n", ["invalid YAML", "line 3"]),
    ("two_documents", "---\nmodel:\n  width_mult: 0.5\n---\ndata:\n  batch_size: 8\n",
     ["invalid YAML", "another document", "line 4"]),
    ("undefined_alias", "model:\n  width_mult: *width\n", ["invalid YAML", "undefined alias 'width'", "line 2"]),
    ("python_apply_tag", 'model:\n  width_mult: !!python/object/apply:os.system ["echo pwned"]\n',
     ["invalid YAML", "python/object/apply:os.system", "line 2"]),
    ("python_object_tag", "model: !!python/object:mbv2train.config.ModelConfig {width_mult: 2.0}\n",
     ["invalid YAML", "python/object:mbv2train.config.ModelConfig", "line 1"]),
    ("latin1_byte", b"data:\n  root: /data/caf\xe9\n", ["cannot read config file", "utf-8", "0xe9"]),
    ("unhashable_key", "model:\n  ? [width_mult, dropout]\n  : 0.5\n", ["invalid YAML", "a key must be a name"]),
    # -- wrong types
    ("image_size_string", 'data:\n  image_size: "224"\n', ["data.image_size", "expected an integer", "'224'"]),
    ("scale_scalar", "data:\n  scale: 0.5\n", ["data.scale", "expected a list", "0.5"]),
    ("scale_string_element", "data:\n  scale: [0.08, big]\n", ["data.scale[1]", "expected a number", "'big'"]),
    ("mean_two_numbers", "data:\n  mean: [0.5, 0.5]\n", ["data.mean", "three numbers", "[0.5, 0.5]"]),
    ("betas_three_numbers", "optim:\n  name: adamw\n  betas: [0.9, 0.99, 0.999]\n",
     ["optim.betas", "two numbers", "[0.9, 0.99, 0.999]"]),
    ("amp_bool", "train:\n  amp: true\n", ["train.amp", "one of auto, none, bf16, fp16", "True"]),
    ("epochs_fraction", "train:\n  epochs: 1.5\n", ["train.epochs", "expected an integer", "1.5"]),
    ("schedule_name_unknown", "schedule:\n  name: linear\n",
     ["schedule.name", "one of cosine, exponential, step, constant", "'linear'"]),
    ("optim_name_unknown", "optim:\n  name: adam\n", ["optim.name", "one of sgd, rmsprop, adamw", "'adam'"]),
    ("interpolation_unknown", "data:\n  interpolation: lanczos\n",
     ["data.interpolation", "one of bilinear, bicubic, nearest", "'lanczos'"]),
    ("best_metric_unknown", "train:\n  best_metric: top1\n", ["train.best_metric", "val_top1, val_top5", "'top1'"]),
    ("root_is_a_date", "data:\n  root: 2024-01-01\n", ["data.root", "expected a string", "2024"]),
    ("output_dir_null", "train:\n  output_dir: null\n", ["train.output_dir", "expected a string", "None"]),
    # -- zero or negative sizes
    ("image_size_zero", "data:\n  image_size: 0\n", ["data.image_size", "must be >= 8", "got 0"]),
    ("batch_size_zero", "data:\n  batch_size: 0\n", ["data.batch_size", "must be >= 1", "got 0"]),
    ("batch_size_negative", "data:\n  batch_size: -1\n", ["data.batch_size", "must be >= 1", "got -1"]),
    ("num_workers_negative", "data:\n  num_workers: -1\n", ["data.num_workers", "must be >= 0", "got -1"]),
    ("epochs_zero", "train:\n  epochs: 0\n", ["train.epochs", "must be >= 1", "got 0"]),
    ("val_crop_zero", "data:\n  val_crop: 0\n", ["data.val_crop", "must be >= 8", "got 0"]),
    ("std_zero_channel", "data:\n  std: [0.2, 0.0, 0.2]\n", ["data.std", "must be > 0", "0.0"]),
    # -- probabilities out of range
    ("hflip_above_one", "data:\n  hflip: 1.5\n", ["data.hflip", "must be <= 1", "1.5"]),
    ("random_erasing_negative", "data:\n  random_erasing: -0.1\n", ["data.random_erasing", "must be >= 0", "-0.1"]),
    ("label_smoothing_one", "train:\n  label_smoothing: 1.0\n", ["train.label_smoothing", "must be < 1", "1.0"]),
    # -- keys that are fine alone but impossible together
    ("val_crop_above_val_resize", "data:\n  val_resize: 160\n  val_crop: 192\n",
     ["data.val_crop", "192", "data.val_resize 160"]),
    ("warmup_not_shorter_than_training", "train:\n  epochs: 5\nschedule:\n  warmup_epochs: 5\n",
     ["schedule.warmup_epochs", "5", "train.epochs 5"]),
    ("min_lr_above_lr", "optim:\n  lr: 0.01\nschedule:\n  name: cosine\n  min_lr: 0.1\n",
     ["schedule.min_lr", "0.1", "optim.lr 0.01"]),
    ("nesterov_with_rmsprop", "optim:\n  name: rmsprop\n  nesterov: true\n", ["optim.nesterov", "optim.name sgd"]),
    ("ema_best_metric_without_ema", "train:\n  best_metric: ema_val_top1\n",
     ["train.best_metric", "ema_val_top1", "train.ema: true"]),
    ("scale_low_above_high", "data:\n  scale: [1.0, 0.5]\n", ["data.scale", "[low, high]", "[1.0, 0.5]"]),
    ("train_split_is_val_split", "data:\n  train_split: images\n  val_split: images\n",
     ["data.val_split", "data.train_split", "'images'"]),
    # -- structure: sections and keys in the wrong place
    ("section_is_a_list", "model:\n  - width_mult: 1.0\n",
     ["section 'model' must be a mapping", "a list", "'width_mult': 1.0"]),
    ("key_nested_too_deep", "model:\n  width_mult:\n    value: 1\n",
     ["model.width_mult", "expected a number", "{'value': 1}"]),
    ("section_key_at_top_level", "width_mult: 1.0\n", ["unknown section 'width_mult'"]),
    ("section_key_at_top_level_suggests_its_section", "width_mult: 1.0\n", ["model.width_mult"]),
    # -- numbers too big for their type
    ("huge_integer_for_a_float", "model:\n  width_mult: " + "9" * 400 + "\n", ["model.width_mult"]),
    ("integer_with_5000_digits", "data:\n  batch_size: " + "9" * 5000 + "\n", []),
]

XFAIL_FILES: dict[str, str] = {}


def _params(table, xfails):
    assert set(xfails) <= {row[0] for row in table}
    return [pytest.param(*rest, id=case_id,
                         marks=[pytest.mark.xfail(strict=True, reason=xfails[case_id])] if case_id in xfails else [])
            for case_id, *rest in table]


def _assert_one_error_line(result, fragments):
    assert "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    missing = [fragment for fragment in fragments if fragment not in lines[0]]
    assert not missing, f"{missing} not in {lines[0]!r}"


def test_tables_have_unique_ids():
    for table in (BAD_FILES, BAD_OVERRIDES):
        ids = [row[0] for row in table]
        assert len(ids) == len(set(ids))
    assert len({row[1] for row in BAD_FILES}) >= 25


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
@pytest.mark.parametrize("text, fragments", _params(BAD_FILES, XFAIL_FILES))
def test_malformed_file_exits_2_with_one_line(cli, tmp_path, command, text, fragments):
    path = tmp_path / "config.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    result = cli(*command, "--config", path)
    _assert_one_error_line(result, [str(path), *fragments])


# (id, --set item, fragments the one error line must contain)
BAD_OVERRIDES = [
    ("unknown_choice", "optim.name=lamb", ["--set optim.name=lamb", "one of sgd, rmsprop, adamw", "'lamb'"]),
    ("scalar_for_a_list", "data.scale=0.5", ["--set data.scale=0.5", "data.scale", "expected a list"]),
    ("fraction_for_an_integer", "train.epochs=1.5", ["--set train.epochs=1.5", "expected an integer", "1.5"]),
    ("exponent_for_an_integer", "model.num_classes=1e3",
     ["--set model.num_classes=1e3", "expected an integer", "1000.0"]),
    ("overflows_to_inf", "model.width_mult=1e999", ["--set model.width_mult=1e999", "finite", "inf"]),
    ("python_tag", "model.width_mult=!!python/object/apply:os.system [true]",
     ["--set model.width_mult=", "not valid YAML", "python/object/apply:os.system"]),
    ("undefined_alias", "model.width_mult=*w", ["--set model.width_mult=*w", "not valid YAML", "undefined alias"]),
    ("colon_instead_of_equals", "model.width_mult: 0.5", ["--set model.width_mult: 0.5", "section.key=value"]),
    ("empty_key", "model.=1", ["--set model.=1", "section.key=value"]),
    ("cross_key_check_names_the_option", "data.val_crop=300",
     ["--set data.val_crop=300", "data.val_resize 256"]),
    ("newline_in_value", "model.dropout=a\nb", ["model.dropout", "expected a number"]),
    ("huge_integer_for_a_float", "model.width_mult=" + "9" * 400, ["model.width_mult"]),
]

XFAIL_OVERRIDES: dict[str, str] = {}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
@pytest.mark.parametrize("item, fragments", _params(BAD_OVERRIDES, XFAIL_OVERRIDES))
def test_malformed_override_exits_2_with_one_line(cli, command, item, fragments):
    _assert_one_error_line(cli(*command, "--set", item), fragments)
