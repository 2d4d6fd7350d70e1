import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from helpers import metric_rows, run_ckpt, run_metrics
from mbv2train.errors import CheckpointError, ConfigError, DataError
from mbv2train.train.tracking import without_timing
from mbv2train.train.trainer import fit

ROW_KEYS = {"epoch", "world_size", "global_batch", "train_loss", "lr", "val_loss", "val_top1", "val_top5", "img_per_s",
            "epoch_time_s"}


def test_run_dir_holds_config_metrics_checkpoints_and_tensorboard(tiny_config, tmp_path):
    cfg = tiny_config()
    fit(cfg)
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["num_classes"] == 3  # taken from the data
    rows = run_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert all(0 <= row[k] <= 1 for k in ("val_top1", "val_top5", "train_top1"))
        assert row["val_images"] == 12
        assert (row["world_size"], row["global_batch"]) == (1, 8)  # one process, data.batch_size 8
        assert row["train_images"] == 24  # 3 steps x the global batch of 8
        assert math.isfinite(row["train_loss"]) and row["img_per_s"] > 0
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_checkpoint_loads_weights_only_and_holds_the_run_state(tiny_config, tmp_path):
    fit(tiny_config("train.ema=true"))
    state = run_ckpt(tmp_path / "run")
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
    a, b = (run_metrics(tmp_path / name) for name in "ab")
    assert [without_timing(r) for r in a] == [without_timing(r) for r in b]
    wa = run_ckpt(tmp_path / "a")["model"]
    wb = run_ckpt(tmp_path / "b")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_different_seed_gives_different_weights(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=1", run_dir=tmp_path / "a"))
    fit(tiny_config("train.epochs=1", "train.seed=1", run_dir=tmp_path / "b"))
    wa = run_ckpt(tmp_path / "a")["model"]
    wb = run_ckpt(tmp_path / "b")["model"]
    assert not torch.equal(wa["classifier.1.weight"], wb["classifier.1.weight"])


def test_resume_auto_without_a_checkpoint_starts_fresh(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=1"), resume="auto")
    assert [r["epoch"] for r in run_metrics(tmp_path / "run")] == [1]


def test_resume_from_an_epoch_checkpoint_ends_like_the_uninterrupted_run(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=3", "train.ema=true", run_dir=tmp_path / "whole"))
    # Finish a run, then restart it from its epoch-1 copy, as if it had been killed during epoch 2.
    run = tmp_path / "rewound"
    fit(tiny_config("train.epochs=3", "train.ema=true", "train.save_every_epochs=1", run_dir=run))
    fit(tiny_config("train.epochs=3", "train.ema=true", "train.save_every_epochs=1", run_dir=run),
        resume=str(run / "epoch_1.pt"))

    whole = run_ckpt(tmp_path / "whole")
    resumed = run_ckpt(run)
    for part in ("model", "ema"):
        assert all(torch.equal(whole[part][k], resumed[part][k]) for k in whole[part])
    assert resumed["global_step"] == whole["global_step"]
    assert resumed["scheduler"]["last_epoch"] == whole["scheduler"]["last_epoch"]
    rows_whole = metric_rows(tmp_path / "whole")
    rows_resumed = metric_rows(run)
    assert rows_resumed == rows_whole


def evaluate_weights(state: dict, weights: dict) -> dict:
    """Loss, top-1, top-5 of ``weights`` on the val folder of the run that saved ``state``, computed here."""
    from mbv2train import data, devices
    from mbv2train.evaluate import loop
    from mbv2train.config import config_from_dict
    from mbv2train.model import build_model

    cfg = config_from_dict(state["config"], "saved config")
    model = build_model(cfg.model)
    model.load_state_dict(weights)
    loader, _ = data.build_val_loader(cfg.data, Path(cfg.data.root) / cfg.data.val_split)
    runtime = devices.Runtime.create(torch.device("cpu"), None, False, cfg.data.mean, cfg.data.std)
    return loop.evaluate(model, loader, runtime)


def test_ema_metrics_are_the_ema_weights_metrics(tiny_config, tmp_path):
    fit(tiny_config("train.ema=true", "train.ema_decay=0.5"))
    row = run_metrics(tmp_path / "run")[-1]
    state = run_ckpt(tmp_path / "run")
    ema_weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    for prefix, weights in (("ema_val_", ema_weights), ("val_", state["model"])):
        metrics = evaluate_weights(state, weights)
        assert row[prefix + "top1"] == pytest.approx(metrics["top1"])
        assert row[prefix + "top5"] == pytest.approx(metrics["top5"])
        assert row[prefix + "loss"] == pytest.approx(metrics["loss"], rel=1e-4)
    # the two are different models, so the check above cannot pass by evaluating the raw one twice
    assert row["ema_val_loss"] != pytest.approx(row["val_loss"], rel=1e-3)


def test_ema_every_steps_sets_how_often_the_ema_is_updated(tiny_config, tmp_path):
    for every in (1, 2):
        fit(tiny_config("train.ema=true", "train.ema_decay=0.5", f"train.ema_every_steps={every}",
                        run_dir=tmp_path / str(every)))
    one, two = (run_ckpt(tmp_path / name) for name in "12")
    assert one["global_step"] == two["global_step"] == 6
    assert (int(one["ema"]["n_averaged"]), int(two["ema"]["n_averaged"])) == (6, 3)  # steps / every
    assert all(torch.equal(one["model"][k], two["model"][k]) for k in one["model"])  # training is the same
    key = "module.classifier.1.weight"
    assert not torch.allclose(one["ema"][key], two["ema"][key])


def test_compile_wraps_the_trained_model_in_torch_compile(tiny_config, tmp_path, monkeypatch):
    # A real torch.compile of MobileNetV2 takes minutes on a CPU; stand in for it and check the trainer
    # trains through what it returns and saves the plain model's weights.
    compiled = []

    class Compiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.forwards = model, 0

        def forward(self, images):
            self.forwards += 1
            return self.model(images)

    def fake_compile(model, *args, **kwargs):
        compiled.append(Compiled(model))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    row = fit(tiny_config("train.compile=true", "train.epochs=1"))
    assert len(compiled) == 1 and compiled[0].forwards == 3  # every training step ran through it
    assert row["epoch"] == 1 and math.isfinite(row["train_loss"])
    saved = run_ckpt(tmp_path / "run")["model"]
    assert set(saved) == set(compiled[0].model.state_dict())  # no wrapper prefix in the checkpoint


def test_mixup_cutmix_runs_without_train_top1(tiny_config, tmp_path):
    fit(tiny_config("data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "train.label_smoothing=0.1"))
    row = run_metrics(tmp_path / "run")[-1]
    assert "train_top1" not in row and math.isfinite(row["train_loss"])


def test_gradient_accumulation_counts_optimizer_steps(tiny_config, tmp_path):
    fit(tiny_config("train.accum_steps=2", "train.grad_clip_norm=1.0", "data.batch_size=4"))
    state = run_ckpt(tmp_path / "run")
    assert state["global_step"] == 2 * (24 // 4 // 2)


def test_grad_clip_norm_clips_every_optimizer_step(tiny_config, monkeypatch):
    clip = torch.nn.utils.clip_grad_norm_
    calls = []  # (max_norm, norm before, norm after) per call

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        before = clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        calls.append((max_norm, float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    fit(tiny_config("train.grad_clip_norm=0.001", "train.epochs=1"))
    assert len(calls) == 3 and all(max_norm == 0.001 for max_norm, _, _ in calls)
    assert all(before > 0.001 and after == pytest.approx(0.001, rel=1e-3) for _, before, after in calls)


def _one_sgd_step(clip_norm):
    """(gradient, update) of one plain SGD step (lr 1) through step_guard.optimizer_step on a large loss."""
    from mbv2train.train.step_guard import optimizer_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    (model(torch.randn(8, 4)).pow(2).sum() * 100).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    optimizer_step(model.parameters(), torch.optim.SGD(model.parameters(), lr=1.0), None, clip_norm)
    return grad, before - torch.cat([p.detach().flatten() for p in model.parameters()])


def test_optimizer_step_scales_a_large_gradient_down_to_the_clip_norm():
    grad, update = _one_sgd_step(clip_norm=0.5)
    assert grad.norm() > 10  # far above the limit, so clipping must act
    assert update.norm() == pytest.approx(0.5, rel=1e-4)
    assert torch.allclose(update, grad * (0.5 / grad.norm()), atol=1e-6)  # scaled as a whole, same direction
    unclipped, update = _one_sgd_step(clip_norm=None)
    assert torch.allclose(update, unclipped, atol=1e-4)
    _, update = _one_sgd_step(clip_norm=1e6)  # a limit above the norm leaves the step alone
    assert torch.allclose(update, unclipped, atol=1e-4)


def test_epoch_copies_follow_retention(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=4", "train.save_every_epochs=1", "train.keep_checkpoints=2"))
    assert sorted(p.name for p in (tmp_path / "run").glob("epoch_*.pt")) == ["epoch_3.pt", "epoch_4.pt"]


def test_best_checkpoint_holds_the_best_epoch(tiny_config, tmp_path):
    fit(tiny_config("train.epochs=3"))
    rows = run_metrics(tmp_path / "run")
    best = run_ckpt(tmp_path / "run", "best.pt")
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
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": 0.5, "stale": True}) + "\n")
    fresh = fit(tiny_config("train.epochs=1"), resume="auto")
    rows = run_metrics(run)
    assert len(rows) == 1 and "stale" not in rows[0]  # the stale row is gone, whatever val_top1 the new one has
    assert without_timing(rows[0]) == without_timing(fresh) and ROW_KEYS <= set(rows[0])


def test_resuming_a_finished_run_trains_nothing(tiny_config, tmp_path, capsys):
    fit(tiny_config("train.epochs=1"))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    assert fit(tiny_config("train.epochs=1"), resume="auto") == {}
    assert "nothing to train" in capsys.readouterr().out
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    assert len(run_metrics(tmp_path / "run")) == 1
