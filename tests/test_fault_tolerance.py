"""Runs that are interrupted, crash mid-write, meet a NaN or a damaged checkpoint, and their resumes."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN
from mbv2train.errors import CheckpointError, NonFiniteLoss
from mbv2train.faults import Faults
from mbv2train.preemption import Preempted
from mbv2train.tracking import read_metrics
from mbv2train.trainer import fit, without_timing

# 2 images per step, 12 steps per epoch: room to stop mid-epoch.
SMALL_STEPS = ["data.batch_size=2", "train.ema=true", "train.epochs=2"]


def same_state(a: dict, b: dict) -> None:
    """Model, EMA and optimizer state of two checkpoints are bit-identical."""
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    for index, values in a["optimizer"]["state"].items():
        for name, value in values.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), f"optimizer {index}.{name}"
    assert a["global_step"] == b["global_step"]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def rows(run: Path) -> list[dict]:
    return [without_timing(r) for r in read_metrics(run / "metrics.jsonl")]


@pytest.fixture
def uninterrupted(tiny_config, tmp_path):
    fit(tiny_config(*SMALL_STEPS, run_dir=tmp_path / "whole"))
    return tmp_path / "whole"


# ------------------------------------------------------------------------------------------ exact resume


def test_a_stop_mid_epoch_resumes_to_the_same_weights_and_rows(tiny_config, tmp_path, uninterrupted):
    run = tmp_path / "stopped"
    with pytest.raises(Preempted) as stopped:
        fit(tiny_config(*SMALL_STEPS, run_dir=run), faults=Faults(sigterm_at_step=5))
    assert stopped.value.exit_code == 143 and stopped.value.step == 5
    state = load(run / "last.pt")
    assert state["epoch"] == 0 and state["epoch_progress"]["steps"] == 5 and state["global_step"] == 5
    fit(tiny_config(*SMALL_STEPS, run_dir=run), resume="auto")
    same_state(load(uninterrupted / "last.pt"), load(run / "last.pt"))
    assert rows(run) == rows(uninterrupted)


def test_step_checkpoints_are_written_inside_the_epoch(tiny_config, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Preempted):
        fit(tiny_config(*SMALL_STEPS, "train.checkpoint_every_steps=3", run_dir=run),
            faults=Faults(sigterm_at_step=4, crash_in_checkpoint=None))
    # step 3 wrote last.pt; the stop after step 4 moved it to previous.pt and wrote a new last.pt
    assert load(run / "previous.pt")["global_step"] == 3
    assert load(run / "last.pt")["global_step"] == 4


def test_a_stop_during_validation_redoes_only_the_validation(tiny_config, tmp_path, uninterrupted):
    run = tmp_path / "stopped"
    with pytest.raises(Preempted):
        fit(tiny_config(*SMALL_STEPS, run_dir=run), faults=Faults(sigterm_at_step=12))  # the epoch's last step
    state = load(run / "last.pt")
    assert state["epoch"] == 0 and state["epoch_progress"]["steps"] == 12
    assert read_metrics(run / "metrics.jsonl") == []
    fit(tiny_config(*SMALL_STEPS, run_dir=run), resume="auto")
    same_state(load(uninterrupted / "last.pt"), load(run / "last.pt"))
    assert rows(run) == rows(uninterrupted)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_equal_weights(image_root, tmp_path, uninterrupted):
    run = tmp_path / "killed"
    args = train_args(image_root, run, *SMALL_STEPS, "train.checkpoint_every_steps=1")
    delay = random.Random().uniform(1.0, 3.0)
    victim = start(args + ["--fault", "sleep_per_step=0.1"])
    wait_for(lambda: (run / "last.pt").exists(), victim)
    time.sleep(delay)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    resumed = start(args + ["--resume", "auto"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    same_state(load(uninterrupted / "last.pt"), load(run / "last.pt"))
    assert rows(run) == rows(uninterrupted), f"killed after {delay:.2f}s"


# ------------------------------------------------------------------------------------------ signals


def train_args(image_root, run, *extra):
    args = ["train", "--data", str(image_root), "--output-dir", str(run)]
    for item in [*TINY_RUN, *extra]:
        args += ["--set", item]
    return args


def start(args):
    return subprocess.Popen([sys.executable, "-m", "mbv2train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(condition, process, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def processes_in_session(sid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: the session id
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_at_a_step_and_exits_143(image_root, tmp_path, uninterrupted):
    run = tmp_path / "preempted"
    args = train_args(image_root, run, *SMALL_STEPS, "data.num_workers=2", "train.log_every_steps=1")
    process = start(args + ["--fault", "sleep_per_step=0.2"])
    wait_for(lambda: (run / "tb").exists(), process)
    time.sleep(1.5)
    os.killpg(process.pid, signal.SIGTERM)  # as a scheduler does: the workers get it too
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "stopped by SIGTERM at step" in out and "--resume auto" in out
    assert processes_in_session(process.pid) == []  # no orphaned workers
    state = load(run / "last.pt")
    assert state["epoch_progress"] is not None and 0 < state["global_step"] < 24
    resumed = start(args + ["--resume", "auto"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    same_state(load(uninterrupted / "last.pt"), load(run / "last.pt"))
    assert rows(run) == rows(uninterrupted)


@pytest.mark.slow
def test_a_second_sigint_aborts_at_once(image_root, tmp_path):
    run = tmp_path / "aborted"
    process = start(train_args(image_root, run, *SMALL_STEPS) + ["--fault", "sleep_per_step=2"])
    wait_for(lambda: (run / "tb").exists(), process)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == "error: interrupted; nothing was saved for the current step"
    assert not (run / "last.pt").exists()


def test_the_signal_handler_only_sets_a_flag():
    from mbv2train.preemption import StopFlag

    flag = StopFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag and flag.name() == "SIGUSR1"
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


# ------------------------------------------------------------------------------------------ checkpoint safety


def test_a_crash_mid_write_keeps_the_previous_checkpoint_and_is_cleaned_up(image_root, tmp_path):
    run = tmp_path / "crashed"
    args = train_args(image_root, run, *SMALL_STEPS, "train.checkpoint_every_steps=2")
    crashed = start(args + ["--fault", "crash_in_checkpoint=3"])
    assert crashed.wait(timeout=120) == 86
    leftovers = [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1
    assert load(run / "last.pt")["global_step"] == 4  # the second write, intact
    resumed = start(args + ["--resume", "auto"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0
    assert f"removed {leftovers[0]}" in out
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_resume_auto_skips_a_corrupt_newest_checkpoint(tiny_config, tmp_path, uninterrupted, capsys):
    run = tmp_path / "damaged"
    with pytest.raises(Preempted):
        fit(tiny_config(*SMALL_STEPS, "train.checkpoint_every_steps=2", run_dir=run),
            faults=Faults(sigterm_at_step=6))
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:5000])  # truncated
    fit(tiny_config(*SMALL_STEPS, "train.checkpoint_every_steps=2", run_dir=run), resume="auto")
    out = capsys.readouterr().out
    assert f"skipping a checkpoint: checkpoint is corrupt or truncated: {run / 'last.pt'}" in out
    assert f"resuming from {run / 'previous.pt'}" in out
    same_state(load(uninterrupted / "last.pt"), load(run / "last.pt"))


def test_a_full_disk_names_the_folder_and_leaves_the_previous_checkpoint(tmp_path):
    # RLIMIT_FSIZE makes the write fail the way a full disk does (torch raises RuntimeError, not OSError)
    script = f"""
