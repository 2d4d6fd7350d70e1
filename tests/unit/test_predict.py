"""mbv2 predict: top-k classes of image files, as mbv2 eval would count them."""

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import load_ckpt, truncated_jpeg
from support.eval_models import calibrated_model, eval_config, save_checkpoint
from mbv2train import data
from mbv2train.evaluate import loop
from mbv2train.evaluate.evaluation import EvalRequest, load_model

DIGITS_SETTINGS = ["data.val_resize=32", "data.val_crop=32", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]",
                   "data.batch_size=64"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(digits demo dataset root, checkpoint of a calibrated random model for it, raw and EMA weights that
    differ; best.pt followed the raw ones)."""
    pytest.importorskip("sklearn")
    from mbv2train.data.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("digits") / "digits"
    write_demo_dataset(root)
    cfg = eval_config(root, 10, *DIGITS_SETTINGS)
    loader, classes = data.build_val_loader(cfg.data, root / "val")
    images = torch.cat([batch[0] for batch in loader])
    model, ema = calibrated_model(cfg, images, seed=1), calibrated_model(cfg, images, seed=2)
    return root, save_checkpoint(root.parent / "digits.pt", model, cfg, classes, ema_model=ema)


def predict_json(cli, *args, code=0):
    result = cli("predict", *args, "--json")
    assert result.exit_code == code, result.output
    return [json.loads(line) for line in result.stdout.splitlines()], result


def eval_way_predictions(ckpt, val_dir, ema=None) -> dict[str, int]:
    """Each val image's top-1 as mbv2 eval computes it: its model loading, its val loader, its forward pass."""
    loaded = load_model(EvalRequest(ckpt=ckpt, ema=ema))
    loader, _ = data.build_val_loader(loaded.cfg.data, val_dir)
    top1 = []
    with torch.inference_mode():
        for images, labels, _ in loader:
            images, labels = loaded.runtime.prepare(images, labels)
            top1 += loop.eval_logits(loaded.model, images, loaded.runtime).topk(1, dim=1).indices[:, 0].tolist()
    return {path: index for (path, _), index in zip(loader.dataset.samples, top1)}


def test_predict_agrees_image_for_image_with_eval_on_the_digits(cli, digits, tmp_path):
    root, ckpt = digits
    results, _ = predict_json(cli, "--ckpt", ckpt, "--topk", "1", root / "val")
    predicted = {r["path"]: r["topk"][0]["index"] for r in results}
    assert len(results) == len(predicted) == 360

    expected = eval_way_predictions(ckpt, root / "val")
    assert predicted == expected
    assert len(set(predicted.values())) >= 4  # a model that called everything one class would prove little

    # and mbv2 eval's own counts: its confusion matrix is predict's, cell for cell
    result = cli("eval", "--ckpt", ckpt, "--report", tmp_path / "report", "--json")
    assert result.exit_code == 0, result.output
    with open(tmp_path / "report" / "confusion.csv", newline="") as f:
        rows = list(csv.reader(f))
    classes = rows[0][1:]
    from_eval = {(row[0], p): int(n) for row in rows[1:] for p, n in zip(classes, row[1:])}
    from_predict = {(t, p): 0 for t in classes for p in classes}
    for r in results:
        from_predict[(Path(r["path"]).parent.name, r["topk"][0]["class"])] += 1
    assert from_predict == from_eval
    assert json.loads(result.stdout)["top1"] == pytest.approx(
        sum(n for (t, p), n in from_predict.items() if t == p) / 360)


def test_a_corrupt_file_among_the_digits_warns_once_exits_1_and_the_rest_are_predicted(cli, digits, tmp_path):
    root, ckpt = digits
    val = shutil.copytree(root / "val", tmp_path / "val")
    bad = val / "4" / "0999x.png"  # sorts amid class 4's images, so it shares a batch with others
    bad.write_bytes(truncated_jpeg())
    results, result = predict_json(cli, "--ckpt", ckpt, "--topk", "1", val, code=1)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: cannot read image") and str(bad) in lines[0], lines

    predicted = {str(Path(r["path"]).relative_to(val)): r["topk"][0]["index"] for r in results}
    clean = {str(Path(p).relative_to(root / "val")): i for p, i in eval_way_predictions(ckpt, root / "val").items()}
    assert predicted == clean  # all 360 readable images, each with its own prediction


