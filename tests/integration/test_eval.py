import shutil

import pytest
import torch
import torchvision

from helpers import eval_json, run_ckpt, run_metrics
from mbv2train.train.trainer import fit

# the trained runs (module fixtures) are built once, on one worker
pytestmark = pytest.mark.xdist_group("eval")


def finished_run(tmp_path_factory, image_root, name: str, *overrides: str):
    """A finished 2-epoch run with EMA on image_root (module-scoped fixtures share it between tests)."""
    from mbv2train.config import load_config

    from helpers import TINY_RUN

    run = tmp_path_factory.mktemp(name) / "run"
    fit(load_config(None, [*TINY_RUN, f"data.root={image_root}", f"train.output_dir={run}", "train.ema=true",
                           *overrides]))
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_root):
    """The run shared by the eval tests; its best.pt follows the raw weights' val top-1."""
    return finished_run(tmp_path_factory, image_root, "trained", "train.best_metric=val_top1")


@pytest.fixture(scope="module")
def trained_ema_best(tmp_path_factory, image_root):
    """A run whose best metric is the EMA's (the default with train.ema)."""
    return finished_run(tmp_path_factory, image_root, "trained_ema", "train.ema_decay=0.5")


def test_eval_reproduces_the_logged_val_metrics(cli, trained):
    rows = run_metrics(trained)
    best_epoch = run_ckpt(trained, "best.pt")["epoch"]
    row = next(r for r in rows if r["epoch"] == best_epoch)
    out = eval_json(cli, "--ckpt", trained / "best.pt")
    assert set(out) >= {"top1", "top5", "loss", "images"}
    assert out["top1"] == pytest.approx(row["val_top1"])
    assert out["top5"] == pytest.approx(row["val_top5"])
    assert out["loss"] == pytest.approx(row["val_loss"], rel=1e-5)
    assert out["images"] == 12 and out["ema"] is False


def test_eval_defaults_to_the_ema_weights_when_the_best_metric_was_ema(cli, trained_ema_best):
    best = run_ckpt(trained_ema_best, "best.pt")
    assert best["best_metric"] == "ema_val_top1"
    row = next(r for r in run_metrics(trained_ema_best) if r["epoch"] == best["epoch"])
    # Only meaningful while the EMA and the raw weights score differently; decay 0.5 over 3 steps keeps them apart.
    assert row["ema_val_loss"] != pytest.approx(row["val_loss"], rel=1e-3)
    out = eval_json(cli, "--ckpt", trained_ema_best / "best.pt")
    assert out["ema"] is True
    assert (out["top1"], out["top5"]) == (pytest.approx(row["ema_val_top1"]), pytest.approx(row["ema_val_top5"]))
    assert out["loss"] == pytest.approx(row["ema_val_loss"], rel=1e-5)
    raw = eval_json(cli, "--ckpt", trained_ema_best / "best.pt", "--no-ema")
    assert raw["ema"] is False and raw["loss"] == pytest.approx(row["val_loss"], rel=1e-5)


def test_eval_defaults_to_the_raw_weights_when_the_best_metric_was_raw(cli, trained):
    # trained keeps an EMA too, but picked best.pt by val_top1
    row = run_metrics(trained)[-1]
    assert row["ema_val_loss"] != pytest.approx(row["val_loss"], rel=1e-3)
    out = eval_json(cli, "--ckpt", trained / "last.pt")
    assert out["ema"] is False
    assert (out["top1"], out["top5"]) == (pytest.approx(row["val_top1"]), pytest.approx(row["val_top5"]))
    assert out["loss"] == pytest.approx(row["val_loss"], rel=1e-5)


def test_eval_ema_weights_reproduce_the_ema_metrics(cli, trained):
    last = run_metrics(trained)[-1]
    out = eval_json(cli, "--ckpt", trained / "last.pt", "--ema")
    assert out["ema"] is True
    assert out["top1"] == pytest.approx(last["ema_val_top1"])
    assert out["loss"] == pytest.approx(last["ema_val_loss"], rel=1e-5)


def test_eval_takes_another_data_folder_and_batch_size(cli, trained, image_root):
    by_root = eval_json(cli, "--ckpt", trained / "last.pt", "--data", image_root, "--batch-size", "5")
    by_split = eval_json(cli, "--ckpt", trained / "last.pt", "--data", image_root / "val")
    assert by_root["images"] == by_split["images"] == 12
    assert by_root["top1"] == pytest.approx(by_split["top1"])


def test_eval_human_output_names_the_numbers(cli, trained):
    result = cli("eval", "--ckpt", trained / "last.pt")
    assert result.exit_code == 0, result.output
    assert "top-1" in result.stdout and "top-5" in result.stdout and "images 12" in result.stdout


