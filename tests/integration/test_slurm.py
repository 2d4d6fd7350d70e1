"""scripts/slurm/train.sbatch, run by bash with fake srun, scontrol and scancel on PATH and real torchrun:
SIGUSR1 before the time limit -> a checkpoint -> exactly one requeue -> exit 0, and the requeued job resumes;
anything else (a mistake, a crash after the signal) is not requeued and ends the job with the training's code."""

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, TINY_RUN, LineReader, run_ckpt, run_metrics, wait_until, worker_pids

SCRIPT = REPO / "scripts" / "slurm" / "train.sbatch"

FAKES = {
    # srun: drop its own options, remember the step's process, run the command (its output is the job log's)
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\necho $$ > "$FAKE_SLURM/step.pid"\nexec "$@"\n',
    "scontrol": '#!/bin/bash\ncase "$1" in\n  show) echo localhost ;;\n'
                '  requeue) echo "requeue $2" >> "$FAKE_SLURM/calls" ;;\n  *) exit 1 ;;\nesac\n',
    # scancel --signal: SLURM signals every process of the job's steps (its process tracking follows the
    # step's whole process tree), so torchrun's workers get the signal as well as torchrun
    "scancel": f"""#!{sys.executable}
import os, signal, sys
from pathlib import Path

folder = Path(os.environ["FAKE_SLURM"])
with open(folder / "calls", "a") as calls:
    calls.write("scancel " + " ".join(sys.argv[1:]) + "\\n")
parents = {{}}
for entry in Path("/proc").iterdir():
    try:
        parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        pass
step = {{int((folder / "step.pid").read_text())}}
while True:
    children = {{pid for pid, parent in parents.items() if parent in step}} - step
    if not children:
        break
    step |= children
for pid in step:
    try:
        os.kill(pid, getattr(signal, "SIG" + sys.argv[1].split("=", 1)[1]))
    except ProcessLookupError:
        pass
""",
}


