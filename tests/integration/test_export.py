"""mbv2 export: every format written from a trained demo checkpoint, loaded back in its own runtime and
checked against PyTorch on the real digits; the ONNX metadata is enough to use the model without mbv2."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import REPO, load_ckpt
from mbv2train import data
from mbv2train.evaluate import loop
from mbv2train.evaluate.evaluation import EvalRequest, load_model

# one worker builds the session's trained_digits model for this file and test_quantize
pytestmark = pytest.mark.xdist_group("trained_digits")

FORMATS = ["onnx", "torchscript", "pt2", "torchvision", "executorch"]
SIDECAR = ("torchvision", "executorch")  # formats whose metadata goes into a JSON file beside them
KEYS = {"mbv2.classes", "mbv2.mean", "mbv2.std", "mbv2.resize", "mbv2.crop", "mbv2.interpolation",
        "mbv2.checkpoint_sha256", "mbv2.version"}


def needs(fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    if fmt == "executorch":
        pytest.importorskip("executorch")


def export_json(cli, *args, code=0):
    result = cli("export", *args, "--json")
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if code == 0 else result


def eval_logits_of(ckpt, val_dir):
    """(paths, logits) of every val image, computed as mbv2 eval computes them."""
    loaded = load_model(EvalRequest(ckpt=ckpt, device="cpu"))
    loader, _ = data.build_val_loader(loaded.cfg.data, val_dir)
    logits = []
    with torch.inference_mode():
        for images, labels, _ in loader:
            logits.append(loop.eval_logits(loaded.model, loaded.runtime.prepare(images, labels)[0], loaded.runtime))
    return [path for path, _ in loader.dataset.samples], torch.cat(logits)


@pytest.fixture(scope="module")
def onnx_export(trained_digits, tmp_path_factory):
    """(path, JSON report) of the demo checkpoint exported to ONNX once for the tests that read the file."""
    needs("onnx")
    from typer.testing import CliRunner

    from mbv2train.cli import app

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = CliRunner().invoke(app, ["export", "--ckpt", str(trained_digits[1]), "--format", "onnx", "--output",
                                      str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_exports_the_demo_checkpoint_and_checks_itself_on_real_digits(
        cli, trained_digits, tmp_path, fmt, request):
    needs(fmt)
    root, ckpt = trained_digits
    if fmt == "onnx":
        out, report = request.getfixturevalue("onnx_export")
        tmp_path = out.parent
    else:
        out = tmp_path / f"model.{fmt}"
        report = export_json(cli, "--ckpt", ckpt, "--format", fmt, "--output", out)
    assert set(report) == {"format", "path", "bytes", "max_abs_diff", "top1_agreement", "images"}
    assert report["format"] == fmt and report["path"] == str(out)
    assert report["bytes"] == out.stat().st_size > 100_000
    assert report["images"] == 256  # the default, out of the 360 val digits
    assert report["top1_agreement"] == 1.0
    assert report["max_abs_diff"] <= 1e-4
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_the_onnx_file_gives_evals_logits_on_every_val_digit(trained_digits, onnx_export, tmp_path):
    needs("onnx")
    import onnxruntime

    root, ckpt = trained_digits
    out, _ = onnx_export
    paths, expected = eval_logits_of(ckpt, root / "val")
    loaded = load_model(EvalRequest(ckpt=ckpt, device="cpu"))
    loader, _ = data.build_val_loader(loaded.cfg.data, root / "val")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.cat([torch.from_numpy(session.run(["logits"], {
        "images": loaded.runtime.prepare(images, labels)[0].contiguous().numpy()})[0]) for images, labels, _ in loader])
    assert len(got) == 360
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_the_torchvision_state_dict_loads_strictly_into_torchvisions_own_model_with_equal_logits(
        cli, trained_digits, tmp_path):
    import torchvision

    root, ckpt = trained_digits
    out = tmp_path / "tv.pth"
    export_json(cli, "--ckpt", ckpt, "--format", "torchvision", "--output", out)
    info = json.loads((tmp_path / "tv.pth.json").read_text())
    assert KEYS <= set(info)
    assert info["torchvision"]["num_classes"] == 10 and info["torchvision"]["width_mult"] == 0.5
    model = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5)
    model.load_state_dict(load_ckpt(out), strict=True)
    model.eval()
    loaded = load_model(EvalRequest(ckpt=ckpt, device="cpu"))
    loader, _ = data.build_val_loader(loaded.cfg.data, root / "val")
    images, labels, _ = next(iter(loader))
    batch = loaded.runtime.prepare(images, labels)[0].contiguous()
    with torch.inference_mode():
        assert torch.equal(model(batch), loaded.model.to(memory_format=torch.contiguous_format)(batch))


# Only onnxruntime, PIL and numpy: what a user's app has, with mbv2 and torch nowhere.
STANDALONE = textwrap.dedent('''
    import json, sys
    import numpy as np
    import onnxruntime
    from PIL import Image

    model_path, *image_paths = sys.argv[1:]
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["mbv2.classes"])
    mean = np.array(json.loads(meta["mbv2.mean"]), dtype=np.float32)
    std = np.array(json.loads(meta["mbv2.std"]), dtype=np.float32)
    resize, crop = int(meta["mbv2.resize"]), int(meta["mbv2.crop"])
    mode = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[meta["mbv2.interpolation"]]
    batch = []
    for path in image_paths:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        image = image.resize(size, mode)
        left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
        image = image.crop((left, top, left + crop, top + crop))
        x = (np.asarray(image, dtype=np.float32) / 255 - mean) / std
        batch.append(x.transpose(2, 0, 1))
    logits = session.run(["logits"], {"images": np.stack(batch)})[0]
    print(json.dumps({"logits": logits.tolist(), "classes": [classes[i] for i in logits.argmax(1)],
                      "imported": sorted(m for m in ("torch", "mbv2train") if m in sys.modules)}))
''')


def test_the_onnx_metadata_is_enough_to_preprocess_and_name_classes_without_mbv2(trained_digits, onnx_export, tmp_path):
    needs("onnx")
    from PIL import Image

    root, ckpt = trained_digits
    out, _ = onnx_export
    # digits at other sizes and shapes than the model's 32 px, so that the resize and the crop are exercised
    val = tmp_path / "val"
    originals = sorted((root / "val").glob("*/*.png"))[::12]
    for i, path in enumerate(originals):
        size = [(48, 48), (40, 56), (70, 45)][i % 3]
        (val / path.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").resize(size, Image.BILINEAR).save(val / path.parent.name / path.name)
    paths, expected = eval_logits_of(ckpt, val)
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-I", str(script), str(out), *paths], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["imported"] == []
    got = torch.tensor(answer["logits"])
    classes = json.loads(json.dumps(load_model(EvalRequest(ckpt=ckpt, device="cpu")).classes))
    assert answer["classes"] == [classes[i] for i in expected.argmax(1).tolist()]
    # PIL's resampling and torchvision's tensor resize round differently at the last bit of a pixel
    assert (got - expected).abs().max().item() < 0.05


def test_the_onnx_model_carries_exactly_the_mbv2_metadata_keys_with_a_dynamic_batch(trained_digits, onnx_export,
                                                                                      tmp_path):
    needs("onnx")
    import onnx

    root, ckpt = trained_digits
    out, _ = onnx_export
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert set(meta) == KEYS
    assert json.loads(meta["mbv2.classes"]) == [str(d) for d in range(10)]
    assert json.loads(meta["mbv2.mean"]) == [0.5, 0.5, 0.5] and json.loads(meta["mbv2.std"]) == [0.5, 0.5, 0.5]
    assert (meta["mbv2.resize"], meta["mbv2.crop"], meta["mbv2.interpolation"]) == ("32", "32", "bilinear")
    from mbv2train.checkpoint import file_sha256
    assert meta["mbv2.checkpoint_sha256"] == file_sha256(ckpt)
    [images] = model.graph.input
    [logits] = model.graph.output
    assert (images.name, logits.name) == ("images", "logits")
    dims = images.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # named, not fixed
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]


def test_a_fixed_batch_and_another_image_size_are_what_the_file_takes(cli, trained_digits, tmp_path):
    needs("onnx")
    import onnx

    root, ckpt = trained_digits
    out = tmp_path / "m.onnx"
    report = export_json(cli, "--ckpt", ckpt, "--format", "onnx", "--output", out, "--batch-size", "3",
                         "--image-size", "48", "--images", "100")
    assert report["images"] == 100  # 33 batches of 3 and one image filled up to a batch
    model = onnx.load(str(out))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [3, 3, 48, 48]
    meta = {p.key: p.value for p in model.metadata_props}
    assert (meta["mbv2.resize"], meta["mbv2.crop"]) == ("48", "48")


def test_torchscript_and_pt2_keep_the_metadata_in_their_extra_files(cli, trained_digits, tmp_path):
    root, ckpt = trained_digits
    export_json(cli, "--ckpt", ckpt, "--format", "torchscript", "--output", tmp_path / "m.ts")
    extra = {k: "" for k in KEYS}
    torch.jit.load(str(tmp_path / "m.ts"), _extra_files=extra)
    assert json.loads(extra["mbv2.classes"]) == [str(d) for d in range(10)] and extra["mbv2.crop"] == b"32"  # bytes
    export_json(cli, "--ckpt", ckpt, "--format", "pt2", "--output", tmp_path / "m.pt2")
    extra = {k: "" for k in KEYS}
    program = torch.export.load(str(tmp_path / "m.pt2"), extra_files=extra)
    assert extra["mbv2.interpolation"] == "bilinear"
    assert program.module()(torch.zeros(5, 3, 32, 32)).shape == (5, 10)  # any batch


@pytest.mark.parametrize("fmt", ["torchscript", "torchvision"])
def test_an_export_and_its_json_have_the_mode_the_umask_gives(cli, trained_digits, tmp_path, fmt, shared_umask):
    """Not the 0600 of a private temp file: a service that runs the model under another account of the
    group reads them. Every format goes through the same temp file and rename; these two are the quick ones
    (torchvision's has a JSON file beside it)."""
    needs(fmt)
    root, ckpt = trained_digits
    out = tmp_path / "exported" / f"model.{fmt}"
    export_json(cli, "--ckpt", ckpt, "--format", fmt, "--output", out, "--images", "8")
    written = sorted((tmp_path / "exported").iterdir())
    assert [p.name for p in written] == [out.name] + ([out.name + ".json"] if fmt in SIDECAR else [])
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in written} == {p.name: shared_umask for p in written}


