import json
import math

import pytest
import torch
import yaml

from mbv2train.errors import CheckpointError, ConfigError, DataError
from mbv2train.tracking import read_metrics
from mbv2train.trainer import fit, without_timing

ROW_KEYS = {"epoch", "train_loss", "lr", "val_loss", "val_top1", "val_top5", "img_per_s", "epoch_time_s"}


def test_run_dir_holds_config_metrics_checkpoints_and_tensorboard(tiny_config, tmp_path):
    cfg = tiny_config()
    fit(cfg)
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["num_classes"] == 3  # taken from the data
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert all(0 <= row[k] <= 1 for k in ("val_top1", "val_top5", "train_top1"))
        assert row["val_images"] == 12
        assert math.isfinite(row["train_loss"]) and row["img_per_s"] > 0
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_checkpoint_loads_weights_only_and_holds_the_run_state(tiny_config, tmp_path):
    fit(tiny_config("train.ema=true"))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "epoch", "global_step", "best_metric",
            "best_value", "config", "class_names", "versions", "format_version"} <= set(state)
    assert state["epoch"] == 2 and state["global_step"] == 2 * (24 // 8)
    assert state["class_names"] == ["circle", "square", "triangle"]
    assert state["config"]["model"]["width_mult"] == 0.25
    assert set(state["versions"]) == {"torch", "torchvision", "mbv2train"}
    assert state["best_metric"] == "ema_val_top1"
    assert "module.features.0.0.weight" in state["ema"]


def test_same_seed_gives_identical_metrics(tiny_config, tmp_path):
    fit(tiny_config(run_dir=tmp_path / "a"))
    fit(tiny_config(run_dir=tmp_path / "b"))
    a, b = (read_metrics(tmp_path / name / "metrics.jsonl") for name in "ab")
    assert [without_timing(r) for r in a] == [without_timing(r) for r in b]
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_different_seed_gives_different_weights(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=1", run_dir=tmp_path / "a"))
    fit(tiny_config("train.epochs=1", "train.seed=1", run_dir=tmp_path / "b"))
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert not torch.equal(wa["classifier.1.weight"], wb["classifier.1.weight"])


def test_resume_auto_without_a_checkpoint_starts_fresh(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=1"), resume="auto")
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_resume_from_an_epoch_checkpoint_ends_like_the_uninterrupted_run(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=3", "train.ema=true", run_dir=tmp_path / "whole"))
    # Finish a run, then restart it from its epoch-1 copy, as if it had been killed during epoch 2.
    run = tmp_path / "rewound"
    fit(tiny_config("train.epochs=3", "train.ema=true", "train.save_every_epochs=1", run_dir=run))
    fit(tiny_config("train.epochs=3", "train.ema=true", "train.save_every_epochs=1", run_dir=run),
        resume=str(run / "epoch_1.pt"))

    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    resumed = torch.load(run / "last.pt", weights_only=True)
    for part in ("model", "ema"):
        assert all(torch.equal(whole[part][k], resumed[part][k]) for k in whole[part])
    assert resumed["global_step"] == whole["global_step"]
    assert resumed["scheduler"]["last_epoch"] == whole["scheduler"]["last_epoch"]
    rows_whole = [without_timing(r) for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    rows_resumed = [without_timing(r) for r in read_metrics(run / "metrics.jsonl")]
    assert rows_resumed == rows_whole


def test_ema_is_evaluated_beside_the_raw_model(tiny_config, tmp_path):
    fit(tiny_config("train.ema=true", "train.ema_decay=0.9"))
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert 0 <= row["ema_val_top1"] <= 1 and 0 <= row["ema_val_top5"] <= 1
    assert "ema_val_loss" in row


def test_mixup_cutmix_runs_without_train_top1(tiny_config, tmp_path):
    fit(tiny_config("data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "train.label_smoothing=0.1"))
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert "train_top1" not in row and math.isfinite(row["train_loss"])


def test_gradient_accumulation_counts_optimizer_steps(tiny_config, tmp_path):
    fit(tiny_config("train.accum_steps=2", "train.grad_clip_norm=1.0", "data.batch_size=4"))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["global_step"] == 2 * (24 // 4 // 2)


def test_epoch_copies_follow_retention(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=4", "train.save_every_epochs=1", "train.keep_checkpoints=2"))
    assert sorted(p.name for p in (tmp_path / "run").glob("epoch_*.pt")) == ["epoch_3.pt", "epoch_4.pt"]


def test_best_checkpoint_holds_the_best_epoch(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=3"))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    first_best = max(rows, key=lambda r: (r["val_top1"], -r["epoch"]))
    assert best["epoch"] == first_best["epoch"]
    assert best["best_value"] == first_best["val_top1"]


# -------------------------------------------------------------------------------- refusals


def test_num_classes_that_disagree_with_the_data_are_refused(tiny_config):
    with pytest.raises(DataError, match="model.num_classes is 5 but the training data has 3 class folders"):
        fit(tiny_config("model.num_classes=5"))


def test_fp16_on_cpu_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="train.amp: fp16 needs a CUDA GPU"):
        fit(tiny_config("train.amp=fp16", "train.device=cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="train.device: cuda"):
        fit(tiny_config("train.device=cuda"))


def test_resume_refuses_a_different_experiment(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=1"))
    with pytest.raises(CheckpointError, match=r"model.width_mult: 0.25 -> 0.5"):
        fit(tiny_config("train.epochs=1", "model.width_mult=0.5"), resume="auto")


def test_resume_path_must_be_a_training_checkpoint(tiny_config, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save({"classifier.1.weight": torch.zeros(3, 4)}, bare)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        fit(tiny_config(), resume=str(bare))


def test_corrupt_resume_checkpoint_is_one_clear_error(tiny_config, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=f"checkpoint is corrupt or truncated: {broken}"):
        fit(tiny_config(), resume=str(broken))


def test_metrics_rows_are_json_lines(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=1"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1


def test_a_new_run_never_overwrites_an_existing_one(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=1"))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match="already holds a run .* --resume auto"):
        fit(tiny_config("train.epochs=1"))
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_a_fresh_start_drops_rows_of_an_attempt_that_never_saved(tiny_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": 0.5}) + "\n")
    fit(tiny_config("train.epochs=1"), resume="auto")
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["val_top1"] != 0.5


def test_resuming_a_finished_run_trains_nothing(tiny_config, tmp_path, capsys):
    fit(tiny_config("train.epochs=1"))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    assert fit(tiny_config("train.epochs=1"), resume="auto") == {}
    assert "nothing to train" in capsys.readouterr().out
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 1
