"""Elastic restarts under torchrun: a worker group that torchrun restarts continues from its newest
checkpoint by itself, also when the job was started with --resume PATH."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (LineReader, child_env, load_ckpt, metric_rows, run_ckpt, run_metrics, torchrun_command,
                     train_args, wait_until, worker_pids)
from mbv2train import checkpoint as ckpt
from mbv2train.train import run_state
from mbv2train.faults import Faults
from mbv2train.preemption import Preempted
from mbv2train.train.trainer import fit


def kill_leftovers(job: subprocess.Popen) -> None:
    """After a failed test, leave nothing running: the workers outlive a killed torchrun."""
    if job.poll() is None:
        for pid in worker_pids(job.pid).values():
            os.kill(pid, signal.SIGKILL)
        job.kill()


def torchrun_two_processes(*options: str) -> list[str]:
    """torchrun for 2 local processes with a short shutdown grace, then ``options`` (torchrun's, then mbv2's)."""
    return torchrun_command("--shutdown-timeout", "2", *options)


ENV = child_env()


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_restarted_by_torchrun_and_the_run_resumes_by_itself(image_root, tmp_path):
    run = tmp_path / "run"
    # 2 processes x batch 4 over 24 images: 3 steps per epoch. A checkpoint after every step; both processes
    # then hang after step 2 (before its checkpoint), where one of them is killed.
    args = train_args(image_root, run, "data.batch_size=4", "train.checkpoint_every_steps=1")
    job = subprocess.Popen(torchrun_two_processes("--max-restarts", "1", "-m", "mbv2train", *args,
                                                  "--fault", "stall_at_step=2"),
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = LineReader(job.stdout), LineReader(job.stderr)
    try:
        wait_until(lambda: (run / "last.pt").exists(), "the checkpoint of step 1")
        assert run_ckpt(run)["global_step"] == 1
        victim = wait_until(lambda: worker_pids(job.pid).get(1), "rank 1's process")
        os.kill(victim, signal.SIGKILL)
        assert job.wait(timeout=300) == 0, err.text()[-3000:]
    finally:
        kill_leftovers(job)
    stdout, stderr = out.text(), err.text()
    assert "failed (exitcode: -9) local_rank: 1" in stderr  # the first attempt's rank 1 died by SIGKILL
    assert f"torchrun restart 1: resuming from {run / 'last.pt'}" in stdout
    assert "resuming at epoch 1, step 1/3" in stdout
    rows = run_metrics(run)
    assert [row["epoch"] for row in rows] == [1, 2]
    assert run_ckpt(run)["global_step"] == 6


@pytest.mark.slow
def test_a_hung_process_stops_the_others_after_dist_timeout_s_with_one_line_naming_it(image_root, tmp_path):
    run = tmp_path / "run"
    args = train_args(image_root, run, "data.batch_size=4", "train.dist_timeout_s=5")
    # rank 1 hangs after step 2; rank 0 waits for it in step 3's gradient reduction
    result = subprocess.run(torchrun_two_processes("-m", "mbv2train", *args, "--fault", "stall_at_step=2",
                                                   "--fault", "stall_rank=1"),
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: rank 0:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert ("training stopped: another process did not reach the same collective within train.dist_timeout_s 5 s"
            in lines[0])
    assert "[rank0]: Traceback" not in result.stderr  # the line, not a traceback
    assert "failed (exitcode: 1) local_rank: 0" in result.stderr  # rank 0 ended by itself, with exit code 1


# ------------------------------------------------------------------ a restart of a job started with --resume PATH


def stub_checkpoint(path: Path, global_step: int) -> Path:
    """A training checkpoint that says only where in a run (3 steps per epoch) it was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save_checkpoint({"format_version": ckpt.FORMAT_VERSION, "model": {}, "global_step": global_step,
                          "epoch": global_step // 3}, path)
    return path


@pytest.mark.parametrize("in_run_dir, expected", [
    (None, "path"),  # the first attempt died before its first save
    (2, "path"),  # what the run dir holds is older than PATH
    (3, "path"),  # ... or where PATH is: nothing newer
    (5, "last"),  # the first attempt saved after starting from PATH
])
def test_a_restart_of_a_resume_from_path_takes_the_newest_of_path_and_the_run_dir(tmp_path, capsys, in_run_dir,
                                                                                   expected):
    path, run = stub_checkpoint(tmp_path / "elsewhere" / "epoch_1.pt", 3), tmp_path / "run"
    if in_run_dir is not None:
        stub_checkpoint(run / "last.pt", in_run_dir)
    state = run_state.prepare_resume(str(path), run, True, restart=1)
    chosen = path if expected == "path" else run / "last.pt"
    assert state["global_step"] == load_ckpt(chosen)["global_step"]
    assert capsys.readouterr().out.splitlines() == [f"torchrun restart 1: resuming from {chosen}"]


def test_a_restart_without_resume_names_the_newest_checkpoint_or_says_it_starts_afresh(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_state.prepare_resume(None, run, True, restart=2) is None
    assert capsys.readouterr().out.splitlines() == [f"torchrun restart 2: no checkpoint in {run} yet; "
                                                    f"starting afresh"]
    stub_checkpoint(run / "last.pt", 4)
    assert run_state.prepare_resume(None, run, True, restart=2)["global_step"] == 4
    assert capsys.readouterr().out.splitlines() == [f"torchrun restart 2: resuming from {run / 'last.pt'}"]


def test_a_restarted_resume_from_path_keeps_the_first_attempts_progress_and_drops_its_faults(
        tiny_config, tmp_path, monkeypatch, capsys):
    # A run of 3 steps per epoch; the job continues its epoch_1.pt (step 3) in another run dir.
    fit(tiny_config("train.epochs=3", "train.save_every_epochs=1", run_dir=tmp_path / "start"))
    path = tmp_path / "start" / "epoch_1.pt"
    fit(tiny_config("train.epochs=3", run_dir=tmp_path / "whole"), resume=str(path))
    # The first attempt writes epoch 2's row and stops after step 8 with a checkpoint (a failure elsewhere in
    # the group would have torchrun restart it); the restart is the same command with the same faults.
    run = tmp_path / "run"
    with pytest.raises(Preempted):
        fit(tiny_config("train.epochs=3", run_dir=run), resume=str(path), faults=Faults(sigterm_at_step=8))
    capsys.readouterr()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    fit(tiny_config("train.epochs=3", run_dir=run), resume=str(path), faults=Faults(sigterm_at_step=8))
    out = capsys.readouterr().out
    assert f"torchrun restart 1: resuming from {run / 'last.pt'}" in out
    assert "resuming at epoch 3, step 2/3" in out
    rows = metric_rows(run)
    assert [row["epoch"] for row in rows] == [2, 3]
    assert rows == metric_rows(tmp_path / "whole")
    assert run_ckpt(run)["global_step"] == 9


@pytest.mark.slow
def test_a_worker_killed_in_a_job_started_with_resume_path_restarts_from_the_run_dirs_newest_checkpoint(
        image_root, tmp_path):
    # PATH: the end of epoch 1 (step 3) of a 1-process run with the job's global batch of 8
    start = tmp_path / "start"
    first = subprocess.run([sys.executable, "-m", "mbv2train",
                            *train_args(image_root, start, "data.batch_size=8", "train.epochs=3",
                                        "train.save_every_epochs=1")],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    path = start / "epoch_1.pt"

    # 2 processes x batch 4: epoch 2 is steps 4-6, epoch 3 steps 7-9. A checkpoint after every step; both
    # processes hang after step 8 (before its checkpoint), where one of them is killed.
    run = tmp_path / "run"
    args = train_args(image_root, run, "data.batch_size=4", "train.epochs=3", "train.checkpoint_every_steps=1")
    job = subprocess.Popen(torchrun_two_processes("--max-restarts", "1", "-m", "mbv2train", *args,
                                                  "--resume", str(path), "--fault", "stall_at_step=8"),
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = LineReader(job.stdout), LineReader(job.stderr)
    try:
        out.wait_for("resuming at epoch 2, step 0/3")
        wait_until(lambda: (run / "last.pt").exists()
                   and run_ckpt(run)["global_step"] == 7, "the checkpoint of step 7")
        victim = wait_until(lambda: worker_pids(job.pid).get(1), "rank 1's process")
        os.kill(victim, signal.SIGKILL)
        # the restarted group's first line about where it resumes
        assert "resuming at epoch 3, step 1/3" in out.wait_for("resuming at epoch"), out.text(finished=False)
        assert job.wait(timeout=300) == 0, err.text()[-3000:]
    finally:
        kill_leftovers(job)
    stdout = out.text()
    assert f"torchrun restart 1: resuming from {run / 'last.pt'}" in stdout
    assert [row["epoch"] for row in run_metrics(run)] == [2, 3]  # epoch 2's row kept, once
    assert run_ckpt(run)["global_step"] == 9
