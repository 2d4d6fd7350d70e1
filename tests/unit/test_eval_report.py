"""mbv2 eval in depth: --per-class, --report, --resolutions, --tta flip, and the per-class summary in
TensorBoard (train.tb_per_class)."""

import csv
import json
import stat
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import eval_json, load_ckpt, make_image_folder
from support.eval_models import calibrated_model, colour_model, eval_config, save_checkpoint
from mbv2train import data
from mbv2train.evaluate import report as eval_report
from mbv2train.config import DataConfig
from mbv2train.evaluate.evaluation import sweep_sizes
from mbv2train.model import build_model

CLASSES = ["circle", "square", "triangle"]  # make_image_folder tints them red, green, blue


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """(dataset root, checkpoint) of a model that predicts from colour alone: red (circle) and green (square)
    images are called square, blue ones triangle. So every circle is confused with square."""
    root = make_image_folder(tmp_path_factory.mktemp("colour"))
    cfg = eval_config(root, 3, "data.mean=[0,0,0]", "data.std=[1,1,1]")
    model = colour_model(cfg, logits_of_rgb=[[0, 0, 0], [1, 1, 0], [0, 0, 2]], bias=[-100, 0, 0])
    return root, save_checkpoint(root / "colour.pt", model, cfg, CLASSES)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, image_root):
    """A checkpoint of a calibrated random model on image_root, validated at resize 32 / crop 28 (the 1 / 0.875
    ratio), whose logits change with the crop size and under a mirror flip."""
    cfg = eval_config(image_root, 3, "data.val_resize=32", "data.val_crop=28")
    loader, _ = data.build_val_loader(cfg.data, image_root / "val")
    images = torch.cat([batch[0] for batch in loader])
    model = calibrated_model(cfg, images, seed=3)
    return save_checkpoint(tmp_path_factory.mktemp("random") / "random.pt", model, cfg, CLASSES)


def test_per_class_shows_a_known_confusion(cli, colour_run):
    root, ckpt = colour_run
    out = eval_json(cli, "--ckpt", ckpt, "--per-class")
    assert out["top1"] == pytest.approx(8 / 12)
    assert [(r["class"], r["images"], r["correct"], r["top1"]) for r in out["per_class"]] == [
        ("circle", 4, 0, 0.0), ("square", 4, 4, 1.0), ("triangle", 4, 4, 1.0)]
    assert out["confused"] == [{"true": "circle", "predicted": "square", "count": 4, "fraction": 1.0}]

    text = cli("eval", "--ckpt", ckpt, "--per-class")
    assert text.exit_code == 0, text.output
    assert "circle -> square: 4 (100.0%)" in text.stdout
    assert [line.split() for line in text.stdout.splitlines()[2:5]] == [
        ["circle", "4", "0.0000"], ["square", "4", "1.0000"], ["triangle", "4", "1.0000"]]


