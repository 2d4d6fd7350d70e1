"""Mistakes in the files and folders a command is given are reported before torch is imported: one line,
exit 2, in well under a second instead of the seconds that importing torch takes."""

import json
import subprocess
import sys

import pytest

# Runs one command in a fresh interpreter and says whether it imported torch on its way to the error.
CHILD = (
    "import json, sys\n"
    "from typer.testing import CliRunner\n"
    "from mbv2train.cli import app\n"
    "result = CliRunner().invoke(app, json.loads(sys.argv[1]))\n"
    "print(json.dumps({'code': result.exit_code, 'stderr': result.stderr, 'torch': 'torch' in sys.modules}))\n"
)


@pytest.fixture
def files(tmp_path):
    """tmp_path holding: notes.txt (text), zipped.pt (starts like a torch archive, so only torch could tell
    it is not one), data/ (train/ and val/ with a class folder each), half/ (train/ only), ran/ (a run
    directory with its last.pt)."""
    (tmp_path / "notes.txt").write_text("learning rate 0.1 looked best\n")
    (tmp_path / "zipped.pt").write_bytes(b"PK\x03\x04" + bytes(200))
    for split in ("train", "val"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
    (tmp_path / "half" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "ran").mkdir()
    (tmp_path / "ran" / "last.pt").write_bytes(b"PK\x03\x04" + bytes(200))
    return tmp_path


CASES = [
    (["eval", "--ckpt", "{t}/missing.pt"], "checkpoint not found: {t}/missing.pt"),
    (["eval", "--ckpt", "{t}/data"], "{t}/data is a folder, not a checkpoint file"),
    (["eval", "--ckpt", "{t}/notes.txt"], "{t}/notes.txt is not an mbv2 checkpoint (a text file starting "
                                          "'learning rate 0.1 looked best')"),
    (["eval", "--ckpt", "{t}/zipped.pt", "--data", "{t}/nowhere"], "data folder not found: {t}/nowhere"),
    (["eval", "--ckpt", "{t}/zipped.pt", "--config", "{t}/missing.yaml"], "config file not found: {t}/missing.yaml"),
    (["predict", "--ckpt", "{t}/missing.pt", "{t}/notes.txt"], "checkpoint not found: {t}/missing.pt"),
    (["predict", "--ckpt", "{t}/zipped.pt", "{t}/missing.png"], "no such file or folder: {t}/missing.png"),
    (["export", "--ckpt", "{t}/missing.pt", "--format", "pt2"], "checkpoint not found: {t}/missing.pt"),
    (["export", "--ckpt", "{t}/zipped.pt", "--format", "onnxx"], "--format onnxx: unknown"),
    (["export", "--ckpt", "{t}/zipped.pt", "--format", "pt2", "--output", "{t}/data"],
     "--output {t}/data: is a folder; give a file name"),
    (["export", "--ckpt", "{t}/zipped.pt", "--format", "pt2", "--output", "{t}/notes.txt/x.pt2"],
     "--output {t}/notes.txt/x.pt2: cannot write there: {t}/notes.txt is a file"),
    (["export", "--ckpt", "{t}/zipped.pt", "--format", "pt2", "--data", "{t}/nowhere"],
     "data folder not found: {t}/nowhere"),
    (["quantize", "--ckpt", "{t}/missing.pt", "--data", "{t}/data"], "checkpoint not found: {t}/missing.pt"),
    (["quantize", "--ckpt", "{t}/zipped.pt", "--data", "{t}/nowhere"], "data folder not found: {t}/nowhere"),
    (["train", "--data", "{t}/nowhere"], "data.root: folder {t}/nowhere does not exist"),
    (["train", "--data", "{t}/half"], "validation folder {t}/half/val does not exist"),
    (["train", "--data", "{t}/data", "--resume", "{t}/missing.pt"], "checkpoint not found: {t}/missing.pt"),
    (["train", "--data", "{t}/data", "--resume", "{t}/notes.txt"], "{t}/notes.txt is not an mbv2 checkpoint"),
    (["train", "--data", "{t}/data", "--output-dir", "{t}/notes.txt"],
     "train.output_dir: cannot create {t}/notes.txt: a file of that name is there"),
    (["train", "--data", "{t}/data", "--output-dir", "{t}/ran"], "{t}/ran already holds a run (last.pt)"),
    (["train", "--data", "{t}/data", "--set", "model.pretrained={t}/missing.pth"],
     "model.pretrained: file not found: {t}/missing.pth"),
    (["bench", "train", "--data", "{t}/nowhere"], "data.root: folder {t}/nowhere does not exist"),
    (["bench", "data", "--data", "{t}/half"], "validation folder {t}/half/val does not exist"),
    (["data", "check", "{t}/nowhere"], "data check: folder {t}/nowhere does not exist"),
    (["data", "demo", "{t}/notes.txt"], "data demo: cannot create {t}/notes.txt: a file of that name is there"),
    (["data", "photos", "{t}/notes.txt/photos"],
     "data photos: cannot create {t}/notes.txt/photos: {t}/notes.txt is a file"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_a_bad_path_is_one_line_before_torch_is_imported(files, args, message):
    args = [a.format(t=files) for a in args]
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.splitlines()[-1])
    assert result["code"] == 2, result
    lines = result["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(t=files) in lines[0], result
    assert result["torch"] is False, f"torch was imported before this error: {result['stderr']}"
