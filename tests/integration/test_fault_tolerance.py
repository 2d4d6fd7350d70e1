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

from helpers import (SMALL_STEPS, TINY_RUN, LineReader, load_ckpt, metric_rows, progress_line, run_metrics,
                     same_state, start, train_args)
from mbv2train.config import load_config
from mbv2train.errors import CheckpointError, NonFiniteLoss
from mbv2train.faults import CRASH_EXIT_CODE, Faults
from mbv2train.preemption import Preempted
from mbv2train.train.trainer import fit


@pytest.fixture(scope="module")
def uninterrupted(image_root, tmp_path_factory):
    """The run the interrupted ones must end like: built once for the file, read-only."""
    run = tmp_path_factory.mktemp("uninterrupted") / "whole"
    fit(load_config(None, [*TINY_RUN, f"data.root={image_root}", f"train.output_dir={run}", *SMALL_STEPS]))
    return run


# ------------------------------------------------------------------------------------------ exact resume


def test_a_stop_mid_epoch_resumes_to_the_same_weights_and_rows(tiny_config, tmp_path, uninterrupted):
    run = tmp_path / "stopped"
    with pytest.raises(Preempted) as stopped:
        fit(tiny_config(*SMALL_STEPS, run_dir=run), faults=Faults(sigterm_at_step=5))
    assert stopped.value.exit_code == 143 and stopped.value.step == 5
    state = load_ckpt(run / "last.pt")
    assert state["epoch"] == 0 and state["epoch_progress"]["steps"] == 5 and state["global_step"] == 5
    fit(tiny_config(*SMALL_STEPS, run_dir=run), resume="auto")
    same_state(load_ckpt(uninterrupted / "last.pt"), load_ckpt(run / "last.pt"))
    assert metric_rows(run) == metric_rows(uninterrupted)


def test_step_checkpoints_are_written_inside_the_epoch(tiny_config, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Preempted):
        fit(tiny_config(*SMALL_STEPS, "train.checkpoint_every_steps=3", run_dir=run),
            faults=Faults(sigterm_at_step=4, crash_in_checkpoint=None))
    # step 3 wrote last.pt; the stop after step 4 moved it to previous.pt and wrote a new last.pt
    assert load_ckpt(run / "previous.pt")["global_step"] == 3
    assert load_ckpt(run / "last.pt")["global_step"] == 4


def test_a_stop_during_validation_redoes_only_the_validation(tiny_config, tmp_path, uninterrupted):
    run = tmp_path / "stopped"
    with pytest.raises(Preempted):
        fit(tiny_config(*SMALL_STEPS, run_dir=run), faults=Faults(sigterm_at_step=12))  # the epoch's last step
    state = load_ckpt(run / "last.pt")
    assert state["epoch"] == 0 and state["epoch_progress"]["steps"] == 12
    assert run_metrics(run) == []
    fit(tiny_config(*SMALL_STEPS, run_dir=run), resume="auto")
    same_state(load_ckpt(uninterrupted / "last.pt"), load_ckpt(run / "last.pt"))
    assert metric_rows(run) == metric_rows(uninterrupted)


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_loses_only_that_step(image_root, tmp_path, uninterrupted):
    # Any step must do, so draw one; 13 is left out because the step before it ends epoch 1, whose
    # last step is saved by the epoch's end save rather than a step save.
    step = random.Random().choice([s for s in range(2, 24) if s != 13])
    run = tmp_path / "killed"
    args = train_args(image_root, run, *SMALL_STEPS, "train.checkpoint_every_steps=1")
    # The victim hangs after computing `step`, before saving it; the line of the step before says that
    # step's checkpoint is written. The kill lands anywhere in between: mid-step or in the hang.
    victim = start(args + ["--fault", f"stall_at_step={step}"])
    out = LineReader(victim.stdout)
    out.wait_for(progress_line(step - 1))
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL, f"step {step}"
    state = load_ckpt(run / "last.pt")
    assert state["global_step"] == step - 1, f"step {step}"
    epoch, done = divmod(step - 1, 12)

    resumed = start(args + ["--resume", "auto"])
    resumed_out = LineReader(resumed.stdout)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert f"resuming at epoch {epoch + 1}, step {done}/12" in resumed_out.text(), f"step {step}"
    same_state(load_ckpt(uninterrupted / "last.pt"), load_ckpt(run / "last.pt"))
    assert metric_rows(run) == metric_rows(uninterrupted), f"killed at step {step}"


