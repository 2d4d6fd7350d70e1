import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import LineReader, metric_rows, run_ckpt, run_metrics, torchrun, train_args


def test_train_command_runs_and_prints_epoch_lines(cli, image_root, tmp_path):
    result = cli(*train_args(image_root, tmp_path / "run", "train.epochs=1"))
    assert result.exit_code == 0, result.output
    assert "epoch 1 | train_loss" in result.stdout
    assert "mbv2 eval --ckpt" in result.stdout
    assert len(run_metrics(tmp_path / "run")) == 1


def test_the_start_line_counts_one_step_in_the_singular(cli, image_root, tmp_path):
    # 3 classes of 8 training images: one batch of 24 is the whole epoch
    result = cli(*train_args(image_root, tmp_path / "run", "train.epochs=1", "data.batch_size=24"))
    assert result.exit_code == 0, result.output
    assert "| 3 classes | 1 step/epoch of 24 images |" in result.stdout


def test_data_option_sets_the_root_and_output_dir_the_run(cli, image_root, tmp_path):
    result = cli(*train_args(image_root, tmp_path / "here", "train.epochs=1"))
    assert result.exit_code == 0, result.output
    saved = (tmp_path / "here" / "config.yaml").read_text()
    assert f"root: {image_root}" in saved


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("flat_val", "no class folders"),
    ("no_classes", "has no class subfolders"),
    ("class_mismatch", "class folders differ"),
    ("empty_class", "has no images"),
])
def test_bad_data_folders_exit_2_with_one_line(cli, image_root, tmp_path, layout, message):
    import shutil

    root = tmp_path / "data"
    if layout != "missing":
        shutil.copytree(image_root, root)
    if layout == "flat_val":
        for png in (root / "val").rglob("*.png"):
            png.rename(root / "val" / f"{png.parent.name}_{png.name}")
        for folder in [p for p in (root / "val").iterdir() if p.is_dir()]:
            folder.rmdir()
    elif layout == "no_classes":
        shutil.rmtree(root / "val")
        (root / "val").mkdir()
    elif layout == "class_mismatch":
        (root / "val" / "triangle").rename(root / "val" / "hexagon")
    elif layout == "empty_class":
        for png in (root / "train" / "square").glob("*.png"):
            png.unlink()
    result = cli(*train_args(root, tmp_path / "run"))
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    if layout == "flat_val":
        assert "prepare_imagenet_val.py" in lines[0]


def test_too_few_images_for_a_batch_exits_2(cli, image_root, tmp_path):
    result = cli(*train_args(image_root, tmp_path / "run", "data.batch_size=64"))
    assert result.exit_code == 2
    assert "fewer than one batch" in result.stderr


def test_no_data_at_all_exits_2(cli, tmp_path):
    result = cli("train", "--output-dir", tmp_path / "run", "--set", "data.num_workers=0")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: no training data: set data.root or --data DIR"


def test_demo_data_command_writes_the_digits(cli, tmp_path):
    result = cli("data", "demo", tmp_path / "digits")
    assert result.exit_code == 0, result.output
    assert "1437 train / 360 val images, 10 classes" in result.stdout
    again = cli("data", "demo", tmp_path / "digits")
    assert "already there" in again.stdout


