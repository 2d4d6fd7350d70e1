import json
import shutil

import pytest
import torch
import torchvision

from mbv2train.tracking import read_metrics
from mbv2train.trainer import fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_root):
    """One finished 2-epoch run with EMA, shared by the eval tests."""
    from mbv2train.config import load_config

    from conftest import TINY_RUN

    run = tmp_path_factory.mktemp("trained") / "run"
    fit(load_config(None, [*TINY_RUN, f"data.root={image_root}", f"train.output_dir={run}", "train.ema=true",
                           "train.best_metric=val_top1"]))
    return run


def eval_json(cli, *args):
    result = cli("eval", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_reproduces_the_logged_val_metrics(cli, trained):
    rows = read_metrics(trained / "metrics.jsonl")
    best_epoch = torch.load(trained / "best.pt", weights_only=True)["epoch"]
    row = next(r for r in rows if r["epoch"] == best_epoch)
    out = eval_json(cli, "--ckpt", trained / "best.pt")
    assert set(out) >= {"top1", "top5", "loss", "images"}
    assert out["top1"] == pytest.approx(row["val_top1"])
    assert out["top5"] == pytest.approx(row["val_top5"])
    assert out["loss"] == pytest.approx(row["val_loss"], rel=1e-5)
    assert out["images"] == 12 and out["ema"] is False


def test_eval_ema_weights_reproduce_the_ema_metrics(cli, trained):
    last = read_metrics(trained / "metrics.jsonl")[-1]
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


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "{tmp}/missing.pt"], "checkpoint not found: {tmp}/missing.pt"),
    (["--ckpt", "{run}"], "{run} is a folder, not a checkpoint file (it holds best.pt, last.pt"),
    (["--ckpt", "{tmp}/garbage.pt"], "checkpoint is corrupt or truncated: {tmp}/garbage.pt"),
    (["--ckpt", "{tmp}/other.pt"], "neither an mbv2 training checkpoint nor a MobileNetV2 state dict"),
    (["--ckpt", "{run}/last.pt", "--data", "{tmp}/nowhere"], "data folder not found: {tmp}/nowhere"),
    (["--ckpt", "{run}/last.pt", "--set", "data.val_crop=999"], "data.val_crop: 999 is larger than"),
    (["--ckpt", "{run}/last.pt", "--width-mult", "0.5"], "--width-mult and --num-classes are for bare state dicts"),
])
def test_eval_bad_input_exits_2_with_one_line(cli, trained, tmp_path, args, message):
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
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
