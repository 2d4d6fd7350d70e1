"""scripts/prepare_imagenet_val.py run as a process on fake ImageNet validation folders."""

import subprocess
import sys

import pytest

from helpers import REPO


def run_prepare(*args):
    script = REPO / "scripts" / "prepare_imagenet_val.py"
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def flat_val(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    for i in range(1, 5):
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(b"jpeg")
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n"
                   "ILSVRC2012_val_00000001,n01 1 2 3 4 n01 5 6 7 8\n"
                   "ILSVRC2012_val_00000002,n02 1 2 3 4\n"
                   "ILSVRC2012_val_00000003,n01 1 2 3 4\n"
                   "ILSVRC2012_val_00000004,n02 1 2 3 4\n")
    return val, csv


def test_prepare_val_sorts_images_by_kaggle_csv(flat_val):
    val, csv = flat_val
    result = run_prepare(val, "--labels", csv)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (val / "n01").iterdir()) == ["ILSVRC2012_val_00000001.JPEG",
                                                               "ILSVRC2012_val_00000003.JPEG"]
    assert len(list((val / "n02").iterdir())) == 2 and not list(val.glob("*.JPEG"))


def test_prepare_val_reads_two_column_text_and_copies(flat_val, tmp_path):
    val, _ = flat_val
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG n0{i % 2}\n" for i in range(1, 5)))
    assert run_prepare(val, "--labels", labels, "--copy").returncode == 0
    assert len(list(val.glob("*.JPEG"))) == 4 and len(list((val / "n00").iterdir())) == 2


def test_prepare_val_dry_run_changes_nothing(flat_val):
    val, csv = flat_val
    result = run_prepare(val, "--labels", csv, "--dry-run")
    assert result.returncode == 0 and "would move 4 images into 2 class folders" in result.stdout
    assert sorted(p.is_file() for p in val.iterdir()) == [True] * 4


def test_prepare_val_refuses_to_overwrite(flat_val):
    val, csv = flat_val
    (val / "n02").mkdir()
    (val / "n02" / "ILSVRC2012_val_00000004.JPEG").write_bytes(b"other")
    result = run_prepare(val, "--labels", csv)
    assert result.returncode == 2 and "refusing to overwrite 1 existing files" in result.stderr
    assert len(list(val.glob("*.JPEG"))) == 4  # nothing moved


def test_prepare_val_reports_unlabelled_images(flat_val):
    val, csv = flat_val
    (val / "stray.jpg").write_bytes(b"jpeg")
    result = run_prepare(val, "--labels", csv)
    assert result.returncode == 2 and "1 images in" in result.stderr and "stray.jpg" in result.stderr