def test_the_sbatch_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_sbatch_script_passes_shellcheck():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def fake_slurm(tmp_path: Path, processes: int = 2) -> dict[str, str]:
    """The environment of a one-node SLURM job 4242 with ``processes`` (CPU) processes, the fakes first on PATH."""
    folder = tmp_path / "fake_slurm"
    (folder / "bin").mkdir(parents=True)
    for name, body in FAKES.items():
        path = folder / "bin" / name
        path.write_text(body)
        path.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.pathsep.join([str(folder / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]])
    return {**os.environ, "PATH": path, "FAKE_SLURM": str(folder), "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", "MBV2_GPUS_PER_NODE": str(processes),
            "MBV2_RDZV_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def sbatch_args(image_root, run: Path, *overrides: str) -> list[str]:
    args = ["--data", str(image_root), "--output-dir", str(run)]
    for item in [*TINY_RUN, "data.batch_size=4", "optim.lr=0.01", *overrides]:
        args += ["--set", item]
    return args


def slurm_calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "fake_slurm" / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


def end_the_job(job: subprocess.Popen, tmp_path: Path) -> None:
    """Leave nothing running after a failed test: torchrun and its workers outlive bash."""
    if job.poll() is not None:
        return
    step = tmp_path / "fake_slurm" / "step.pid"
    agent = int(step.read_text()) if step.exists() else None
    for pid in [*(worker_pids(agent).values() if agent else []), *([agent] if agent else [])]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.kill()


# The job's working directory (sbatch's submit directory) holds the job's status file, as on a cluster.

@pytest.mark.slow
def test_sigusr1_before_the_time_limit_checkpoints_requeues_once_and_the_requeued_job_resumes(image_root, tmp_path):
    env, run = fake_slurm(tmp_path), tmp_path / "run"
    # far more epochs than can run before the signal lands: the run is certainly unfinished when it stops
    job = subprocess.Popen(["bash", str(SCRIPT), *sbatch_args(image_root, run, "train.epochs=50",
                                                               "train.checkpoint_every_steps=1")],
                           env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = LineReader(job.stdout), LineReader(job.stderr)
    try:
        wait_until(lambda: (run / "last.pt").exists(), "the first checkpoint")
        job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` does
        assert job.wait(timeout=300) == 0, err.text()[-3000:]
    finally:
        end_the_job(job, tmp_path)
    stdout, stderr = out.text(), err.text()
    stopped = run_ckpt(run)
    assert stopped["epoch"] < 50
    assert f"stopped by SIGUSR1 at step {stopped['global_step']}" in stdout
    # the training's own exit code (128 + SIGUSR1) in the job log, then the requeue
    assert "train.sbatch: the training's exit code: 138 (stopped by SIGUSR1 at step " in stderr
    assert "train.sbatch: requeueing job 4242" in stderr
    assert slurm_calls(tmp_path) == ["scancel --signal=USR1 4242", "requeue 4242"]
    # a clean stop is not reported as a failure: no traceback from torchrun, no failed process
    assert "Traceback" not in stderr
    assert "exitcode" not in stderr

    # the requeued job: the same script and arguments, here with the run cut short to the stopped epoch
    epochs = stopped["epoch"] + 1
    requeued = subprocess.run(["bash", str(SCRIPT), *sbatch_args(image_root, run, "train.epochs=50",
                                                                  "train.checkpoint_every_steps=1"),
                               "--set", f"train.epochs={epochs}", "--allow-change", "train.epochs"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming at epoch {epochs}, step" in requeued.stdout
    assert "train.sbatch: the training's exit code: 0" in requeued.stderr
    assert slurm_calls(tmp_path) == ["scancel --signal=USR1 4242", "requeue 4242"]  # not again
    rows = [row for row in run_metrics(run) if "event" not in row]  # not the allowed change
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))


@pytest.mark.slow
def test_a_config_mistake_ends_the_job_with_the_trainings_exit_code_2(image_root, tmp_path):
    env, run = fake_slurm(tmp_path), tmp_path / "run"
    job = subprocess.run(["bash", str(SCRIPT), *sbatch_args(image_root, run, "train.epochs=x")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert job.returncode == 2, job.stderr[-3000:]
    assert "train.sbatch: the training's exit code: 2 (error: --set train.epochs=x: " in job.stderr
    assert slurm_calls(tmp_path) == []


@pytest.mark.slow
def test_a_crash_after_the_warning_signal_is_not_requeued_and_fails_the_job(image_root, tmp_path):
    env, run = fake_slurm(tmp_path, processes=1), tmp_path / "run"
    # the run hangs after step 2, before its checkpoint: the warning is heard, then the process dies
    job = subprocess.Popen(["bash", str(SCRIPT), *sbatch_args(image_root, run, "train.epochs=50",
                                                               "train.checkpoint_every_steps=1"),
                            "--fault", "stall_at_step=2"],
                           env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    LineReader(job.stdout)  # read, so that a full pipe cannot block the job
    err = LineReader(job.stderr)
    try:
        wait_until(lambda: (run / "last.pt").exists(), "the first checkpoint")
        job.send_signal(signal.SIGUSR1)
        err.wait_for("SIGUSR1 received: stopping after this step")
        agent = int((tmp_path / "fake_slurm" / "step.pid").read_text())
        os.kill(wait_until(lambda: worker_pids(agent).get(0), "the training process"), signal.SIGKILL)
        code = job.wait(timeout=300)
    finally:
        end_the_job(job, tmp_path)
    stderr = err.text()
    assert code == 1, stderr[-3000:]
    assert slurm_calls(tmp_path) == ["scancel --signal=USR1 4242"]  # no requeue
    assert "train.sbatch: the training left no status" in stderr
    assert "not requeued" in stderr
    assert run_ckpt(run)["global_step"] == 1  # the stop saved nothing


@pytest.mark.slow
def test_a_cpu_node_without_gpus_runs_one_process_unless_told_more(image_root, tmp_path):
    # `sbatch --gpus-per-node=0` on a CPU node: SLURM counts no GPUs on the node
    env, run = fake_slurm(tmp_path), tmp_path / "run"
    del env["MBV2_GPUS_PER_NODE"]
    env["SLURM_GPUS_ON_NODE"] = "0"
    job = subprocess.run(["bash", str(SCRIPT), *sbatch_args(image_root, run, "train.epochs=1")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "cpu x 1 |" in job.stdout