def test_predict_prints_the_top_k_classes_of_files_and_folders_in_the_order_given(cli, digits):
    root, ckpt = digits
    file = sorted((root / "val" / "7").iterdir())[0]
    folder = root / "val" / "2"
    text = cli("predict", "--ckpt", ckpt, "--topk", "3", file, folder, "--batch-size", "5")
    assert text.exit_code == 0, text.output
    assert text.stderr == ""
    results, _ = predict_json(cli, "--ckpt", ckpt, "--topk", "3", file, folder, "--batch-size", "5")
    paths = [str(file)] + sorted(str(p) for p in folder.iterdir())
    assert [r["path"] for r in results] == paths

    lines = [line.split("\t") for line in text.stdout.splitlines()]
    assert len(lines) == len(paths)
    for fields, r in zip(lines, results):
        assert len(fields) == 1 + 2 * 3  # path, then class and probability three times
        assert fields[0] == r["path"]
        assert fields[1::2] == [t["class"] for t in r["topk"]]
        assert [float(p) for p in fields[2::2]] == [pytest.approx(t["prob"], abs=5e-5) for t in r["topk"]]
        probs = [t["prob"] for t in r["topk"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert [t["class"] for t in r["topk"]] == [str(t["index"]) for t in r["topk"]]  # digit names


def test_predict_ema_chooses_the_weights_as_eval_does(cli, digits):
    root, ckpt = digits
    folder = root / "val" / "5"
    raw = {r["path"]: r["topk"][0]["index"] for r in predict_json(cli, "--ckpt", ckpt, "--topk", "1", folder)[0]}
    ema = {r["path"]: r["topk"][0]["index"]
           for r in predict_json(cli, "--ckpt", ckpt, "--topk", "1", "--ema", folder)[0]}
    assert raw != ema  # two differently seeded models
    expected_raw = eval_way_predictions(ckpt, root / "val")
    expected_ema = eval_way_predictions(ckpt, root / "val", ema=True)
    assert raw == {p: expected_raw[p] for p in raw}  # best.pt followed the raw weights: the default
    assert ema == {p: expected_ema[p] for p in ema}


def jpeg_with_a_broken_huffman_table() -> bytes:
    """A complete JPEG (its header reads fine) whose entropy-coding table is garbage: no decoder reads it."""
    from PIL import Image

    pixels = torch.randint(0, 256, (24, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy(), "RGB").save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    table = data.find(b"\xff\xc4")
    data[table + 5:table + 21] = b"\xff" * 16  # code counts per length: far more codes than fit
    return bytes(data)


def test_predict_decodes_on_the_device_when_the_checkpoint_says_so(cli, image_root, tmp_path):
    """data.decode: device: JPEGs are decoded in batches as eval's loader decodes them, and a JPEG that only
    fails there is still reported and skipped."""
    from PIL import Image

    val = tmp_path / "jpegs" / "val"
    for png in sorted((image_root / "val").glob("*/*.png")):
        (val / png.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(png).save(val / png.parent.name / f"{png.stem}.jpg", quality=90)
    cfg = eval_config(tmp_path / "jpegs", 3, "data.decode=device", "data.val_resize=20", "data.val_crop=16")
    loader, classes = data.build_val_loader(cfg.data, val)
    model = calibrated_model(cfg, torch.cat([batch[0] for batch in loader]), seed=4)
    ckpt = save_checkpoint(tmp_path / "device.pt", model, cfg, classes)
    expected = eval_way_predictions(ckpt, val)

    bad = val / "square" / "001x.jpg"
    bad.write_bytes(jpeg_with_a_broken_huffman_table())
    results, result = predict_json(cli, "--ckpt", ckpt, "--topk", "1", val, code=1)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: cannot read image {bad}: "), lines
    assert {r["path"]: r["topk"][0]["index"] for r in results} == expected


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "{ckpt}", "{tmp}/missing.png"], "no such file or folder: {tmp}/missing.png"),
    (["--ckpt", "{ckpt}", "{tmp}/empty"], "no images in {tmp}/empty or below it"),
    (["--ckpt", "{tmp}/garbage.pt", "{tmp}/one.png"], "{tmp}/garbage.pt is not an mbv2 checkpoint (its first"),
    (["--ckpt", "{tmp}/missing.pt", "{tmp}/one.png"], "checkpoint not found: {tmp}/missing.pt"),
    (["--ckpt", "{tmp}/bare.pth", "{tmp}/one.png"], "{tmp}/bare.pth: not a training checkpoint of mbv2 train"),
    (["--ckpt", "{ckpt}", "--topk", "0", "{tmp}/one.png"], "--topk 0: must be at least 1"),
    (["--ckpt", "{ckpt}", "--topk", "11", "{tmp}/one.png"], "--topk 11: the checkpoint's model has 10 classes"),
    (["--ckpt", "{ckpt}", "--batch-size", "0", "{tmp}/one.png"], "--batch-size"),
    (["--ckpt", "{ckpt}", "--device", "tpu", "{tmp}/one.png"], "--device"),
])
def test_predict_bad_input_exits_2_with_one_line(cli, digits, tmp_path, args, message):
    root, ckpt = digits
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    shutil.copy(next((root / "val" / "0").iterdir()), tmp_path / "one.png")
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    torch.save(load_ckpt(ckpt)["model"], tmp_path / "bare.pth")
    result = cli("predict", *[a.format(tmp=tmp_path, ckpt=ckpt) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message.format(tmp=tmp_path)), lines
    assert result.stdout == ""


@pytest.fixture
def listings(tmp_path, monkeypatch):
    """The real paths of the folders under tmp_path that were listed, in order; a walk that lists more than
    100 of them (one that follows a symlink loop) stops with an error instead of running for ever."""
    import os

    listed = []
    real_scandir = os.scandir

    def counting_scandir(path="."):
        real = os.path.realpath(path)
        if real.startswith(os.path.realpath(tmp_path)):
            listed.append(real)
            if len(listed) > 100:
                raise RuntimeError(f"listed {len(listed)} folders; the last: {path}")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    return listed


def test_symlinks_lead_to_each_folder_once_and_each_image_is_predicted_once(cli, digits, tmp_path, listings):
    """Two loops (a folder linked to its parent, one to itself), a second name for a folder, and two more
    names for one image: every folder is listed once, every image file (whatever its names) predicted
    once, under the name the walk meets first."""
    root, ckpt = digits
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "c").mkdir()
    first, second = sorted((root / "val" / "3").iterdir())[:2]
    shutil.copy(first, photos / "y.png")
    shutil.copy(second, photos / "a" / "x.png")
    (photos / "a" / "up").symlink_to("..")
    (photos / "a" / "here").symlink_to(".")
    (photos / "b").symlink_to("a")
    (photos / "c" / "x_again.png").symlink_to("../a/x.png")
    (photos / "c" / "x_once_more.png").symlink_to("../a/x.png")

    results, _ = predict_json(cli, "--ckpt", ckpt, "--topk", "1", photos)
    assert [r["path"] for r in results] == [str(photos / "y.png"), str(photos / "a" / "x.png")]
    assert sorted(listings) == sorted(str((photos / d).resolve()) for d in ("", "a", "c"))

    # named on the command line, two names of one file are one image too
    results, _ = predict_json(cli, "--ckpt", ckpt, "--topk", "1", photos / "c" / "x_again.png", photos / "a" / "x.png")
    assert [r["path"] for r in results] == [str(photos / "c" / "x_again.png")]


@pytest.fixture(scope="module")
def three_class_ckpt(tmp_path_factory, image_root):
    cfg = eval_config(image_root, 3)
    loader, classes = data.build_val_loader(cfg.data, image_root / "val")
    model = calibrated_model(cfg, torch.cat([batch[0] for batch in loader]), seed=5)
    return save_checkpoint(tmp_path_factory.mktemp("three") / "three.pt", model, cfg, classes)


def test_predict_shows_every_class_by_default_when_there_are_fewer_than_5(cli, image_root, three_class_ckpt):
    results, result = predict_json(cli, "--ckpt", three_class_ckpt, image_root / "val" / "circle")
    assert len(results) == 4 and result.stderr == ""
    assert [len(r["topk"]) for r in results] == [3, 3, 3, 3]
    assert all(sorted(t["class"] for t in r["topk"]) == ["circle", "square", "triangle"] for r in results)


def test_predict_refuses_an_explicit_topk_above_the_classes(cli, image_root, three_class_ckpt):
    result = cli("predict", "--ckpt", three_class_ckpt, "--topk", "5", image_root / "val" / "circle")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: --topk 5: the checkpoint's model has 3 classes; choose 1 to 3"]