def test_report_writes_the_known_confusion_to_csv_and_a_png(cli, colour_run, tmp_path, shared_umask):
    root, ckpt = colour_run
    out = eval_json(cli, "--ckpt", ckpt, "--report", tmp_path / "report")
    assert out["report"]["files"] == ["per_class.csv", "confusion.csv", "confusion.png"]
    # for others to read as any file the user makes
    assert {name: stat.S_IMODE((tmp_path / "report" / name).stat().st_mode) for name in out["report"]["files"]} == \
           {name: shared_umask for name in out["report"]["files"]}
    assert out["per_class"][0]["top1"] == 0.0  # --report implies --per-class

    with open(tmp_path / "report" / "confusion.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true \\ predicted", *CLASSES]
    matrix = {row[0]: dict(zip(CLASSES, map(int, row[1:]))) for row in rows[1:]}
    assert matrix["circle"] == {"circle": 0, "square": 4, "triangle": 0}
    assert matrix["square"]["square"] == 4 and matrix["triangle"]["triangle"] == 4

    with open(tmp_path / "report" / "per_class.csv", newline="") as f:
        per_class = list(csv.DictReader(f))
    assert [(r["class"], r["images"], r["correct"], float(r["top1"])) for r in per_class] == [
        ("circle", "4", "0", 0.0), ("square", "4", "4", 1.0), ("triangle", "4", "4", 1.0)]

    png = (tmp_path / "report" / "confusion.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_report_without_matplotlib_skips_the_png_with_one_line(cli, colour_run, tmp_path, monkeypatch):
    root, ckpt = colour_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    result = cli("eval", "--ckpt", ckpt, "--report", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["confusion.csv", "per_class.csv"]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "confusion.png skipped" in lines[0] and "matplotlib" in lines[0]


def test_sweep_sizes_keep_the_config_ratio():
    default = DataConfig()  # resize 256, crop 224: crop / 0.875
    assert [sweep_sizes(default, crop) for crop in (160, 192, 224, 256)] == [
        (182, 160), (219, 192), (256, 224), (292, 256)]
    assert sweep_sizes(DataConfig(val_resize=32, val_crop=32), 24) == (24, 24)  # the demo's ratio 1


def test_resolutions_give_one_row_per_size_equal_to_an_eval_at_that_size(cli, random_run):
    out = eval_json(cli, "--ckpt", random_run, "--resolutions", "16,24,28")
    assert [(r["crop"], r["resize"]) for r in out["sweep"]] == [(16, 18), (24, 27), (28, 32)]
    for row in out["sweep"]:
        alone = eval_json(cli, "--ckpt", random_run, "--set", f"data.val_resize={row['resize']}",
                          "--set", f"data.val_crop={row['crop']}")
        assert row["images"] == alone["images"] == 12
        assert (row["top1"], row["top5"]) == (alone["top1"], alone["top5"])
        assert row["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    assert out["sweep"][2]["loss"] == pytest.approx(out["loss"], rel=1e-6)  # 28 is the config's own size
    assert len({round(r["loss"], 6) for r in out["sweep"]}) == 3  # the sizes really differ

    text = cli("eval", "--ckpt", random_run, "--resolutions", "16,24,28")
    assert text.exit_code == 0, text.output
    rows = [line.split() for line in text.stdout.splitlines()[2:-1]]  # the last line: the preprocessing
    assert [(int(r[0]), int(r[1])) for r in rows] == [(16, 18), (24, 27), (28, 32)]


def test_tta_flip_is_the_mean_of_the_logits_of_the_image_and_its_mirror(cli, random_run, image_root):
    plain = eval_json(cli, "--ckpt", random_run)
    flipped = eval_json(cli, "--ckpt", random_run, "--tta", "flip")
    assert flipped["tta"] == "flip" and plain["tta"] is None

    state = load_ckpt(random_run)
    cfg = eval_config(image_root, 3, "data.val_resize=32", "data.val_crop=28")
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    model.eval()
    loader, _ = data.build_val_loader(cfg.data, image_root / "val")
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255
    losses, correct = [], 0
    with torch.no_grad():
        for images, labels, _ in loader:
            x = (images.float() - mean) / std
            logits = (model(x) + model(torch.flip(x, dims=[3]))) / 2
            losses.append(F.cross_entropy(logits, labels, reduction="sum"))
            correct += (logits.argmax(1) == labels).sum().item()
    assert flipped["loss"] == pytest.approx(sum(losses).item() / 12, rel=1e-4)
    assert flipped["top1"] == correct / 12
    assert flipped["loss"] != pytest.approx(plain["loss"], rel=1e-3)  # the mirror changes what is measured


@pytest.mark.parametrize("args, message", [
    (["--tta", "rotate"], "--tta rotate: unknown; choose one of flip"),
    (["--resolutions", "16,big"], "--resolutions 16,big: 'big' is not a whole number of pixels"),
    (["--resolutions", "4"], "--resolutions 4: 4 is too small a crop; at least 8 pixels"),
    (["--report", "{tmp}/file"], "--report {tmp}/file: is a file; the report needs a folder"),
    (["--report", "{tmp}/file/report"], "--report {tmp}/file/report: cannot write the report"),
])
def test_eval_in_depth_bad_input_exits_2_with_one_line(cli, colour_run, tmp_path, args, message):
    (tmp_path / "file").write_text("a file where the report folder should go")
    root, ckpt = colour_run
    result = cli("eval", "--ckpt", ckpt, *[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message.format(tmp=tmp_path)}"), lines


def test_most_confused_orders_by_count_then_by_class_and_skips_empty_classes():
    confusion = torch.tensor([[5, 2, 0, 0],
                              [3, 1, 0, 2],
                              [0, 2, 0, 0],
                              [0, 0, 0, 0]])
    names = ["a", "b", "c", "d"]
    pairs = [(c["true"], c["predicted"], c["count"]) for c in eval_report.most_confused(confusion, names)]
    assert pairs == [("b", "a", 3), ("a", "b", 2), ("b", "d", 2), ("c", "b", 2)]
    assert eval_report.most_confused(confusion, names, count=1)[0]["fraction"] == 0.5
    rows = eval_report.per_class(confusion, names)
    assert [(r["images"], r["correct"], r["top1"]) for r in rows] == [
        (7, 5, 5 / 7), (6, 1, 1 / 6), (2, 0, 0.0), (0, 0, None)]


def test_changing_tb_per_class_on_resume_is_harmless():
    from mbv2train.config import Config
    from mbv2train.train.run_state import config_changes

    saved = Config().to_dict()
    now = {**saved, "train": {**saved["train"], "tb_per_class": True}}
    assert config_changes(saved, now) == ([], ["train.tb_per_class: False -> True"])


@pytest.mark.parametrize("hflip, warned", [(0.0, True), (0.5, False)])
def test_tta_flip_warns_once_when_the_model_was_trained_without_flips(cli, image_root, tmp_path, hflip, warned):
    cfg = eval_config(image_root, 3, f"data.hflip={hflip}")
    ckpt = save_checkpoint(tmp_path / "model.pt", build_model(cfg.model).eval(), cfg, CLASSES)
    flipped = cli("eval", "--ckpt", ckpt, "--tta", "flip", "--json")
    assert flipped.exit_code == 0, flipped.output
    assert json.loads(flipped.stdout)["tta"] == "flip"  # it still runs
    warning = ("warning: --tta flip: the model was trained without flips (data.hflip 0), so mirrored images "
               "are new to it and flip TTA may lower its accuracy")
    assert flipped.stderr.splitlines() == ([warning] if warned else [])
    assert cli("eval", "--ckpt", ckpt).stderr == ""  # no TTA, nothing to warn about