# ------------------------------------------------------------------------------------------ signals


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
    # 0.5 s per step: once step 1 is done, 11 s of training are left for the signal to land in
    process = start(args + ["--fault", "sleep_per_step=0.5"])
    out, err = LineReader(process.stdout), LineReader(process.stderr)
    out.wait_for(progress_line(1))
    os.killpg(process.pid, signal.SIGTERM)  # as a scheduler does: the workers get it too
    assert process.wait(timeout=120) == 143, err.text()
    assert "SIGTERM received: stopping after this step with a checkpoint" in err.text()
    assert "stopped by SIGTERM at step" in out.text() and "--resume auto" in out.text()
    assert processes_in_session(process.pid) == []  # no orphaned workers
    state = load_ckpt(run / "last.pt")
    assert state["epoch_progress"] is not None and 0 < state["global_step"] < 24
    resumed = start(args + ["--resume", "auto"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    same_state(load_ckpt(uninterrupted / "last.pt"), load_ckpt(run / "last.pt"))
    assert metric_rows(run) == metric_rows(uninterrupted)


@pytest.mark.slow
def test_a_second_sigint_aborts_at_once(image_root, tmp_path):
    run = tmp_path / "aborted"
    # Step 1 never reaches its checkpoint: after the first Ctrl-C only the second can end the run.
    process = start(train_args(image_root, run, *SMALL_STEPS) + ["--fault", "stall_at_step=1"])
    err = LineReader(process.stderr)
    wait_for(lambda: (run / "tb").exists(), process)
    os.killpg(process.pid, signal.SIGINT)
    # Two signals sent back to back can reach the process as one: send the second once the first is heard.
    err.wait_for("SIGINT received: stopping after this step with a checkpoint; Ctrl-C again stops at once")
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert err.text().strip().splitlines()[-1] == "error: interrupted; nothing was saved for the current step"
    assert not run.exists()  # nothing was saved at all: the run directory it had begun goes too


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


@pytest.mark.slow
@pytest.mark.parametrize("point, on_disk, resumed_at, says", [
    # where the 3rd save (step 6) dies: (last.pt, previous.pt) steps left, the step resumed from, and how
    ("mid_write", (4, 2), 6 - 2, "removed"),  # the half-written step 6 is lost, nothing else
    ("after_write", (4, 2), 6, "recovered"),  # step 6 was written in full: it must not be thrown away
    ("after_previous", (4, 4), 6, "recovered"),
    ("after_rename", (6, 4), 6, None),
])
def test_a_crash_at_any_point_of_a_save_keeps_a_last_checkpoint_and_loses_nothing_complete(
        image_root, tmp_path, uninterrupted, point, on_disk, resumed_at, says):
    run = tmp_path / "crashed"
    args = train_args(image_root, run, *SMALL_STEPS, "train.checkpoint_every_steps=2")
    crashed = start(args + ["--fault", "crash_in_checkpoint=3", "--fault", f"crash_point={point}"])
    assert crashed.wait(timeout=300) == CRASH_EXIT_CODE
    # last.pt always exists, so a plain `mbv2 train` into this folder is still refused
    assert (load_ckpt(run / "last.pt")["global_step"], load_ckpt(run / "previous.pt")["global_step"]) == on_disk
    leftovers = [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == (0 if point == "after_rename" else 1)

    resumed = start(args + ["--resume", "auto"])
    out = LineReader(resumed.stdout)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert f"resuming at epoch 1, step {resumed_at}/12" in out.text()
    if says:
        assert f"{says} {leftovers[0]}" in out.text()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    same_state(load_ckpt(uninterrupted / "last.pt"), load_ckpt(run / "last.pt"))
    assert metric_rows(run) == metric_rows(uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("point, missing", [("before_best_copy", ["best.pt", "epoch_1.pt"]),
                                            ("before_epoch_copy", ["epoch_1.pt"])])
def test_a_kill_between_last_and_its_copies_is_repaired_on_resume(image_root, tmp_path, point, missing):
    run = tmp_path / "run"
    args = train_args(image_root, run, "train.epochs=1", "train.save_every_epochs=1")
    crashed = start(args + ["--fault", "crash_in_checkpoint=1", "--fault", f"crash_point={point}"])
    assert crashed.wait(timeout=300) == CRASH_EXIT_CODE
    last = load_ckpt(run / "last.pt")
    assert (last["epoch"], last["best_epoch"]) == (1, 1)  # it says epoch 1 is the best ...
    assert [name for name in missing if (run / name).exists()] == []  # ... but the copies are not there

    resumed = start(args + ["--resume", "auto"])
    out = LineReader(resumed.stdout)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    for name in missing:
        assert f"{run / name} was behind the checkpoint resumed from" in out.text()
    for name in ("best.pt", "epoch_1.pt"):
        copy = load_ckpt(run / name)
        assert copy["epoch"] == 1 and copy["best_value"] == last["best_value"]
        assert all(torch.equal(copy["model"][k], last["model"][k]) for k in last["model"])


def test_a_stale_best_copy_is_rewritten_from_the_resumed_checkpoint(tiny_config, tmp_path):
    from mbv2train.checkpoint import save_checkpoint
    from mbv2train.train.run_state import restore_derived_copies

    fit(tiny_config("train.epochs=2"))
    run = tmp_path / "run"
    last, first = load_ckpt(run / "last.pt"), load_ckpt(run / "previous.pt")
    # As if epoch 2 was the best but the kill came before its copy: best.pt still holds epoch 1
    save_checkpoint({**last, "best_epoch": 2}, run / "last.pt")
    save_checkpoint(first, run / "best.pt")
    lines = restore_derived_copies(load_ckpt(run / "last.pt"), run, save_every_epochs=0, keep_checkpoints=3)
    assert lines == [f"{run / 'best.pt'} was behind the checkpoint resumed from (a save was interrupted); "
                     f"rewrote it for epoch 2"]
    assert load_ckpt(run / "best.pt")["epoch"] == 2
    # when best.pt is current, or the checkpoint was written mid-epoch, nothing is touched
    assert restore_derived_copies(load_ckpt(run / "last.pt"), run, save_every_epochs=0, keep_checkpoints=3) == []
    assert restore_derived_copies({**last, "epoch_progress": {"steps": 1}}, run, 0, 3) == []


def test_interrupted_writes_promote_only_a_complete_newer_checkpoint(tmp_path):
    from mbv2train.checkpoint import recover_interrupted_writes

    def state(step):
        return {"format_version": 1, "model": {"w": torch.full((2,), float(step))}, "global_step": step,
                "epoch": 0}

    torch.save(state(4), tmp_path / "last.pt")
    torch.save(state(2), tmp_path / "previous.pt")
    torch.save(state(6), tmp_path / ".last.pt.abc123.tmp")  # complete and newer: kept
    torch.save(state(3), tmp_path / ".last.pt.def456.tmp")  # complete but older: dropped
    (tmp_path / ".best.pt.ghi789.tmp").write_bytes(b"half a file")
    lines = recover_interrupted_writes(tmp_path)
    assert sorted(line.split()[0] for line in lines) == ["recovered", "removed", "removed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]
    saved = load_ckpt(tmp_path / "last.pt"), load_ckpt(tmp_path / "previous.pt")
    assert (saved[0]["global_step"], saved[1]["global_step"]) == (6, 4)


def test_a_damaged_last_checkpoint_does_not_push_out_a_good_previous_one(tmp_path):
    from mbv2train.checkpoint import recover_interrupted_writes

    good = {"format_version": 1, "model": {}, "global_step": 2, "epoch": 0}
    torch.save(good, tmp_path / "previous.pt")
    (tmp_path / "last.pt").write_bytes(b"truncated")
    torch.save({**good, "global_step": 4}, tmp_path / ".last.pt.abc123.tmp")
    recover_interrupted_writes(tmp_path)
    saved = load_ckpt(tmp_path / "last.pt"), load_ckpt(tmp_path / "previous.pt")
    assert (saved[0]["global_step"], saved[1]["global_step"]) == (4, 2)


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
    same_state(load_ckpt(uninterrupted / "last.pt"), load_ckpt(run / "last.pt"))


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
    assert torch.equal(load_ckpt(tmp_path / "last.pt")["w"], torch.zeros(10))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_previous_checkpoint_is_kept_beside_the_newest(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=2"))
    assert load_ckpt(tmp_path / "run" / "previous.pt")["epoch"] == 1
    assert load_ckpt(tmp_path / "run" / "last.pt")["epoch"] == 2


# ------------------------------------------------------------------------------------------ config vs checkpoint


def test_allow_change_accepts_a_change_and_records_it(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=1"))
    with pytest.raises(CheckpointError, match=r"train.epochs: 1 -> 2 .*--allow-change"):
        fit(tiny_config("train.epochs=2"), resume="auto")
    fit(tiny_config("train.epochs=2"), resume="auto", allow_changes=["train.epochs"])
    events = [r for r in run_metrics(tmp_path / "run") if "event" in r]
    assert events == [{"event": "allowed_change", "epoch": 1, "step": 3, "changes": ["train.epochs: 1 -> 2"]}]


def test_harmless_changes_resume_with_a_warning(tiny_config, tmp_path, capsys):
    with pytest.raises(Preempted):  # a run with a step left to train: a finished one is left as it is
        fit(tiny_config("train.epochs=1"), faults=Faults(sigterm_at_step=2))
    fit(tiny_config("train.epochs=1", "train.log_every_steps=7"), resume="auto")
    assert "resuming with a changed setting: train.log_every_steps: 1 -> 7" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ non-finite loss


def test_a_nan_loss_stops_before_the_optimizer_step(tiny_config, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 3"):
        fit(tiny_config(*SMALL_STEPS, "train.checkpoint_every_steps=1", run_dir=run),
            faults=Faults(nan_loss_at_step=3))
    state = load_ckpt(run / "last.pt")
    assert state["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_a_skipped_nan_step_changes_nothing_but_the_lr_keeps_its_curve(tiny_config, tmp_path):
    run, clean = tmp_path / "run", tmp_path / "clean"
    with pytest.raises(Preempted):
        fit(tiny_config(*SMALL_STEPS, "train.nonfinite=skip", "train.checkpoint_every_steps=1", run_dir=run),
            faults=Faults(nan_loss_at_step=3, sigterm_at_step=3))
    with pytest.raises(Preempted):  # the same run without the NaN, for the LR curve
        fit(tiny_config(*SMALL_STEPS, "train.nonfinite=skip", run_dir=clean), faults=Faults(sigterm_at_step=3))
    before, after = load_ckpt(run / "previous.pt"), load_ckpt(run / "last.pt")
    assert (before["global_step"], after["global_step"]) == (2, 3)
    for part in ("model", "ema"):  # BatchNorm statistics are buffers in "model": unchanged too
        assert all(torch.equal(before[part][k], after[part][k]) for k in before[part]), part
    momentum = [s["momentum_buffer"] for s in before["optimizer"]["state"].values()]
    assert momentum and all(torch.equal(m, after["optimizer"]["state"][i]["momentum_buffer"])
                            for i, m in zip(before["optimizer"]["state"], momentum))
    assert after["epoch_progress"]["nonfinite_skips"] == 1
    # the skipped step still used up its place on the LR curve: the schedule is where the clean run's is
    reference = load_ckpt(clean / "last.pt")
    assert after["scheduler"]["last_epoch"] == reference["scheduler"]["last_epoch"] == 3
    assert [g["lr"] for g in after["optimizer"]["param_groups"]] == \
        [g["lr"] for g in reference["optimizer"]["param_groups"]]
    assert after["optimizer"]["param_groups"][0]["lr"] != before["optimizer"]["param_groups"][0]["lr"]


def test_a_skipped_step_leaves_its_finite_micro_batches_out_of_the_epoch_sums(tiny_config, tmp_path):
    # With 2 micro-batches per step, step 3's first micro-batch is finite and its second is NaN: the
    # step is skipped whole, so neither micro-batch may count in train_loss or the seen-image count.
    run = tmp_path / "run"
    with pytest.raises(Preempted):
        fit(tiny_config(*SMALL_STEPS, "train.accum_steps=2", "train.nonfinite=skip",
                        "train.checkpoint_every_steps=1", run_dir=run),
            faults=Faults(nan_loss_at_step=3, nan_loss_micro_batch=2, sigterm_at_step=3))
    before, after = load_ckpt(run / "previous.pt")["epoch_progress"], load_ckpt(run / "last.pt")["epoch_progress"]
    assert (before["steps"], after["steps"]) == (2, 3)
    assert before["seen"] == after["seen"] == 2 * 2 * 2  # steps x micro-batches x batch size
    assert torch.equal(before["loss_sum"], after["loss_sum"])
    assert torch.equal(before["correct"], after["correct"])
    assert after["nonfinite_skips"] == 1


def test_skipped_steps_are_counted_and_too_many_in_a_row_abort(tiny_config, tmp_path):
    fit(tiny_config(*SMALL_STEPS, "train.nonfinite=skip", run_dir=tmp_path / "a"), faults=Faults(nan_loss_at_step=3))
    first = run_metrics(tmp_path / "a")[0]
    assert first["nonfinite_skips"] == 1
    with pytest.raises(NonFiniteLoss, match="3 non-finite losses in a row"):
        fit(tiny_config(*SMALL_STEPS, "train.nonfinite=skip", "train.max_nonfinite_skips=3",
                        run_dir=tmp_path / "b"), faults=Faults(nan_loss_from_step=2))


def test_an_fp16_scaler_skip_is_counted_and_changes_nothing():
    from mbv2train.model import MobileNetV2
    from mbv2train.train.step_guard import optimizer_step

    model = MobileNetV2(num_classes=3, width_mult=0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(2, 3, 16, 16)).sum()).backward()
    for p in model.parameters():
        p.grad.fill_(float("inf"))  # as an fp16 overflow leaves them
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert bool(optimizer_step(model.parameters(), optimizer, scaler, clip_norm=None))  # the flag the epoch counts
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
    assert load_ckpt(run / "previous.pt")["global_step"] == 3
    assert load_ckpt(run / "previous.pt")["epoch_progress"]["steps"] == 3
