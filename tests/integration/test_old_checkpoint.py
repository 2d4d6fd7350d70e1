"""A checkpoint written before the package was reorganised into layers still resumes, exactly, and still
evaluates: tests/data/old_last.pt is the mid-epoch last.pt of a tiny run of that code (commit 4221183),
made by tests/data/make_old_checkpoint.py, whose images and settings this test reuses."""

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
DATA = ROOT / "tests" / "data"
_spec = importlib.util.spec_from_file_location("make_old_checkpoint", DATA / "make_old_checkpoint.py")
old = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(old)

TIMING = {"img_per_s", "epoch_time_s", "data_time_frac", "val_time_s"}  # differ from run to run


def mbv2(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The command, with this checkout's package and one thread as the old run had (the thread count is
    part of what a resume restores, and of the floats)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return old.make_images(tmp_path_factory.mktemp("old") / "images")


@pytest.mark.slow
def test_an_old_mid_epoch_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(images, tmp_path):
    saved = torch.load(DATA / "old_last.pt", weights_only=True)
    assert (saved["epoch"], saved["epoch_progress"]["steps"]) == (0, old.STOP_STEP)

    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(DATA / "old_last.pt", run / "last.pt")
    resumed = mbv2([*old.train_command(images, run), "--resume", "auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming at epoch 1, step {old.STOP_STEP}/{old.STEPS_PER_EPOCH}" in resumed.stdout
    assert "epoch 2 | train_loss" in resumed.stdout

    whole = mbv2(old.train_command(images, tmp_path / "whole"), tmp_path)
    assert whole.returncode == 0, whole.stdout + whole.stderr

    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (2, 2 * old.STEPS_PER_EPOCH)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, state in a["optimizer"]["state"].items():
        assert all(torch.equal(value, b["optimizer"]["state"][key][name]) for name, value in state.items())
    assert metrics(run) == metrics(tmp_path / "whole") and len(metrics(run)) == 2


def test_an_old_checkpoint_evaluates_as_it_did_with_the_code_that_wrote_it(images, tmp_path):
    result = mbv2([*old.eval_command(DATA / "old_last.pt", images)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    expected = json.loads((DATA / "old_last_eval.json").read_text())
    assert report.pop("ckpt") == str(DATA / "old_last.pt")
    # the loss to float rounding: another CPU may sum in another order
    assert report.pop("loss") == pytest.approx(expected.pop("loss"), rel=1e-6)
    assert report == expected
