"""`mbv2 eval` and `mbv2 predict` on a torchvision state dict from `mbv2 export` read the JSON written beside
it, so the model is scored with the preprocessing it was trained with, and say where the preprocessing came from."""

import json
import shutil

import pytest
import torch

from helpers import eval_json
from support.eval_models import calibrated_model, eval_config, save_checkpoint
from mbv2train import data

# the exported digits model (a module fixture) is built once, on one worker
pytestmark = pytest.mark.xdist_group("sidecar")

# Not ImageNet's statistics nor its 256/224: a state dict scored at torchvision's defaults would go wrong.
DIGITS_SETTINGS = ["data.val_resize=36", "data.val_crop=32", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
                   "data.batch_size=64"]
PREPROCESSING = {"resize": 36, "crop": 32, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(digits root, training checkpoint, its torchvision export with the JSON beside it) of a width-0.25
    model calibrated on the digits at 32 px."""
    pytest.importorskip("sklearn")
    from typer.testing import CliRunner

    from mbv2train.cli import app
    from mbv2train.data.demo import write_demo_dataset

    base = tmp_path_factory.mktemp("sidecar")
    root = base / "digits"
    write_demo_dataset(root)
    cfg = eval_config(root, 10, *DIGITS_SETTINGS)
    loader, classes = data.build_val_loader(cfg.data, root / "val")
    model = calibrated_model(cfg, torch.cat([batch[0] for batch in loader]), seed=3)
    ckpt = save_checkpoint(base / "digits.pt", model, cfg, classes)
    result = CliRunner().invoke(app, ["export", "--ckpt", str(ckpt), "--format", "torchvision", "--images", "8"])
    assert result.exit_code == 0, result.output
    state_dict = base / "digits.torchvision.pth"
    assert (base / "digits.torchvision.pth.json").is_file()
    return root, ckpt, state_dict


def test_the_exported_state_dict_scores_what_the_checkpoint_scores(cli, exported):
    root, ckpt, state_dict = exported
    from_ckpt = eval_json(cli, "--ckpt", ckpt)
    # the width given as for any bare state dict: the JSON must bring the rest
    from_export = eval_json(cli, "--ckpt", state_dict, "--data", root, "--width-mult", "0.25")
    assert from_export["images"] == from_ckpt["images"] == 360
    assert from_export["top1"] == from_ckpt["top1"] and from_export["top5"] == from_ckpt["top5"]
    assert from_export["loss"] == pytest.approx(from_ckpt["loss"], rel=1e-6)
    assert from_ckpt["preprocessing"] == {"from": "the checkpoint's config", **PREPROCESSING}
    assert from_export["preprocessing"] == {"from": f"{state_dict}.json", **PREPROCESSING}


def test_eval_says_which_preprocessing_it_used_and_from_where(cli, exported):
    root, ckpt, state_dict = exported
    result = cli("eval", "--ckpt", state_dict, "--data", root)
    assert result.exit_code == 0, result.output
    assert (f"preprocessing from {state_dict}.json: resize 36, crop 32, bilinear, mean 0.5 0.5 0.5, "
            f"std 0.25 0.25 0.25") in result.stdout.splitlines()
    result = cli("eval", "--ckpt", ckpt, "--set", "data.val_resize=40")
    assert result.exit_code == 0, result.output
    assert "preprocessing from the checkpoint's config and --set: resize 40, crop 32," in result.stdout


def test_without_the_json_eval_keeps_the_defaults_and_says_so(cli, exported, tmp_path):
    root, _, state_dict = exported
    alone = shutil.copy(state_dict, tmp_path / "alone.pth")
    out = eval_json(cli, "--ckpt", alone, "--data", root, "--width-mult", "0.25")
    assert out["preprocessing"] == {"from": "defaults (no alone.pth.json beside the file)", "resize": 256,
                                    "crop": 224, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                                    "std": [0.229, 0.224, 0.225]}


def test_predict_takes_the_class_names_and_preprocessing_from_the_json(cli, exported):
    root, ckpt, state_dict = exported
    folder = root / "val" / "3"
    # one batch size for both: the JSON does not carry the checkpoint's, and batches of another size round
    # the logits differently in the last bit
    by_ckpt = cli("predict", "--ckpt", ckpt, "--topk", "2", folder, "--json", "--batch-size", "16")
    by_export = cli("predict", "--ckpt", state_dict, "--topk", "2", folder, "--json", "--batch-size", "16")
    assert by_ckpt.exit_code == 0 and by_export.exit_code == 0, by_export.output
    assert by_export.stdout == by_ckpt.stdout
    assert "note:" not in by_ckpt.stderr  # a training checkpoint's own preprocessing goes without saying
    notes = [line for line in by_export.stderr.splitlines() if line.startswith("note:")]
    assert notes == [f"note: preprocessing from {state_dict}.json: resize 36, crop 32, "
                                             f"bilinear, mean 0.5 0.5 0.5, std 0.25 0.25 0.25"]


@pytest.mark.parametrize("change, message", [
    (lambda text: text[:-10], "{json}: not JSON"),
    (lambda text: json.dumps({**json.loads(text), "mbv2.crop": "big"}), "{json}: mbv2.crop: expected a whole number"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "mbv2.mean"}),
     "{json}: mbv2.mean missing"),
    (lambda text: json.dumps({**json.loads(text), "mbv2.crop": 64}), "{json}: data.val_crop: 64 is larger than"),
])
def test_a_damaged_json_beside_the_state_dict_is_one_line_naming_it(cli, exported, tmp_path, change, message):
    root, _, state_dict = exported
    copy = shutil.copy(state_dict, tmp_path / "copy.pth")
    (tmp_path / "copy.pth.json").write_text(change((state_dict.parent / f"{state_dict.name}.json").read_text()))
    result = cli("eval", "--ckpt", copy, "--data", root)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message.format(json=f"{copy}.json")), lines
