import io
import json
from contextlib import redirect_stdout

import pytest

from helpers import read_events, run_metrics
from mbv2train.progress import Progress
from mbv2train.train.tracking import read_metrics, truncate_metrics
from mbv2train.train.trainer import fit


def test_tensorboard_holds_epoch_and_step_scalars_images_and_hparams(tiny_config, tmp_path):
    fit(tiny_config("train.ema=true"))
    events = read_events(tmp_path / "run")
    scalars = set(events.Tags()["scalars"])
    for name in ("train_loss", "train_top1", "lr", "img_per_s", "data_time_frac", "val_loss", "val_top1",
                 "val_top5", "ema_val_top1", "ema_val_top5"):
        assert f"epoch/{name}" in scalars, name
    assert {"step/loss", "step/lr"} <= scalars
    rows = run_metrics(tmp_path / "run")
    logged = [(e.step, e.value) for e in events.Scalars("epoch/val_top1")]
    assert logged == [(r["step"], pytest.approx(r["val_top1"])) for r in rows]
    assert len(events.Scalars("step/lr")) == rows[-1]["step"]  # log_every_steps=1
    assert events.Tags()["images"] == ["train/augmented_images"]
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")


def test_resumed_run_does_not_fork_its_curves(tiny_config, tmp_path):
    run = tmp_path / "run"
    fit(tiny_config("train.epochs=3", "train.save_every_epochs=1"))
    fit(tiny_config("train.epochs=3", "train.save_every_epochs=1"), resume=str(run / "epoch_1.pt"))
    steps = [e.step for e in read_events(run).Scalars("epoch/val_top1")]
    assert steps == sorted(set(steps)) and len(steps) == 3


def test_truncate_metrics_keeps_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "val_top1": e / 10}) + "\n" for e in (1, 2, 3)))
    truncate_metrics(path, 2)
    assert [r["epoch"] for r in read_metrics(path)] == [1, 2]


def test_progress_prints_a_line_every_n_steps_when_not_a_terminal():
    out = io.StringIO()
    with redirect_stdout(out):
        progress = Progress(total=7, desc="epoch 1/1", log_every=3)
        for i in range(7):
            progress.update(lambda: {"loss": "0.5"})
        progress.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["3/7", "6/7", "7/7"]
    assert all("loss 0.5" in line for line in lines)


def test_progress_computes_numbers_only_when_it_shows_them():
    calls = []
    with redirect_stdout(io.StringIO()):
        progress = Progress(total=10, desc="x", log_every=5)
        for _ in range(10):
            progress.update(lambda: calls.append(1) or {})
    assert len(calls) == 2
