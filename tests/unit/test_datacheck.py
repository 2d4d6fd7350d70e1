"""mbv2train.data.check: the scan behind `mbv2 data check DIR`."""

import json
from pathlib import Path

import pytest
from PIL import Image

from helpers import truncated_jpeg, write_dataset, write_images
from mbv2train.data.check import ERROR_KINDS, PROBLEM_KINDS, WARNING_KINDS, check_dataset, format_report, severity
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
    assert (report["errors"], report["warnings"]) == (0, 0)
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


def test_extension_mismatch_is_a_warning_and_leaves_the_report_ok(root):
    Image.new("RGB", (8, 8)).save(root / "train" / "cat" / "really_png.jpg", "PNG")
    Image.new("RGB", (8, 8)).save(root / "train" / "dog" / "real.jpeg", "JPEG")  # matches: fine
    report = check_dataset(root, workers=1)
    assert kinds(report) == [("extension_mismatch", "train/cat/really_png.jpg")]
    problem = report["problems"][0]
    assert problem["severity"] == "warning" and "PNG data in a .jpg file" in problem["detail"]
    assert (report["ok"], report["errors"], report["warnings"]) == (True, 0, 1)
    lines = format_report(report).splitlines()
    assert lines[0].startswith("warning: extension_mismatch: ")
    assert lines[-1].startswith(f"ok (1 warning): {root}: 12 images")


def test_strict_makes_a_warning_fail_the_report(root):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(root / "val" / "dog" / name, "PNG")
    assert format_report(check_dataset(root, workers=1)).splitlines()[-1].startswith("ok (2 warnings): ")
    report = check_dataset(root, workers=1, strict=True)
    assert (report["ok"], report["errors"], report["warnings"]) == (False, 0, 2)
    assert format_report(report).splitlines()[-1] == f"not ok (--strict): {root}: 0 errors, 2 warnings in 12 images"


def test_an_error_fails_the_report_and_says_error(root):
    (root / "train" / "cat" / "broken.jpg").write_bytes(truncated_jpeg())
    report = check_dataset(root, workers=1)
    assert report["problems"][0]["severity"] == "error"
    assert (report["ok"], report["errors"], report["warnings"]) == (False, 1, 0)
    lines = format_report(report).splitlines()
    assert lines[0].startswith("error: unreadable: ")
    assert lines[-1] == f"not ok: {root}: 1 error, 0 warnings in 11 images"


def test_every_problem_kind_has_a_severity():
    assert {severity(k) for k in ERROR_KINDS} == {"error"} and {severity(k) for k in WARNING_KINDS} == {"warning"}
    assert set(PROBLEM_KINDS) == set(ERROR_KINDS) | set(WARNING_KINDS)


def test_cmyk_jpeg_is_not_a_problem(root):
    # Print workflows write CMYK JPEGs; training converts them to RGB (folders.load_image), so nothing to report.
    cmyk = root / "train" / "cat" / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk, "JPEG")
    with Image.open(cmyk) as img:
        assert img.mode == "CMYK"  # the file really is CMYK, not converted on save
    report = check_dataset(root, workers=1)
    assert report["problems"] == [] and report["ok"] is True
    assert report["splits"]["train"]["images"] == 7


def test_non_image_files_are_notes_not_problems(root):
    (root / "train" / "cat" / "labels.csv").write_text("a,b\n")
    (root / "train" / "stray.png").write_bytes(b"")  # outside any class folder: training never reads it
    report = check_dataset(root, workers=1)
    assert report["ok"] is True
    assert sorted(Path(n["path"]).name for n in report["notes"]) == ["labels.csv", "stray.png"]
    assert {n["kind"] for n in report["notes"]} == {"ignored_file"}


def test_the_report_counts_one_of_a_kind_in_the_singular():
    report = {"root": "/d", "splits": {"train": {"images": 1, "classes": 1, "path": "/d/train"}},
              "problems": [], "notes": [{"kind": "ignored_file", "path": "/d/train/cat/labels.csv"}],
              "errors": 0, "warnings": 0, "strict": False, "ok": True}
    assert format_report(report).splitlines() == [
        "train: 1 image in 1 class (/d/train)",
        "note: 1 file ignored by training (not images, or outside class folders): /d/train/cat/labels.csv",
        "ok: /d: 1 image, no problems"]


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
    severities = ["error", "error", "error", "warning", "error"]
    assert [p["severity"] for p in serial["problems"]] == severities
    lines = format_report(serial).splitlines()
    assert [line.split(":")[0] for line in lines[:5]] == severities
    assert lines[-1] == f"not ok: {root}: 4 errors, 1 warning in 33 images"


def test_data_check_command_exits_0_when_clean_and_1_with_errors(cli, image_root, tmp_path):
    import shutil

    clean = cli("data", "check", image_root, "--workers", "1")
    assert clean.exit_code == 0, clean.output
    root = tmp_path / "copy"
    shutil.copytree(image_root, root)
    (root / "train" / "square" / "bad.jpg").write_text("text, not a JPEG")
    damaged = cli("data", "check", root, "--json", "--workers", "1")
    assert damaged.exit_code == 1
    report = json.loads(damaged.stdout)
    assert (report["ok"], report["errors"], report["warnings"]) == (False, 1, 0)
    assert report["problems"] == [{"kind": "unreadable", "severity": "error",
                                   "path": str(root / "train" / "square" / "bad.jpg"),
                                   "detail": report["problems"][0]["detail"]}]


@pytest.fixture
def warned_root(root):
    """The clean dataset plus one PNG named .jpg: a warning, no error."""
    Image.new("RGB", (8, 8)).save(root / "train" / "cat" / "png.jpg", "PNG")
    return root


@pytest.mark.parametrize("strict, exit_code", [(False, 0), (True, 1)])
def test_data_check_command_fails_on_warnings_only_with_strict(cli, warned_root, strict, exit_code):
    args = ["data", "check", warned_root, "--workers", "1", *(["--strict"] if strict else [])]
    human = cli(*args)
    assert human.exit_code == exit_code, human.output
    lines = human.stdout.splitlines()
    assert lines[0].startswith("warning: extension_mismatch: ")
    assert lines[-1].startswith("not ok (--strict): " if strict else "ok (1 warning): ")
    as_json = cli(*args, "--json")
    assert as_json.exit_code == exit_code
    report = json.loads(as_json.stdout)
    assert (report["ok"], report["strict"], report["errors"], report["warnings"]) == (not strict, strict, 0, 1)
    assert [(p["kind"], p["severity"]) for p in report["problems"]] == [("extension_mismatch", "warning")]


@pytest.mark.parametrize("strict", [False, True])
def test_data_check_command_fails_on_an_error_with_or_without_strict(cli, warned_root, strict):
    (warned_root / "val" / "dog" / "broken.jpg").write_bytes(truncated_jpeg())
    result = cli("data", "check", warned_root, "--workers", "1", *(["--strict"] if strict else []))
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[-1] == f"not ok: {warned_root}: 1 error, 1 warning in 12 images"


def test_data_check_command_strict_passes_a_clean_dataset(cli, root):
    result = cli("data", "check", root, "--workers", "1", "--strict")
    assert result.exit_code == 0 and result.stdout.splitlines()[-1] == f"ok: {root}: 10 images, no problems"


def test_data_check_on_a_missing_folder_exits_2(cli, tmp_path):
    result = cli("data", "check", tmp_path / "nowhere")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
