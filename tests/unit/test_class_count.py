"""A dataset of one class trains to a perfect, meaningless score: training and `mbv2 data check` refuse it."""

import pytest

from helpers import train_args, write_dataset, write_images
from mbv2train.data.check import check_dataset
from mbv2train.errors import DataError


def two_per_step(root, run, *overrides):
    """train_args with batches of 2, for datasets of a few images."""
    return train_args(root, run, "data.batch_size=2", *overrides)


def test_training_on_one_class_is_one_line_exit_2_and_writes_nothing(cli, tmp_path):
    root = write_dataset(tmp_path / "data", ["cat"], 4, 2)
    run = tmp_path / "run"
    result = cli(*two_per_step(root, run))
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: training folder {root / 'train'} has 1 class folder (cat); "
                                          f"a classifier needs at least 2 classes"]
    assert not run.exists()


def test_training_names_the_folder_set_by_train_dir(cli, tmp_path):
    root = write_dataset(tmp_path / "data", ["cat"], 4, 2)
    result = cli(*two_per_step(root, tmp_path / "run", f"data.train_dir={root / 'train'}"))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: training folder {root / 'train'} has 1 class folder (cat)")


def test_data_check_of_a_dataset_with_one_class_is_one_line_exit_2(cli, tmp_path):
    root = write_dataset(tmp_path / "data", ["cat"], 3, 2)
    result = cli("data", "check", root, "--workers", "1")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: data check: {root / 'train'} has 1 class folder (cat); "
                                          f"a classifier needs at least 2 classes"]
    assert result.stdout == ""


def test_data_check_of_one_split_folder_with_one_class_says_so(tmp_path):
    root = write_dataset(tmp_path / "data", ["cat"], 3, 2)
    with pytest.raises(DataError, match=r"^data check: .*/data/val has 1 class folder \(cat\); a classifier "):
        check_dataset(root / "val", workers=1)


def test_data_check_refuses_a_val_split_of_one_class_when_train_has_two(tmp_path):
    root = tmp_path / "data"
    for split, classes in (("train", ["cat", "dog"]), ("val", ["dog"])):
        for name in classes:
            write_images(root / split / name, 2)
    with pytest.raises(DataError, match=r"^data check: .*/data/val has 1 class folder \(dog\)"):
        check_dataset(root, workers=1)


def test_two_classes_are_enough(tmp_path):
    root = write_dataset(tmp_path / "data", ["cat", "dog"], 3, 2)
    assert check_dataset(root, workers=1)["ok"]