def run_train(args, stdout=subprocess.PIPE):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mbv2train", *args], env=env, stdout=stdout,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_sigkill_after_an_epoch_then_resume_auto_equals_an_uninterrupted_run(image_root, tmp_path):
    extra = ["train.epochs=3", "data.batch_size=2", "train.ema=true"]
    whole = run_train(train_args(image_root, tmp_path / "whole", *extra), stdout=subprocess.DEVNULL)
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    run = tmp_path / "killed"
    args = train_args(image_root, run, *extra)
    # The epoch line comes after epoch 1's checkpoint; the victim then hangs in step 2 of epoch 2
    # (step 14), so the kill cannot come after the run ended, nor after another checkpoint.
    victim = run_train(args + ["--fault", "stall_at_step=14"])
    LineReader(victim.stdout).wait_for("epoch 1 | train_loss")
    os.killpg(victim.pid, signal.SIGKILL)  # the whole group, workers included, with no chance to clean up
    assert victim.wait(timeout=60) == -signal.SIGKILL
    saved = run_ckpt(run)
    assert (saved["epoch"], saved["epoch_progress"]) == (1, None)
    assert len(run_metrics(run)) == 1

    resumed = run_train([*args, "--resume", "auto"])
    out = LineReader(resumed.stdout)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert "resuming at epoch 2, step 0/12" in out.text()
    a = run_ckpt(tmp_path / "whole")
    b = run_ckpt(run)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for key in a["optimizer"]["state"]:
        for name, value in a["optimizer"]["state"][key].items():
            assert torch.equal(value, b["optimizer"]["state"][key][name])
    rows_a = metric_rows(tmp_path / "whole")
    rows_b = metric_rows(run)
    assert rows_a == rows_b and len(rows_b) == 3