import resource, signal, torch
from pathlib import Path
from mbv2train.checkpoint import save_checkpoint
from mbv2train.errors import CheckpointError
path = Path({str(tmp_path)!r}) / "last.pt"
save_checkpoint({{"w": torch.zeros(10)}}, path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    save_checkpoint({{"w": torch.zeros(1_000_000)}}, path)
except CheckpointError as exc:
    print(exc)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"cannot write last.pt in {tmp_path}" in result.stdout and "previous checkpoint is intact" in result.stdout
    assert torch.equal(load(tmp_path / "last.pt")["w"], torch.zeros(10))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_previous_checkpoint_is_kept_beside_the_newest(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=2"))
    assert load(tmp_path / "run" / "previous.pt")["epoch"] == 1
    assert load(tmp_path / "run" / "last.pt")["epoch"] == 2


# ------------------------------------------------------------------------------------------ config vs checkpoint


def test_allow_change_accepts_a_change_and_records_it(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=1"))
    with pytest.raises(CheckpointError, match=r"train.epochs: 1 -> 2 .*--allow-change"):
        fit(tiny_config("train.epochs=2"), resume="auto")
    fit(tiny_config("train.epochs=2"), resume="auto", allow_changes=["train.epochs"])
    events = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "event" in r]
    assert events == [{"event": "allowed_change", "epoch": 1, "step": 3, "changes": ["train.epochs: 1 -> 2"]}]


def test_harmless_changes_resume_with_a_warning(tiny_config, tmp_path, capsys):
    fit(tiny_config("train.epochs=1"))
    fit(tiny_config("train.epochs=1", "train.log_every_steps=7"), resume="auto")
    assert "resuming with a changed setting: train.log_every_steps: 1 -> 7" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ non-finite loss


def test_a_nan_loss_stops_before_the_optimizer_step(tiny_config, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 3"):
        fit(tiny_config(*SMALL_STEPS, "train.checkpoint_every_steps=1", run_dir=run),
            faults=Faults(nan_loss_at_step=3))
    state = load(run / "last.pt")
    assert state["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_a_skipped_nan_step_changes_nothing(tiny_config, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Preempted):
        fit(tiny_config(*SMALL_STEPS, "train.nonfinite=skip", "train.checkpoint_every_steps=1", run_dir=run),
            faults=Faults(nan_loss_at_step=3, sigterm_at_step=3))
    before, after = load(run / "previous.pt"), load(run / "last.pt")
    assert (before["global_step"], after["global_step"]) == (2, 3)
    for part in ("model", "ema"):
        assert all(torch.equal(before[part][k], after[part][k]) for k in before[part]), part
    assert after["epoch_progress"]["nonfinite_skips"] == 1


def test_a_skipped_step_leaves_its_finite_micro_batches_out_of_the_epoch_sums(tiny_config, tmp_path):
    # With 2 micro-batches per step, step 3's first micro-batch is finite and its second is NaN: the
    # step is skipped whole, so neither micro-batch may count in train_loss or the seen-image count.
    run = tmp_path / "run"
    with pytest.raises(Preempted):
        fit(tiny_config(*SMALL_STEPS, "train.accum_steps=2", "train.nonfinite=skip",
                        "train.checkpoint_every_steps=1", run_dir=run),
            faults=Faults(nan_loss_at_step=3, nan_loss_micro_batch=2, sigterm_at_step=3))
    before, after = load(run / "previous.pt")["epoch_progress"], load(run / "last.pt")["epoch_progress"]
    assert (before["steps"], after["steps"]) == (2, 3)
    assert before["seen"] == after["seen"] == 2 * 2 * 2  # steps x micro-batches x batch size
    assert torch.equal(before["loss_sum"], after["loss_sum"])
    assert torch.equal(before["correct"], after["correct"])
    assert after["nonfinite_skips"] == 1


def test_skipped_steps_are_counted_and_too_many_in_a_row_abort(tiny_config, tmp_path):
    fit(tiny_config(*SMALL_STEPS, "train.nonfinite=skip", run_dir=tmp_path / "a"), faults=Faults(nan_loss_at_step=3))
    first = read_metrics(tmp_path / "a" / "metrics.jsonl")[0]
    assert first["nonfinite_skips"] == 1
    with pytest.raises(NonFiniteLoss, match="3 non-finite losses in a row"):
        fit(tiny_config(*SMALL_STEPS, "train.nonfinite=skip", "train.max_nonfinite_skips=3",
                        run_dir=tmp_path / "b"), faults=Faults(nan_loss_from_step=2))


def test_an_fp16_scaler_skip_is_counted_and_changes_nothing():
    from mbv2train.engine import _optimizer_step
    from mbv2train.model import MobileNetV2

    model = MobileNetV2(num_classes=3, width_mult=0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(2, 3, 16, 16)).sum()).backward()
    for p in model.parameters():
        p.grad.fill_(float("inf"))  # as an fp16 overflow leaves them
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert _optimizer_step(model, optimizer, scaler, clip_norm=None) == 1
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_bad_fault_option_is_one_line(cli):
    result = cli("train", "--fault", "explode=1")
    assert result.exit_code == 2
    assert "--fault explode=1: expected one of" in result.stderr


def test_minute_checkpoints_are_written_inside_the_epoch(tiny_config, tmp_path):
    run = tmp_path / "run"
    # 0.001 minutes = 60 ms, shorter than one step with the injected sleep: every step is due
    with pytest.raises(Preempted):
        fit(tiny_config(*SMALL_STEPS, "train.checkpoint_every_minutes=0.001", run_dir=run),
            faults=Faults(sleep_per_step=0.1, sigterm_at_step=4))
    assert load(run / "previous.pt")["global_step"] == 3
    assert load(run / "previous.pt")["epoch_progress"]["steps"] == 3
