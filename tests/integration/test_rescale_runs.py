"""Runs stopped mid-epoch on one number of processes and resumed on another, recorded by
support/sample_probe.py: each image is trained once, and the epoch's sums are an uninterrupted run's."""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, SUPPORT, LineReader, child_env, run_ckpt, run_metrics, torchrun_command, train_args

PROBE = SUPPORT / "sample_probe.py"

# Unreadable training files that data.bad_images: skip replaces: 6 of the 24 samples (image_root's 3 classes
# of 8, in the order of the dataset's indices), spread so that both parts of a split epoch have some.
CLASSES = ("circle", "square", "triangle")
BAD_SAMPLES = {8 * c + n for c in range(3) for n in (1, 6)}
BAD_FILES = sorted(f"{CLASSES[i // 8]}/{i % 8:03d}.png" for i in BAD_SAMPLES)
SKIP_BAD = ["data.bad_images=skip", "data.max_bad_fraction=0.5"]


@pytest.fixture(scope="module")
def flawed_root(image_root, tmp_path_factory):
    """image_root with the BAD_FILES of its training split made unreadable."""
    root = tmp_path_factory.mktemp("flawed") / "images"
    shutil.copytree(image_root, root)
    for name in BAD_FILES:
        (root / "train" / name).write_text("not an image\n")
    return root


