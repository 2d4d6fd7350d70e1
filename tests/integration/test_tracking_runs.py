"""TensorBoard event files and their curves, written by training runs."""

import pytest

from helpers import read_events, run_metrics
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
