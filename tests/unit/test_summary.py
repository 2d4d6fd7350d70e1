import json

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from mbv2train.model import MobileNetV2
from mbv2train.model.summary import GRID_RESOLUTIONS, GRID_WIDTHS, grid, human, summarize


def test_width_1_at_224_matches_the_published_counts():
    s = summarize(MobileNetV2(), 224)
    assert s.params == 3_504_872
    assert s.trainable_params == 3_504_872
    assert s.macs == 300_774_272


@pytest.mark.parametrize("width, size", [(1.0, 224), (0.35, 96), (0.75, 160), (1.4, 192)])
def test_macs_agree_with_torchs_flop_counter(width, size):
    # FlopCounterMode counts a multiply-add as 2 FLOPs for conv and linear layers.
    model = MobileNetV2(width_mult=width).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    assert summarize(model, size).macs * 2 == counter.get_total_flops()


def test_batch_size_scales_batch_totals_not_per_image_counts():
    one, eight = summarize(MobileNetV2(), 96, batch_size=1), summarize(MobileNetV2(), 96, batch_size=8)
    assert eight.macs == one.macs
    assert eight.batch_macs == 8 * one.macs
    assert eight.activation_bytes == 8 * one.activation_bytes
    assert eight.layers[0].output_shape == [8, 1000]
    assert eight.input_size == [8, 3, 96, 96]


def test_depth_limits_the_table_and_rows_add_up():
    shallow = summarize(MobileNetV2(), 64, depth=1)
    assert [r.name for r in shallow.layers] == ["", "features", "classifier"]
    deep = summarize(MobileNetV2(), 64, depth=2)
    blocks = [r for r in deep.layers if r.depth == 2 and r.name.startswith("features.")]
    assert len(blocks) == 19
    features = next(r for r in deep.layers if r.name == "features")
    assert sum(r.params for r in blocks) == features.params
    assert sum(r.macs for r in blocks) == features.macs
    assert deep.layers[0].macs == deep.macs


def test_parameter_memory_is_float32_bytes():
    s = summarize(MobileNetV2(), 64)
    assert s.param_bytes == 4 * s.params


def test_grid_covers_every_width_and_resolution():
    cells = grid(widths=(0.35, 1.0), resolutions=(96, 224))
    assert {(c["width_mult"], c["image_size"]) for c in cells} == {(0.35, 96), (0.35, 224), (1.0, 96), (1.0, 224)}
    by_key = {(c["width_mult"], c["image_size"]): c for c in cells}
    assert by_key[(1.0, 224)]["macs"] == 300_774_272
    assert by_key[(1.0, 96)]["params"] == by_key[(1.0, 224)]["params"] == 3_504_872


def test_human_numbers():
    assert human(3_504_872) == "3.50M"
    assert human(300_774_272) == "300.77M"
    assert human(9_624_776_704) == "9.62G"
    assert human(999) == "999"


def test_cli_table_shows_exact_and_short_totals(cli):
    result = cli("summary")
    assert result.exit_code == 0, result.output
    assert "3,504,872" in result.stdout and "(3.50M)" in result.stdout
    assert "300,774,272" in result.stdout and "(300.77M)" in result.stdout
    assert "features.17 (InvertedResidual)" in result.stdout
    assert "[1, 320, 7, 7]" in result.stdout


def test_cli_json_has_the_documented_keys(cli):
    result = cli("summary", "--json", "--batch-size", "2", "--image-size", "160")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params"] == data["trainable_params"] == 3_504_872
    assert isinstance(data["macs"], int) and data["macs"] == summarize(MobileNetV2(), 160).macs
    assert data["input_size"] == [2, 3, 160, 160]
    assert data["layers"][0] == {"name": "", "type": "MobileNetV2", "depth": 0, "output_shape": [2, 1000],
                                 "params": 3_504_872, "macs": data["macs"]}


@pytest.mark.parametrize("width", GRID_WIDTHS)
def test_cli_json_parameter_count_equals_torchvisions(cli, width):
    result = cli("summary", "--json", "--width-mult", str(width), "--depth", "0")
    assert result.exit_code == 0, result.output
    reference = torchvision.models.mobilenet_v2(width_mult=width)
    assert json.loads(result.stdout)["params"] == sum(p.numel() for p in reference.parameters())


def test_cli_num_classes_and_config_file_reach_the_model(cli, write_yaml):
    path = write_yaml("model:\n  width_mult: 0.5\n  num_classes: 10\n")
    data = json.loads(cli("summary", "--json", "--config", path).stdout)
    assert data["width_mult"] == 0.5 and data["layers"][0]["output_shape"] == [1, 10]
    # a command-line option wins over the file
    data = json.loads(cli("summary", "--json", "--config", path, "--num-classes", "3").stdout)
    assert data["num_classes"] == 3 and data["layers"][0]["output_shape"] == [1, 3]


def test_cli_grid_prints_30_cells(cli):
    result = cli("summary", "--grid")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("width"))
    assert header.split()[2:] == [f"{px}px" for px in GRID_RESOLUTIONS]
    rows = [line.split() for line in lines if line[:1].isdigit()]
    assert [float(r[0]) for r in rows] == list(GRID_WIDTHS)
    assert sum(len(r) - 2 for r in rows) == 30
    assert rows[3][1] == "3.50M" and rows[3][-1] == "300.77M"


def test_cli_grid_json(cli):
    data = json.loads(cli("summary", "--grid", "--json").stdout)
    assert len(data["cells"]) == 30
    cell = next(c for c in data["cells"] if c["width_mult"] == 1.0 and c["image_size"] == 224)
    assert cell == {"width_mult": 1.0, "image_size": 224, "params": 3_504_872, "macs": 300_774_272}


def test_cli_takes_the_size_width_and_classes_of_a_config_and_its_data(cli, write_yaml, image_root):
    path = write_yaml(f"model:\n  width_mult: 0.5\ndata:\n  root: {image_root}\n  image_size: 32\n")
    result = cli("summary", "--json", "--config", path)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["width_mult"] == 0.5 and data["num_classes"] == 3  # image_root's three class folders
    assert data["input_size"] == [1, 3, 32, 32] and data["layers"][0]["output_shape"] == [1, 3]
    assert data["params"] == summarize(MobileNetV2(num_classes=3, width_mult=0.5), 32).params
    assert result.stderr == ""

    text = cli("summary", "--config", path)
    assert text.stdout.splitlines()[0] == (
        f"MobileNetV2, width 0.5, 3 classes (the class folders of {image_root / 'train'}), input 1x3x32x32")

    # options still win over the file
    data = json.loads(cli("summary", "--json", "--config", path, "--image-size", "64", "--num-classes", "7",
                          "--width-mult", "0.75").stdout)
    assert data["input_size"] == [1, 3, 64, 64] and data["num_classes"] == 7 and data["width_mult"] == 0.75


def test_cli_says_which_class_count_it_assumed_when_the_data_is_missing(cli, write_yaml, tmp_path):
    path = write_yaml(f"data:\n  root: {tmp_path / 'nowhere'}\n  image_size: 32\n")
    result = cli("summary", "--json", "--config", path)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_classes"] == 1000
    assert result.stderr.splitlines() == [
        f"note: model.num_classes is unset and {tmp_path / 'nowhere' / 'train'} does not exist; "
        f"assuming 1000 classes (ImageNet)"]


def test_cli_without_a_config_is_imagenets_model_and_says_nothing_more(cli):
    result = cli("summary", "--depth", "0")
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.splitlines()[0] == "MobileNetV2, width 1, 1000 classes, input 1x3x224x224"
