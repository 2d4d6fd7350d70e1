"""mbv2train.datacheck: the scan behind `mbv2 data check DIR`."""

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import truncated_jpeg, write_dataset, write_images
from mbv2train.datacheck import check_dataset, format_report
from mbv2train.errors import DataError

CLASSES = ["cat", "dog"]


@pytest.fixture
def root(tmp_path):
    """A clean dataset: tmp_path/data/{train,val}/{cat,dog}/img*.png."""
    return write_dataset(tmp_path / "data", CLASSES, 3, 2)


def kinds(report) -> list[tuple[str, str]]:
    """(kind, path relative to the report's root) of each problem."""
    return [(p["kind"], Path(p["path"]).relative_to(report["root"]).as_posix()) for p in report["problems"]]


def test_clean_dataset_is_ok(root):
    report = check_dataset(root, workers=1)
    assert report["ok"] is True and report["problems"] == [] and report["notes"] == []
    assert {k: (v["images"], v["classes"]) for k, v in report["splits"].items()} == {"train": (6, 2),
                                                                                     "val": (4, 2)}
    assert format_report(report).splitlines()[-1] == f"ok: {root}: 10 images, no problems"


def test_single_split_folder_is_checked_on_its_own(root):
    report = check_dataset(root / "train", workers=1)
    assert report["ok"] and list(report["splits"]) == ["train"] and report["splits"]["train"]["images"] == 6


@pytest.mark.parametrize("name, content", [
    ("broken.jpg", truncated_jpeg()),
    ("empty.jpg", b""),
    ("notes.jpg", b"not an image\n"),
    ("._img0.png", b"\x00\x05\x16\x07 macOS resource fork"),
])
def test_unreadable_files_are_problems(root, name, content):
    (root / "val" / "dog" / name).write_bytes(content)
    report = check_dataset(root, workers=1)
    assert kinds(report) == [("unreadable", f"val/dog/{name}")] and report["ok"] is False
    assert report["splits"]["val"]["images"] == 5  # counted like training counts it
    if name.startswith("._"):
        assert "macOS resource-fork" in report["problems"][0]["detail"]


def test_truncated_file_detail_says_truncated(root):
    (root / "train" / "cat" / "broken.jpg").write_bytes(truncated_jpeg())
    assert "image file is truncated" in check_dataset(root, workers=1)["problems"][0]["detail"]


def test_empty_class_folder_is_a_problem(root):
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "readme.txt").write_text("no images")
    report = check_dataset(root / "train", workers=1)
    assert kinds(report) == [("empty_class", "emu")]
    assert [n["kind"] for n in report["notes"]] == ["ignored_file"]


def test_flat_split_points_to_prepare_script(root):
    flat = root / "val"
    for c in CLASSES:
        for image in (flat / c).iterdir():
            image.rename(flat / f"{c}_{image.name}")
        (flat / c).rmdir()
    report = check_dataset(root, workers=1)
    assert kinds(report) == [("flat_split", "val")]
    assert "prepare_imagenet_val.py" in report["problems"][0]["detail"]
    assert report["splits"]["val"] == {"path": str(flat), "images": 4, "classes": 0}


def test_class_mismatch_names_the_differing_classes(root):
    write_images(root / "val" / "owl", 1)
    report = check_dataset(root, workers=1)
    assert kinds(report) == [("class_mismatch", ".")]
    assert "only in val: owl" in report["problems"][0]["detail"]


def test_extension_mismatch_is_a_warning_level_problem(root):
    Image.new("RGB", (8, 8)).save(root / "train" / "cat" / "really_png.jpg", "PNG")
    Image.new("RGB", (8, 8)).save(root / "train" / "dog" / "real.jpeg", "JPEG")  # matches: fine
    report = check_dataset(root, workers=1)
    assert kinds(report) == [("extension_mismatch", "train/cat/really_png.jpg")] and report["ok"] is False
    assert "PNG data in a .jpg file" in report["problems"][0]["detail"]
    lines = format_report(report).splitlines()
    assert lines[0].startswith("warning: extension_mismatch: ") and "0 errors, 1 warnings" in lines[-1]


def test_non_image_files_are_notes_not_problems(root):
    (root / "train" / "cat" / "labels.csv").write_text("a,b\n")
    (root / "train" / "stray.png").write_bytes(b"")  # outside any class folder: training never reads it
    report = check_dataset(root, workers=1)
    assert report["ok"] is True
    assert sorted(Path(n["path"]).name for n in report["notes"]) == ["labels.csv", "stray.png"]
    assert {n["kind"] for n in report["notes"]} == {"ignored_file"}


def test_missing_val_split_is_a_problem(root):
    for c in CLASSES:
        for image in (root / "val" / c).iterdir():
            image.unlink()
        (root / "val" / c).rmdir()
    (root / "val").rmdir()
    assert kinds(check_dataset(root, workers=1)) == [("missing_split", "val")]


def test_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"data check: folder .*nowhere does not exist"):
        check_dataset(tmp_path / "nowhere")


def test_parallel_scan_equals_serial_and_is_json(root):
    (root / "train" / "cat" / "broken.jpg").write_bytes(truncated_jpeg())
    (root / "val" / "dog" / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(root / "val" / "cat" / "png.jpg", "PNG")
    (root / "train" / "emu").mkdir()
    write_images(root / "train" / "cat", 20, start=10)
    serial = check_dataset(root, workers=1)
    parallel = check_dataset(root, workers=2)
    assert parallel == serial
    assert json.loads(json.dumps(parallel)) == parallel
    assert [k for k, _ in kinds(serial)] == ["class_mismatch", "unreadable", "empty_class", "extension_mismatch",
                                             "unreadable"]
    lines = format_report(serial).splitlines()
    assert sum(line.startswith(("error: ", "warning: ")) for line in lines) == 5
    assert lines[-1] == f"not ok: {root}: 4 errors, 1 warnings in 33 images"


def test_data_check_command_exits_0_when_clean_and_1_with_problems(cli, image_root, tmp_path):
    import json
    import shutil

    clean = cli("data", "check", image_root, "--workers", "1")
    assert clean.exit_code == 0, clean.output
    root = tmp_path / "copy"
    shutil.copytree(image_root, root)
    (root / "train" / "square" / "bad.jpg").write_text("text, not a JPEG")
    damaged = cli("data", "check", root, "--json", "--workers", "1")
    assert damaged.exit_code == 1
    report = json.loads(damaged.stdout)
    assert report["ok"] is False
    assert {"kind": "unreadable", "path": str(root / "train" / "square" / "bad.jpg")}.items() <= \
        next(p for p in report["problems"] if p["kind"] == "unreadable").items()


def test_data_check_on_a_missing_folder_exits_2(cli, tmp_path):
    result = cli("data", "check", tmp_path / "nowhere")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
