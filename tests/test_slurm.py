"""scripts/slurm/train.sbatch, run by bash with fake srun, scontrol and scancel on PATH: SIGUSR1 before the
time limit -> a checkpoint -> exactly one requeue -> exit 0; the requeued job resumes."""

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN, LineReader, wait_until
from test_elastic import worker_pids
from mbv2train.tracking import read_metrics

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "train.sbatch"

FAKES = {
    # srun: drop its own options, remember the step's process (what scancel signals), run the command
    "srun": 'while [[ "$1" == --* ]]; do shift; done\necho $$ > "$FAKE_SLURM/step.pid"\nexec "$@"\n',
    "scontrol": 'case "$1" in\n  show) echo localhost ;;\n  requeue) echo "requeue $2" >> "$FAKE_SLURM/calls" ;;\n'
                '  *) exit 1 ;;\nesac\n',
    "scancel": 'echo "scancel $*" >> "$FAKE_SLURM/calls"\nkill -s "${1#--signal=}" "$(cat "$FAKE_SLURM/step.pid")"\n',
}


def test_the_sbatch_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_sbatch_script_passes_shellcheck():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """The environment of a one-node SLURM job 4242 with two (CPU) processes, the fakes first on PATH."""
    folder = tmp_path / "fake_slurm"
    (folder / "bin").mkdir(parents=True)
    for name, body in FAKES.items():
        path = folder / "bin" / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.pathsep.join([str(folder / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]])
    return {**os.environ, "PATH": path, "FAKE_SLURM": str(folder), "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", "MBV2_GPUS_PER_NODE": "2",
            "MBV2_RDZV_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def sbatch_args(image_root, run: Path, *overrides: str) -> list[str]:
    args = ["--data", str(image_root), "--output-dir", str(run)]
    for item in [*TINY_RUN, "data.batch_size=4", "optim.lr=0.01", *overrides]:
        args += ["--set", item]
    return args


@pytest.mark.slow
def test_sigusr1_before_the_time_limit_checkpoints_requeues_once_and_the_requeued_job_resumes(image_root, tmp_path):
    env, run = fake_slurm(tmp_path), tmp_path / "run"
    calls = tmp_path / "fake_slurm" / "calls"
    # far more epochs than can run before the signal lands: the run is certainly unfinished when it stops
    job = subprocess.Popen(["bash", str(SCRIPT), *sbatch_args(image_root, run, "train.epochs=50",
                                                               "train.checkpoint_every_steps=1")],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = LineReader(job.stdout), LineReader(job.stderr)
    try:
        wait_until(lambda: (run / "last.pt").exists(), "the first checkpoint")
        job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` does
        assert job.wait(timeout=300) == 0, err.text()[-3000:]
    finally:
        if job.poll() is None:  # a failed test leaves nothing running: torchrun and its workers outlive bash
            step = tmp_path / "fake_slurm" / "step.pid"
            agent = int(step.read_text()) if step.exists() else None
            for pid in [*(worker_pids(agent).values() if agent else []), *([agent] if agent else [])]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            job.kill()
    stdout, stderr = out.text(), err.text()
    assert "stopped by SIGUSR1" in stdout
    assert "train.sbatch: requeueing job 4242" in stderr
    assert calls.read_text().splitlines() == ["scancel --signal=USR1 4242", "requeue 4242"]
    stopped = torch.load(run / "last.pt", weights_only=True)
    assert stopped["epoch"] < 50

    # the requeued job: the same script and arguments, here with the run cut short to the stopped epoch
    epochs = stopped["epoch"] + 1
    requeued = subprocess.run(["bash", str(SCRIPT), *sbatch_args(image_root, run, "train.epochs=50",
                                                                  "train.checkpoint_every_steps=1"),
                               "--set", f"train.epochs={epochs}", "--allow-change", "train.epochs"],
                              env=env, capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming at epoch {epochs}, step" in requeued.stdout
    assert calls.read_text().splitlines() == ["scancel --signal=USR1 4242", "requeue 4242"]  # not again
    rows = [row for row in read_metrics(run / "metrics.jsonl") if "event" not in row]  # not the allowed change
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
