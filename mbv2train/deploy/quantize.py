"""`mbv2 quantize`: int8 post-training quantization through PT2E (torch.export, prepare, calibrate,
convert), with the float and int8 models scored side by side on the val folder.

The quantizers live in torchao (x86: ``X86InductorQuantizer``) and ExecuTorch (xnnpack:
``XNNPACKQuantizer``); torch itself no longer carries them. Weights are int8 per output channel,
activations 8-bit per tensor, calibrated on training images with the evaluation transform.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mbv2train import atomic_files, data
from mbv2train.evaluate import loop
from mbv2train import extras
from mbv2train.model import int8file
from mbv2train.deploy.requests import QuantizeRequest, check_quantize
from mbv2train.deploy.source import ModelSource, load_source, prepared_batches, real_images
from mbv2train.errors import ConfigError, DataError
from mbv2train.evaluate.evaluation import EvalRequest, load_model, val_dir_of
from mbv2train.words import plural
from mbv2train.shortlist import differences

CALIBRATION_SEED = 0
LATENCY_RUNS = 20  # batch-1 calls timed; the median is reported
THROUGHPUT_RUNS = 5  # batch-32 calls timed


def run_quantize(req: QuantizeRequest, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    output = check_quantize(req)
    src = load_source(req.ckpt, req.ema, wanted_by="mbv2 quantize")
    if src.quantized:
        raise ConfigError(f"{req.ckpt}: is already an int8 model; quantize the float checkpoint it came from")
    train_dir = req.data / src.cfg.data.train_split
    if not train_dir.is_dir():
        raise DataError(f"{req.data}: no {src.cfg.data.train_split}/ folder to take calibration images from")
    val_dir = val_dir_of(src.cfg, req.data)
    for folder in (train_dir, val_dir):  # before the minutes of calibration, not after
        _, found = data.build_val_loader(src.cfg.data, folder)
        if found != src.classes:
            raise DataError(f"{folder}: its class folders are not the model's {plural(len(src.classes), 'class')} "
                            f"({differences('the model', src.classes, 'the folder', found)}); "
                            f"pass the dataset the model was trained on")

    log(f"calibrating on {plural(req.calibration_images, 'image')} from {train_dir} ({req.backend} quantizer)")
    # a seeded random sample, so that a small one still holds every class
    calibration = prepared_batches(src.cfg.data, train_dir, req.calibration_images, shuffle_seed=CALIBRATION_SEED)
    float_program = _export(src.model, src.example(2))
    program = quantize(float_program, req.backend, calibration)

    info = {"class_names": src.classes, "config": src.cfg.to_dict(), "ema": src.ema, "backend": req.backend,
            "calibration_images": sum(len(b) for b in calibration), "source_checkpoint_sha256": src.sha256}
    # scored from a file beside the output, which takes the output's name only once it has been scored: a run
    # that stops before leaves the file that was there
    with atomic_files.replacing(output, suffix=".pt") as scored:
        int8_bytes = int8file.save(scored, program, **info)
        with tempfile.TemporaryDirectory() as scratch:  # the float model in the same container, to compare sizes
            float_bytes = int8file.save(Path(scratch) / "float.pt", float_program, **info)

        log(f"scoring the float and int8 models on {val_dir}")
        float_scores = _scores(EvalRequest(ckpt=req.ckpt, ema=src.ema, device="cpu"), val_dir)
        int8_scores = _scores(EvalRequest(ckpt=scored, device="cpu"), val_dir)  # loaded back as mbv2 eval loads it
    images = _timing_images(src, req.data)
    log("timing both on the CPU (PyTorch, batch 1 and 32)")
    float_speed = _speed(src.model, images)
    int8_speed = _speed(int8file.FrozenProgram(program, len(src.classes)), images)
    result = {
        "float": {**float_scores, "bytes": float_bytes, **float_speed},
        "int8": {**int8_scores, "bytes": int8_bytes, **int8_speed},
        "top1_drop": float_scores["top1"] - int8_scores["top1"],
        "size_ratio": int8_bytes / float_bytes,
        "output": str(output), "backend": req.backend, "calibration_images": info["calibration_images"],
        "val_dir": str(val_dir), "threads": torch.get_num_threads(),
    }
    return result


def quantizer_for(backend: str):
    if backend == "x86":  # torchao and executorch: optional extras, imported for the backend asked for
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)

        # 7-bit activations: x86 integer kernels without VNNI (onnxruntime's u8s8 path on AVX2) saturate
        # their 16-bit intermediate sums on full-range uint8 inputs; measured on the demo, full range lost
        # 4 points of top-1 in onnxruntime while the PyTorch program lost none.
        quantizer = X86InductorQuantizer()
        quantizer.set_global(get_default_x86_inductor_quantization_config(reduce_range=True))
        return quantizer
    with extras.torchao_notices_muted():  # executorch imports torchao
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer, get_symmetric_quantization_config)

    quantizer = XNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True))
    return quantizer


def quantize(float_program: torch.export.ExportedProgram, backend: str,
             calibration: list[torch.Tensor]) -> torch.export.ExportedProgram:
    """The int8 program: observers inserted by the backend's quantizer, run over the calibration
    batches, then turned into quantize/dequantize pairs around int8 weights."""
    pt2e = extras.import_pt2e_quantization()
    prepared = pt2e.prepare_pt2e(float_program.module(), quantizer_for(backend))
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    converted = pt2e.convert_pt2e(prepared)
    _drop_unused_tensors(converted)
    return _export(converted, calibration[0][:2] if len(calibration[0]) >= 2 else torch.cat([calibration[0]] * 2))


def _export(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """torch.export with any batch size (an example of two images: a batch of one would be a constant)."""
    return torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))


def _drop_unused_tensors(module: torch.fx.GraphModule) -> None:
    """convert_pt2e leaves the float weights on the module beside the int8 ones its graph reads; they
    would be saved too and make the int8 file larger than the float one."""
    used = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
        if name not in used:
            owner_name, _, leaf = name.rpartition(".")
            delattr(module.get_submodule(owner_name) if owner_name else module, leaf)


def _scores(req: EvalRequest, val_dir: Path) -> dict[str, Any]:
    """top-1 / top-5 as mbv2 eval computes them, for the model in ``req.ckpt``."""
    loaded = load_model(req)
    loader, _ = data.build_val_loader(loaded.cfg.data, val_dir)
    metrics = loop.evaluate(loaded.model, loader, loaded.runtime)
    return {k: metrics[k] for k in ("top1", "top5", "images")}


def _timing_images(src: ModelSource, data_dir: Path) -> torch.Tensor:
    """32 val images (repeated when the folder has fewer)."""
    images, _ = real_images(src, data_dir, 32)
    return torch.cat([images] * -(-32 // len(images)))[:32]


@torch.inference_mode()
def _speed(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Median batch-1 latency (ms) and batch-32 throughput (images/s) in eager PyTorch on the CPU."""
    def median_seconds(batch: torch.Tensor, runs: int) -> float:
        model(batch)  # warm-up: first calls allocate and pick kernels
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {"latency_ms_batch1": 1000 * median_seconds(images[:1], LATENCY_RUNS),
            "images_per_s_batch32": 32 / median_seconds(images[:32], THROUGHPUT_RUNS)}