@pytest.mark.slow
def test_torchrun_with_two_processes_counts_every_val_image_once(image_root, tmp_path):
    run = tmp_path / "ddp"
    args = train_args(image_root, run, "data.batch_size=4", "train.ema=true")
    result = torchrun(args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = run_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]  # one writer: rank 0
    assert all(r["val_images"] == 12 and r["ema_val_images"] == 12 for r in rows)
    state = run_ckpt(run)
    assert state["world_size"] == 2
    assert state["global_step"] == 2 * (24 // 2 // 4)  # each rank sees half the images per epoch
    assert result.stdout.count("epoch 2 | train_loss") == 1


@pytest.fixture
def uneven_val_root(image_root, tmp_path):
    """image_root with 11 val images: with 2 processes and val batches of 5, rank 0 has 6 images in 2
    batches and rank 1 has 5 in 1 batch."""
    import shutil

    root = shutil.copytree(image_root, tmp_path / "uneven")
    (root / "val" / "circle" / "000.png").unlink()
    return root


@pytest.mark.slow
def test_torchrun_with_uneven_validation_shards_finishes_and_resumes_after_a_stop_in_validation(
        uneven_val_root, tmp_path):
    settings = ["data.batch_size=4", "data.val_batch_size=5", "train.ema=true"]
    whole = train_args(uneven_val_root, tmp_path / "whole", *settings)
    result = torchrun(whole)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = metric_rows(tmp_path / "whole")
    assert [(r["epoch"], r["val_images"], r["ema_val_images"]) for r in expected] == [(1, 11, 11), (2, 11, 11)]

    # Batch 1 is one both ranks have: they agree to stop inside the pass. Batch 2 only rank 0 has: it
    # cannot ask rank 1, so the stop waits for the next question both ranks ask.
    for batch in (1, 2):
        run = tmp_path / f"stopped_at_{batch}"
        args = train_args(uneven_val_root, run, *settings)
        stopped = torchrun(args, f"sigterm_at_val_batch={batch}")
        assert stopped.returncode != 0 and "stopped by SIGTERM at step 3" in stopped.stdout, stopped.stderr[-3000:]
        assert "SIGTERM received" in stopped.stderr
        state = run_ckpt(run)
        assert state["global_step"] == 3 and state["epoch"] == 0  # epoch 1's training, its validation to redo
        resumed = torchrun([*args, "--resume", "auto"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert metric_rows(run) == expected, f"batch {batch}"


@pytest.mark.slow
def test_torchrun_ranks_agree_on_skipping_a_nan_seen_by_one_rank(image_root, tmp_path):
    # Only rank 1 sees the NaN. If it alone skipped its backward pass, rank 0 would wait forever in
    # DDP's gradient all-reduce; the ranks must skip the step together and go on.
    run = tmp_path / "ddp"
    args = train_args(image_root, run, "data.batch_size=4", "train.nonfinite=skip", "train.epochs=1")
    result = torchrun(args, "nan_loss_at_step=2", "nan_loss_rank=1")
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = run_metrics(run)
    assert row["nonfinite_skips"] == 1
    state = run_ckpt(run)
    assert state["global_step"] == 24 // 2 // 4
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_torchrun_a_nan_under_raise_stops_every_process_at_the_same_step_with_one_line(image_root, tmp_path):
    # 2 images per micro-batch, 2 micro-batches per step: 3 steps per epoch, and no log step in it. Rank 0's
    # progress line comes after 4 micro-batches (step 2), on rank 0 only: the processes must not stop there,
    # but at the epoch's end, which every one of them reaches. Only rank 1 meets the NaN, in micro-batch 1.
    run = tmp_path / "ddp"
    args = train_args(image_root, run, "data.batch_size=2", "train.accum_steps=2", "train.log_every_steps=4",
                      "train.epochs=1")
    result = torchrun(args, "nan_loss_at_step=1", "nan_loss_rank=1", "nan_loss_micro_batch=1")
    assert result.returncode != 0
    # one line, and none from a process that failed waiting for another
    assert error_lines(result) == ["error: non-finite loss at step 1 (epoch 1); the last checkpoint holds "
                                   "finite weights"], result.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_lines_every_process_would_print_come_once_per_job(image_root, tmp_path):
    run = tmp_path / "ddp"
    args = train_args(image_root, run, "data.batch_size=2", "train.epochs=1")
    stopped = torchrun(args, "sigterm_at_step=2")  # every process signals itself: all stop after step 3
    assert stopped.stdout.count("stopped by SIGTERM at step 3; checkpoint ") == 1, stopped.stdout
    assert stopped.stdout.count("resume with: ") == 1
    again = torchrun(args)  # a mistake every process meets: the run directory is taken
    assert again.returncode != 0
    assert error_lines(again) == [f"error: {run} already holds a run (last.pt); continue it with --resume auto "
                                  f"or choose another --output-dir"], again.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_a_failure_only_one_process_meets_is_still_reported(image_root, tmp_path):
    import shutil

    root = shutil.copytree(image_root, tmp_path / "data")
    bad = root / "val" / "circle" / "001.png"  # validation image 1: rank 1's shard alone
    bad.write_text("not an image")
    result = torchrun(train_args(root, tmp_path / "ddp", "data.batch_size=4", "train.epochs=1"))
    assert result.returncode != 0
    assert f"error: cannot read image {bad}: cannot identify image file '{bad}'" in error_lines(result), \
        result.stderr[-3000:]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_unreadable_image_stops_the_run_with_its_path(cli, image_root, tmp_path, workers):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    bad = root / "train" / "square" / "999.png"
    bad.write_text("not an image")
    result = cli(*train_args(root, tmp_path / "run", f"data.num_workers={workers}"))
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[-1] == f"error: cannot read image {bad}: cannot identify image file '{bad}'"
    # on a machine with fewer CPUs than workers, the only other line is the note that says so
    assert all("CPUs are available" in line for line in lines[:-1]), lines


def test_an_output_dir_that_cannot_be_created_exits_2(cli, image_root, tmp_path):
    (tmp_path / "a_file").write_text("")
    result = cli(*train_args(image_root, tmp_path / "a_file" / "run"))
    assert result.exit_code == 2
    assert "train.output_dir: cannot create" in result.stderr


def snapshot(folder):
    """Every file and folder under ``folder``: each file's bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "folder"
            for p in folder.rglob("*")}


def test_resuming_a_finished_run_says_so_in_one_line_and_leaves_it_untouched(cli, image_root, tmp_path):
    run = tmp_path / "run"
    first = cli(*train_args(image_root, run, "train.epochs=1"), "--resume", "auto")
    assert first.exit_code == 0, first.output
    best = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["val_top1"]
    before = snapshot(run)
    again = cli(*train_args(image_root, run, "train.epochs=1"), "--resume", "auto")
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines() == [
        f"nothing to train: {run} already finished its 1 epoch; best val_top1 {best:.4f} (epoch 1) "
        f"in {run / 'best.pt'}"]
    assert again.stderr == ""
    assert snapshot(run) == before  # config.yaml, TensorBoard, metrics, checkpoints: not a byte or a time changed