def test_an_export_that_disagrees_with_pytorch_exits_1_and_keeps_the_file_already_there(
        cli, trained_digits, tmp_path, monkeypatch):
    from mbv2train.deploy import runtimes

    root, ckpt = trained_digits
    out = tmp_path / "m.pt2"
    out.write_bytes(b"an earlier export")
    honest = runtimes.LOADERS["pt2"]
    monkeypatch.setitem(runtimes.LOADERS, "pt2", lambda path, native: (
        lambda images, run=honest(path, native): run(images) + 1e-3))  # noqa: B008 - loaded once, as the real one
    result = cli("export", "--ckpt", ckpt, "--format", "pt2", "--output", out)
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: pt2 export of") and "0.001" in line and "nothing was written" in line
    assert out.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]


@pytest.mark.parametrize("args, message", [
    (["--format", "onnxx"], "--format onnxx: unknown; choose one of onnx, torchscript, pt2, executorch, torchvision"),
    (["--format", "pt2", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--format", "pt2", "--batch-size", "2", "--dynamic-batch"], "give one"),
    (["--format", "executorch", "--dynamic-batch"], "ExecuTorch programs are planned for one batch size"),
    (["--format", "pt2", "--images", "0"], "--images 0: must be at least 1"),
    (["--format", "pt2", "--data", "/nonexistent/digits"], "data folder not found: /nonexistent/digits"),
])
def test_bad_export_options_give_one_line_and_exit_2(cli, trained_digits, args, message):
    root, ckpt = trained_digits
    result = cli("export", "--ckpt", ckpt, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_bad_checkpoint_gives_one_line_and_exit_2(cli, tmp_path, trained_digits):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    state_dict = tmp_path / "weights.pt"
    torch.save({"classifier.1.weight": torch.zeros(2, 4)}, state_dict)
    for path, message in ((garbage, "is not an mbv2 checkpoint (a text file"),
                          (tmp_path / "missing.pt", "checkpoint not found"),
                          (state_dict, "not a training checkpoint")):
        result = cli("export", "--ckpt", path, "--format", "pt2")
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    root, ckpt = trained_digits
    result = cli("export", "--ckpt", ckpt, "--format", "pt2", "--output", ckpt)
    assert result.exit_code == 2 and "is the checkpoint itself" in result.stderr


@pytest.mark.parametrize("fmt, extra, module", [("onnx", "export", "onnxruntime"),
                                                 ("executorch", "executorch", "executorch")])
def test_a_missing_extra_says_how_to_install_it(cli, trained_digits, monkeypatch, fmt, extra, module):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    root, ckpt = trained_digits
    result = cli("export", "--ckpt", ckpt, "--format", fmt)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1
    assert module in result.stderr and f"pip install 'mbv2train[{extra}]'" in result.stderr


def test_the_deploy_doc_lines_run_the_onnx_model_without_mbv2_and_name_evals_class(trained_digits, onnx_export,
                                                                                     tmp_path):
    from PIL import Image

    root, ckpt = trained_digits
    out, _ = onnx_export
    doc = (REPO / "docs" / "DEPLOY.md").read_text()
    start = doc.index("    import json, numpy as np, onnxruntime; from PIL import Image\n")
    lines = []
    for line in doc[start:].splitlines():
        if not line.startswith("    "):
            break
        lines.append(line[4:])
    assert len(lines) <= 8
    code = "\n".join(lines).replace("runs/demo/best.onnx", str(out)).replace("digit.png", str(tmp_path / "digit.png"))
    val = tmp_path / "val" / "4"
    val.mkdir(parents=True)
    source = sorted((root / "val" / "4").glob("*.png"))[0]
    Image.open(source).convert("RGB").resize((45, 61), Image.BILINEAR).save(tmp_path / "digit.png")
    (val / "digit.png").write_bytes((tmp_path / "digit.png").read_bytes())
    _, expected = eval_logits_of(ckpt, tmp_path / "val")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-I", "-c", code + "\nimport sys; assert 'torch' not in sys.modules"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    classes = load_model(EvalRequest(ckpt=ckpt, device="cpu")).classes
    assert run.stdout.strip() == classes[expected.argmax(1).item()]


def test_loading_the_executorch_exporter_says_nothing_of_its_dependencies():
    # importing executorch imports torchao, which logs a deprecation notice of torch's on stderr (a W line in
    # glog's format) once per process: not the user's business, and it would sit between export's own lines
    needs("executorch")
    code = "from mbv2train.deploy.export import executorch_lowering; executorch_lowering()"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