def test_eval_refuses_a_folder_with_other_classes(cli, trained, image_root, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(image_root / "val", other / "val")
    (other / "val" / "triangle").rename(other / "val" / "hexagon")
    result = cli("eval", "--ckpt", trained / "last.pt", "--data", other)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "differ from the checkpoint's classes" in lines[0] and "hexagon" in lines[0]


def test_eval_takes_a_torchvision_state_dict(cli, image_root, tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=3).eval()
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    out = eval_json(cli, "--ckpt", path, "--data", image_root, "--width-mult", "0.5")
    assert out["images"] == 12 and out["ema"] is False

    # the same numbers by hand, with the default ImageNet preprocessing (resize 256, crop 224)
    from mbv2train import data
    from mbv2train.config import DataConfig

    loader, _ = data.build_val_loader(DataConfig(num_workers=0), image_root / "val")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    correct = 0
    with torch.no_grad():
        for images, labels, _ in loader:
            correct += (reference((images.float() - mean) / std).argmax(1) == labels).sum().item()
    assert out["top1"] == pytest.approx(correct / 12)


@pytest.fixture
def eval_configs(tmp_path):
    """tmp_path/{wide,plain}.yaml: the run's val preprocessing, with and without a model.width_mult of 0.75."""
    plain = "data:\n  num_workers: 0\n  val_resize: 16\n  val_crop: 16\n"
    (tmp_path / "plain.yaml").write_text(plain)
    (tmp_path / "wide.yaml").write_text("model:\n  width_mult: 0.75\n" + plain)
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--set", "model.width_mult=0.75"], "--set model.width_mult=0.75: the model comes from the checkpoint, "
                                         "whose weights were trained with model.width_mult 0.25"),
    (["--set", "data.val_crop=16", "--set", "model.dropout=0.5"], "--set model.dropout=0.5: the model comes from"),
    (["--set", "model.num_classes=5"], "--set model.num_classes=5: the model comes from the checkpoint"),
    (["--config", "{tmp}/wide.yaml"], "{tmp}/wide.yaml: model.width_mult 0.75: the model comes from the checkpoint"),
    (["--config", "{tmp}/plain.yaml", "--set", "model.width_mult=1"], "--set model.width_mult=1: the model comes"),
])
def test_eval_refuses_model_settings_that_differ_from_a_training_checkpoint(cli, trained, image_root, eval_configs,
                                                                            args, message):
    args = [a.format(tmp=eval_configs) for a in args]
    result = cli("eval", "--ckpt", trained / "last.pt", "--data", image_root, *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message.format(tmp=eval_configs)}")


@pytest.mark.parametrize("args", [
    ["--set", "model.width_mult=0.25"],  # what the checkpoint has: nothing changes
    ["--config", "{tmp}/wide.yaml", "--set", "model.width_mult=0.25"],
    ["--config", "{tmp}/plain.yaml"],  # no model section: the checkpoint's model, not the defaults
])
def test_eval_accepts_model_settings_equal_to_the_checkpoint(cli, trained, image_root, eval_configs, args):
    row = run_metrics(trained)[-1]
    out = eval_json(cli, "--ckpt", trained / "last.pt", "--data", image_root, *[a.format(tmp=eval_configs)
                                                                                for a in args])
    assert out["top1"] == pytest.approx(row["val_top1"]) and out["loss"] == pytest.approx(row["val_loss"], rel=1e-5)


@pytest.fixture
def half_width_state_dict(tmp_path):
    """A torchvision MobileNetV2 (width 0.5, 3 classes) saved as a bare state dict."""
    torch.manual_seed(0)
    path = tmp_path / "tv_half.pth"
    torch.save(torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=3).state_dict(), path)
    return path


SMALL_EVAL = ["--set", "data.num_workers=0", "--set", "data.val_resize=32", "--set", "data.val_crop=32"]


def test_eval_takes_the_width_of_a_bare_state_dict_from_set_or_config(cli, image_root, half_width_state_dict,
                                                                      tmp_path):
    by_option = eval_json(cli, "--ckpt", half_width_state_dict, "--data", image_root, *SMALL_EVAL,
                          "--width-mult", "0.5")
    by_set = eval_json(cli, "--ckpt", half_width_state_dict, "--data", image_root, *SMALL_EVAL,
                       "--set", "model.width_mult=0.5", "--set", "model.num_classes=3")
    config = tmp_path / "half.yaml"
    config.write_text("model:\n  width_mult: 0.5\n")
    by_config = eval_json(cli, "--ckpt", half_width_state_dict, "--data", image_root, *SMALL_EVAL, "--config", config)
    assert by_config.pop("preprocessing")["from"] == f"--config {config} and --set"  # the rest is the same
    assert by_set == by_option and by_config == {k: v for k, v in by_option.items() if k != "preprocessing"}
    default = cli("eval", "--ckpt", half_width_state_dict, "--data", image_root, *SMALL_EVAL)  # width 1.0
    assert default.exit_code == 2 and "do not fit MobileNetV2(width_mult=1" in default.stderr


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "{tmp}/missing.pt"], "checkpoint not found: {tmp}/missing.pt"),
    (["--ckpt", "{run}"], "{run} is a folder, not a checkpoint file (it holds best.pt, last.pt"),
    (["--ckpt", "{tmp}/garbage.pt"], "{tmp}/garbage.pt is not an mbv2 checkpoint (its first bytes"),
    (["--ckpt", "{tmp}/cut.pt"], "checkpoint is corrupt or truncated: {tmp}/cut.pt"),
    (["--ckpt", "{tmp}/other.pt"], "neither an mbv2 training checkpoint nor a MobileNetV2 state dict"),
    (["--ckpt", "{run}/last.pt", "--data", "{tmp}/nowhere"], "data folder not found: {tmp}/nowhere"),
    (["--ckpt", "{run}/last.pt", "--set", "data.val_crop=999"], "data.val_crop: 999 is larger than"),
    (["--ckpt", "{run}/last.pt", "--width-mult", "0.5"], "--width-mult and --num-classes are for bare state dicts"),
])
def test_eval_bad_input_exits_2_with_one_line(cli, trained, tmp_path, args, message):
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    (tmp_path / "cut.pt").write_bytes((trained / "last.pt").read_bytes()[:5000])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    args = [a.format(tmp=tmp_path, run=trained) for a in args]
    result = cli("eval", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert message.format(tmp=tmp_path, run=trained) in lines[0]


class _Payload:
    """Pickling this calls os.system on load, as a hostile checkpoint would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(cli, tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "hostile.pt"
    torch.save({"model": _Payload(marker)}, path)
    result = cli("eval", "--ckpt", path)
    assert result.exit_code == 2
    assert not marker.exists()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "checkpoint refused" in lines[0] and "system" in lines[0]
