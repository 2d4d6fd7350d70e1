"""Elastic restarts under torchrun: a worker group that torchrun restarts continues from its newest
checkpoint by itself."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN, LineReader, wait_until
from mbv2train.tracking import read_metrics


def train_args(image_root, run: Path, *overrides: str) -> list[str]:
    args = ["train", "--data", str(image_root), "--output-dir", str(run)]
    for item in [*TINY_RUN, *overrides]:
        args += ["--set", item]
    return args


def worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of the workers a torchrun process started (its children carrying RANK)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if "RANK" in environ:
            found[int(environ["RANK"])] = int(entry.name)
    return found


def torchrun_two_processes(*options: str) -> list[str]:
    """torchrun for 2 local processes with a short shutdown grace, then ``options`` (torchrun's, then mbv2's)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--shutdown-timeout", "2", *options]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


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
        assert torch.load(run / "last.pt", weights_only=True)["global_step"] == 1
        victim = wait_until(lambda: worker_pids(job.pid).get(1), "rank 1's process")
        os.kill(victim, signal.SIGKILL)
        assert job.wait(timeout=300) == 0, err.text()[-3000:]
    finally:
        if job.poll() is None:  # a failed test leaves no workers behind: they outlive a killed torchrun
            for pid in worker_pids(job.pid).values():
                os.kill(pid, signal.SIGKILL)
            job.kill()
    stdout, stderr = out.text(), err.text()
    assert "failed (exitcode: -9) local_rank: 1" in stderr  # the first attempt's rank 1 died by SIGKILL
    assert "torchrun restart 1: resuming from the newest checkpoint" in stdout
    assert "resuming at epoch 1, step 1/3" in stdout
    rows = read_metrics(run / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2]
    assert torch.load(run / "last.pt", weights_only=True)["global_step"] == 6


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
