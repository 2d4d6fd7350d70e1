"""mbv2 quantize: int8 PT2E quantization of a trained demo checkpoint, scored beside the float model; the
int8 file loads in mbv2 eval (same top-1) and exports to ONNX with quantize/dequantize nodes."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import MACHINE_THREADS, load_ckpt, torch_threads

# one worker builds the session's trained_digits model for this file and test_export
pytestmark = pytest.mark.xdist_group("trained_digits")

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def quantized(trained_digits, tmp_path_factory):
    """(digits root, float checkpoint, int8 file, mbv2 quantize's JSON report)."""
    from typer.testing import CliRunner

    from mbv2train.cli import app

    root, ckpt = trained_digits
    out = tmp_path_factory.mktemp("int8") / "digits.int8.pt"
    with torch_threads(MACHINE_THREADS):  # as the float model was trained (conftest.trained_digits)
        result = CliRunner().invoke(app, ["quantize", "--ckpt", str(ckpt), "--data", str(root), "--output",
                                          str(out), "--json"])
    assert result.exit_code == 0, result.output
    return root, ckpt, out, json.loads(result.stdout)


def test_int8_keeps_top1_within_a_point_in_a_file_at_most_035x_the_float_one(quantized):
    root, ckpt, out, report = quantized
    f, q = report["float"], report["int8"]
    assert f["images"] == q["images"] == 360
    assert 0.5 < f["top1"] <= 1  # a model that learned the digits: the comparison means something
    assert abs(f["top1"] - q["top1"]) <= 0.01
    assert report["top1_drop"] == pytest.approx(f["top1"] - q["top1"])
    assert q["bytes"] == out.stat().st_size
    assert report["size_ratio"] == pytest.approx(q["bytes"] / f["bytes"]) and report["size_ratio"] <= 0.35
    assert report["calibration_images"] == 512 and report["backend"] == "x86"
    for side in (f, q):
        assert side["latency_ms_batch1"] > 0 and side["images_per_s_batch32"] > 0


def test_mbv2_eval_on_the_int8_file_reproduces_the_reported_top1(cli, quantized):
    root, ckpt, out, report = quantized
    result = cli("eval", "--ckpt", out, "--data", root, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["top1"] == report["int8"]["top1"] and scores["top5"] == report["int8"]["top5"]
    float_scores = json.loads(cli("eval", "--ckpt", ckpt, "--data", root, "--json").stdout)
    assert float_scores["top1"] == report["float"]["top1"]


def test_the_int8_file_holds_int8_weights_and_predicts_like_eval(cli, quantized):
    from mbv2train.model import int8file
    from mbv2train.checkpoint import load_checkpoint

    root, ckpt, out, report = quantized
    state = load_checkpoint(out)  # weights_only, as every mbv2 checkpoint
    program = int8file.load_program(state, out)
    dtypes = {t.dtype for t in list(program.state_dict.values()) + list(program.constants.values())}
    assert torch.int8 in dtypes
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in op for op in ops) and any("dequantize_per_channel" in op for op in ops)
    result = cli("predict", "--ckpt", out, root / "val" / "7", "--json", "--topk", "1")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == len(list((root / "val" / "7").iterdir()))


def test_the_int8_model_exports_to_onnx_with_quantize_dequantize_nodes(cli, quantized, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    root, ckpt, out, report = quantized
    result = cli("export", "--ckpt", out, "--format", "onnx", "--output", tmp_path / "q.onnx", "--json")
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)
    assert check["top1_agreement"] >= 0.98
    ops = {node.op_type for node in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    refused = cli("export", "--ckpt", out, "--format", "torchvision")
    assert refused.exit_code == 2 and "takes float models" in refused.stderr


@pytest.mark.slow
def test_xnnpack_quantization_lowers_to_an_executorch_program_that_checks_out(cli, trained_digits, tmp_path):
    pytest.importorskip("executorch")
    root, ckpt = trained_digits
    out = tmp_path / "x.int8.pt"
    result = cli("quantize", "--ckpt", ckpt, "--data", root, "--backend", "xnnpack", "--output", out,
                 "--calibration-images", "128", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["backend"] == "xnnpack" and abs(report["top1_drop"]) <= 0.01
    result = cli("export", "--ckpt", out, "--format", "executorch", "--json")
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)
    assert check["path"] == str(tmp_path / "x.int8.pte") and check["top1_agreement"] >= 0.98
    assert json.loads((tmp_path / "x.int8.pte.json").read_text())["mbv2.classes"] == [str(d) for d in range(10)]


def test_calibration_images_are_a_seeded_sample_across_classes(trained_digits):
    from mbv2train import data
    from mbv2train.config import load_config

    root, _ = trained_digits
    cfg = load_config(None, ["data.val_resize=32", "data.val_crop=32", "data.batch_size=16",
                             "data.num_workers=0"]).data
    first = [data.build_val_loader(cfg, root / "train", shuffle_seed=0)[0] for _ in range(2)]
    orders = [[int(label) for _, labels, _ in loader for label in labels] for loader in first]
    assert orders[0] == orders[1]  # the same sample each time
    assert len(set(orders[0][:64])) == 10  # the first 64 already hold every digit
    assert sorted(orders[0]) == sorted(int(label) for _, labels, _ in
                                       data.build_val_loader(cfg, root / "train")[0] for label in labels)


@pytest.mark.parametrize("args, message", [
    (["--backend", "arm"], "--backend arm: unknown; choose one of x86, xnnpack"),
    (["--calibration-images", "0"], "--calibration-images 0: must be at least 1"),
])
def test_bad_quantize_options_give_one_line_and_exit_2(cli, trained_digits, args, message):
    root, ckpt = trained_digits
    result = cli("quantize", "--ckpt", ckpt, "--data", root, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_quantizing_an_int8_file_or_a_missing_or_wrong_folder_is_refused(cli, quantized, tmp_path):
    root, ckpt, out, report = quantized
    no_val = tmp_path / "no_val"
    no_val.mkdir()
    (no_val / "train").symlink_to(root / "train")
    for args, message in ((["--ckpt", out, "--data", root], "already an int8 model"),
                          (["--ckpt", ckpt, "--data", tmp_path / "nowhere"], "data folder not found"),
                          (["--ckpt", ckpt, "--data", no_val], "its class folders are not the model's 10 classes")):
        result = cli("quantize", *args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.output


def test_without_torchao_quantize_says_how_to_install_it(cli, trained_digits, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    root, ckpt = trained_digits
    result = cli("quantize", "--ckpt", ckpt, "--data", root)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "pip install 'mbv2train[quantize]'" in result.stderr


def test_eval_refuses_ema_choice_and_cuda_for_an_int8_file(cli, quantized):
    root, ckpt, out, report = quantized
    for args, message in ((["--ema"], "holds one set of weights"), (["--device", "cuda"], "run on the CPU")):
        result = cli("eval", "--ckpt", out, "--data", root, *args)
        assert result.exit_code == 2 and message in result.stderr, result.output


def test_the_int8_file_replaces_the_one_there_only_once_it_is_scored(trained_digits, tmp_path, monkeypatch,
                                                                     shared_umask):
    """A run stopped while it scores the int8 model (here, Ctrl-C) leaves the file that was there; a run
    that ends writes its file, with the mode the umask gives."""
    import stat
    from pathlib import Path

    from mbv2train.model import int8file
    from mbv2train.deploy import quantize

    root, ckpt = trained_digits
    out = tmp_path / "digits.int8.pt"
    out.write_bytes(b"an earlier int8 file")
    scored, real_scores = [], quantize._scores

    def scores(req, val_dir):
        scored.append((Path(req.ckpt), out.read_bytes()))
        if len(scored) == 2 and interrupt:
            raise KeyboardInterrupt
        return real_scores(req, val_dir)

    monkeypatch.setattr(quantize, "_scores", scores)
    request = quantize.QuantizeRequest(ckpt=ckpt, data=root, calibration_images=16, output=out)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        quantize.run_quantize(request)
    assert out.read_bytes() == b"an earlier int8 file"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left

    interrupt, scored = False, []
    report = quantize.run_quantize(request)
    [(float_ckpt, _), (int8_scored, while_scored)] = scored
    assert float_ckpt == ckpt and int8_scored != out
    assert while_scored == b"an earlier int8 file"  # not replaced before it was scored
    assert report["output"] == str(out) and report["int8"]["bytes"] == out.stat().st_size
    assert int8file.is_int8_file(load_ckpt(out))
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    assert stat.S_IMODE(out.stat().st_mode) == shared_umask
