"""Messages that name a set of things (classes, files, keys) list a few and say how many more there are."""

from pathlib import Path

import pytest
import torch

from helpers import make_image_folder, write_images
from support.eval_models import calibrated_model, eval_config, save_checkpoint
from mbv2train import data
from mbv2train.config import DataConfig
from mbv2train.errors import DataError
from mbv2train.model.pretrained import LoadReport, Source
from mbv2train.shortlist import differences, shortlist

DIGITS = [str(d) for d in range(10)]


@pytest.mark.parametrize("names, expected", [
    ([], "-"),
    (["a"], "a"),
    (list("abcde"), "a, b, c, d, e"),
    (list("abcdef"), "a, b, c, d, e and 1 more"),
    ([2, 4, 5, 6, 7, 8, 9], "2, 4, 5, 6, 7 and 2 more"),
])
def test_shortlist_names_five_then_counts_the_rest(names, expected):
    assert shortlist(names) == expected


def test_shortlist_takes_a_limit():
    assert shortlist(["x", "y", "z"], limit=2) == "x, y and 1 more"


def test_differences_says_what_only_each_side_has():
    assert differences("train", list("abcdefgh"), "val", ["a", "z"]) == \
        "only in train: b, c, d, e, f and 2 more; only in val: z"
    assert differences("train", ["a"], "val", ["a"]) == ""


def test_eval_refusing_a_val_folder_with_other_classes_counts_the_missing_ones_it_does_not_name(cli, tmp_path):
    root = make_image_folder(tmp_path / "data", classes=["0", "1", "3"], train_per_class=1, val_per_class=1)
    cfg = eval_config(root, 10)
    ckpt = save_checkpoint(tmp_path / "digits.pt", calibrated_model(cfg, torch.zeros(2, 3, 16, 16), 0), cfg, DIGITS)
    result = cli("eval", "--ckpt", ckpt, "--data", root)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().endswith("(missing: 2, 4, 5, 6, 7 and 2 more; unexpected: -)"), result.stderr


def test_training_refusing_train_and_val_with_other_classes_counts_the_ones_it_does_not_name(tmp_path):
    root = tmp_path / "data"
    for split, classes in (("train", "abcdefgh"), ("val", "az")):
        for name in classes:
            write_images(root / split / name, 1)
    cfg = DataConfig(root=str(root), batch_size=1, num_workers=0)
    with pytest.raises(DataError, match=r": only in train: b, c, d, e, f and 2 more; only in val: z$"):
        data.build_loaders(cfg, seed=0)


def test_the_pretrained_line_counts_the_fresh_classes_it_does_not_name():
    report = LoadReport(loaded=312, reinitialized=[], source_classes=3, model_classes=8, kept_rows=1,
                        fresh_classes=list("bcdefgh"))
    source = Source("file.pt", Path("file.pt"), "0" * 64, {}, 1.0, 8)
    assert "7 initialized fresh (b, c, d, e, f and 2 more; 3 classes in the file" in report.line(source)