def probed(root, run: Path, probe: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    """One epoch of 24 images (6 steps of a global batch of 4) with ``processes`` processes, recorded by
    sample_probe.py into ``probe``."""
    args = train_args(root, run, *SKIP_BAD, f"data.batch_size={4 // processes}", "train.epochs=1",
                      "train.tb_images=0")
    command = ([*torchrun_command(PROBE, probe, nproc=processes)] if processes > 1
               else [sys.executable, str(PROBE), str(probe)])
    return subprocess.run([*command, *args, *extra], env=probe_env(), capture_output=True, text=True, timeout=300)


def probe_env() -> dict[str, str]:
    """child_env, with this checkout's mbv2train first on the path of the probe script."""
    return child_env(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def trained_samples(probe: Path) -> list[int]:
    """Every sample index the processes of one launch trained on."""
    return [index for path in sorted(probe.glob("samples_rank*.jsonl"))
            for line in path.read_text().splitlines() for _, index in json.loads(line)]


def learning_rates(probe: Path) -> dict[int, float]:
    return {row["step"]: row["lr"] for row in map(json.loads, (probe / "lr.jsonl").read_text().splitlines())}


def micro_batch_sums(*probes: Path) -> dict[str, float]:
    """The loss, correct predictions and images of every micro-batch the processes of these launches trained
    on, each added once: what the epoch's sums must come to."""
    rows = [json.loads(line) for probe in probes for path in sorted(probe.glob("sums_rank*.jsonl"))
            for line in path.read_text().splitlines()]
    return {key: sum(row[key] for row in rows) for key in ("loss_sum", "correct", "images")}


def assert_epoch_sums(row: dict, whole_row: dict, *probes: Path) -> None:
    """An epoch split over launches reports what its micro-batches add up to, each image once, as the
    uninterrupted run does."""
    sums = micro_batch_sums(*probes)
    assert sums["images"] == 24
    assert row["train_loss"] == pytest.approx(sums["loss_sum"] / 24, rel=1e-5)
    assert row["train_top1"] == pytest.approx(sums["correct"] / 24, abs=1e-9)
    assert row["bad_images"] == whole_row["bad_images"] == len(BAD_FILES)
    assert row["train_images"] == whole_row["train_images"] == 24


def stop_and_resume_elsewhere(root, tmp_path, before: int, after: int, stop_fault: str) -> None:
    whole = probed(root, tmp_path / "whole", tmp_path / "probe_whole", before)
    assert whole.returncode == 0, whole.stderr[-3000:]
    [whole_row] = run_metrics(tmp_path / "whole")
    assert_epoch_sums(whole_row, whole_row, tmp_path / "probe_whole")

    run = tmp_path / "run"
    stopped = probed(root, run, tmp_path / "probe_1", before, "--fault", stop_fault)
    # 128 + SIGTERM from each process (torchrun itself reports a failed group with 1)
    assert (stopped.returncode == 143 if before == 1 else "exitcode  : 143" in stopped.stderr), stopped.stderr[-3000:]
    assert "stopped by SIGTERM at step 3" in stopped.stdout
    checkpoint = run_ckpt(run)
    assert (checkpoint["global_step"], checkpoint["epoch"], checkpoint["world_size"]) == (3, 0, before)
    assert (checkpoint["global_batch"], checkpoint["epoch_position"]) == (4, 12)
    # the first part's bad images are to count once, not once per new process
    assert BAD_SAMPLES & set(trained_samples(tmp_path / "probe_1"))

    # the same command on another number of processes
    resumed = probed(root, run, tmp_path / "probe_2", after, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"warning: resuming on {after} process" in resumed.stdout + resumed.stderr
    assert "global batch 4 kept" in resumed.stdout + resumed.stderr
    assert "resuming at epoch 1, step 3/6" in resumed.stdout

    first, rest = trained_samples(tmp_path / "probe_1"), trained_samples(tmp_path / "probe_2")
    assert len(first) == 12 and len(rest) == 12
    assert collections.Counter(first + rest) == collections.Counter(range(24))  # each sample once
    assert sorted(trained_samples(tmp_path / "probe_whole")) == list(range(24))

    lr_whole = learning_rates(tmp_path / "probe_whole")
    lr_split = {**learning_rates(tmp_path / "probe_1"), **learning_rates(tmp_path / "probe_2")}
    assert sorted(lr_split) == sorted(lr_whole) == [1, 2, 3, 4, 5, 6]
    assert all(lr_split[step] == lr_whole[step] for step in lr_whole)
    [row] = run_metrics(run)
    assert (row["epoch"], row["step"], row["world_size"], row["global_batch"]) == (1, 6, after, 4)
    assert_epoch_sums(row, whole_row, tmp_path / "probe_1", tmp_path / "probe_2")


@pytest.mark.slow
def test_two_processes_stopped_mid_epoch_resume_on_one_training_each_remaining_sample_once(flawed_root, tmp_path):
    # under torchrun every process sends itself SIGTERM after step 2; they agree and stop after step 3
    stop_and_resume_elsewhere(flawed_root, tmp_path, before=2, after=1, stop_fault="sigterm_at_step=2")


@pytest.mark.slow
def test_one_process_stopped_mid_epoch_resumes_on_two_training_each_remaining_sample_once(flawed_root, tmp_path):
    stop_and_resume_elsewhere(flawed_root, tmp_path, before=1, after=2, stop_fault="sigterm_at_step=3")


@pytest.mark.slow
def test_a_torchrun_job_stopped_by_sigterm_to_its_group_resumes_on_one_process_training_each_sample_once(
        flawed_root, tmp_path):
    # What a scheduler does: SIGTERM to the job's process group, here torchrun's, which hands it on to its
    # workers; they agree on a step, save and stop. Each step of that run is slowed (sleep_per_step) so that the
    # signal, sent once step 1 is done, lands well inside the epoch's 6 steps.
    whole = probed(flawed_root, tmp_path / "whole", tmp_path / "probe_whole", 1)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run, probe = tmp_path / "run", tmp_path / "probe_1"
    args = train_args(flawed_root, run, *SKIP_BAD, "data.batch_size=2", "train.epochs=1", "train.tb_images=0",
                      options=["--fault", "sleep_per_step=0.3"])
    job = subprocess.Popen(torchrun_command(PROBE, probe, *args), env=probe_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = LineReader(job.stdout), LineReader(job.stderr)
    try:
        out.wait_for("epoch 1/1 1/6")
        os.killpg(job.pid, signal.SIGTERM)
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    stdout = out.text()
    assert job.returncode != 0 and "stopped by SIGTERM at step" in stdout, err.text()[-3000:]
    checkpoint = run_ckpt(run)
    steps = checkpoint["global_step"]
    assert 1 <= steps < 6 and checkpoint["epoch"] == 0  # stopped inside the epoch
    assert checkpoint["epoch_position"] == 4 * steps

    resumed = probed(flawed_root, run, tmp_path / "probe_2", 1, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at epoch 1, step {steps}/6" in resumed.stdout
    first, rest = trained_samples(probe), trained_samples(tmp_path / "probe_2")
    assert len(first) == 4 * steps and len(rest) == 24 - 4 * steps
    assert collections.Counter(first + rest) == collections.Counter(range(24))
    lr_whole = learning_rates(tmp_path / "probe_whole")
    lr_split = {**learning_rates(probe), **learning_rates(tmp_path / "probe_2")}
    assert sorted(lr_split) == sorted(lr_whole) == [1, 2, 3, 4, 5, 6]
    assert all(lr_split[step] == lr_whole[step] for step in lr_whole)
    [row], [whole_row] = run_metrics(run), run_metrics(tmp_path / "whole")
    assert_epoch_sums(row, whole_row, probe, tmp_path / "probe_2")
