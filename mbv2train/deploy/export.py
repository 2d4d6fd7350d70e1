"""`mbv2 export`: one writer per format, each checked in its own runtime before the command reports
success (verify.py). A file that fails its check is removed; a file of the same name from before is
replaced only by one that passed.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mbv2train import atomic_files
from mbv2train import extras
from mbv2train.model import sidecar as metadata
from mbv2train.deploy import runtimes, verify
from mbv2train.deploy.requests import ExportRequest, check_export
from mbv2train.deploy.source import ModelSource, load_source, real_images
from mbv2train.errors import ConfigError
from mbv2train.words import plural

SIDECAR = ("executorch", "torchvision")  # formats with no place for metadata: a JSON file beside them
FLOAT_ONLY = ("torchscript", "torchvision")


def run_export(req: ExportRequest, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    output = check_export(req)
    src = load_source(req.ckpt, req.ema, req.image_size)
    if src.quantized and req.format in FLOAT_ONLY:
        raise ConfigError(f"--format {req.format}: takes float models; {req.ckpt} is int8 (from mbv2 quantize): "
                          f"export it as onnx, pt2 or executorch")
    images, val_dir = real_images(src, req.data, req.images)
    fixed_batch = req.batch_size or (1 if req.format == "executorch" else None)
    native = metadata.values(src.classes, src.preprocess, src.sha256)
    if req.format == "torchvision":
        native["torchvision"] = torchvision_builder(src)

    output.parent.mkdir(parents=True, exist_ok=True)
    # some exporters go by the file's suffix: the temp file has the output's
    with atomic_files.replacing(output, suffix="".join(output.suffixes[-1:])) as temp:
        log(f"exporting {req.ckpt} ({'int8' if src.quantized else 'float'}, {src.image_size} px) as {req.format}")
        WRITERS[req.format](src, temp, fixed_batch, native)
        log(f"checking it in {runtimes.RUNTIME_NAMES[req.format]} on {plural(len(images), 'image')} from {val_dir}")
        check = verify.compare(src.model, runtimes.load(req.format, temp, native, src.quantized), images,
                               fixed_batch, src.quantized)
        if not check.passed:
            raise verify.ExportMismatch(f"{req.format} export of {req.ckpt} disagrees with PyTorch: "
                                        f"{check.describe()}; nothing was written to {output}")
    written = [output]
    if req.format in SIDECAR:
        sidecar = metadata.sidecar_of(output)
        atomic_files.write_text(sidecar, json.dumps(native, indent=2) + "\n")
        written.append(sidecar)
    return {"format": req.format, "path": str(output), "bytes": output.stat().st_size,
            "max_abs_diff": check.max_abs_diff, "top1_agreement": check.top1_agreement, "images": check.images,
            "quantized": src.quantized, "tolerance": check.tolerance, "files": [str(p) for p in written]}


def _exported(src: ModelSource, fixed_batch: Optional[int]) -> torch.export.ExportedProgram:
    """torch.export of the model: a dynamic batch axis unless a batch size was fixed (the example needs
    two images: torch.export treats a batch of one as a constant)."""
    if fixed_batch is not None:
        return torch.export.export(src.graph_module(), (src.example(fixed_batch),))
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(src.graph_module(), (src.example(2),), dynamic_shapes=({0: batch},))


def _write_onnx(src: ModelSource, path: Path, fixed_batch: Optional[int], native: dict[str, Any]) -> None:
    import onnx  # the optional export extra

    program = _exported(src, fixed_batch)
    # the exporter reports each of its passes on stdout, which carries this command's result
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(program, (src.example(fixed_batch or 2),), str(path), input_names=["images"],
                          output_names=["logits"], dynamo=True, external_data=False, verbose=False)
    model = onnx.load(str(path))
    for key, value in metadata.as_strings(native).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def _write_torchscript(src: ModelSource, path: Path, fixed_batch: Optional[int], native: dict[str, Any]) -> None:
    # MobileNetV2's forward has no data-dependent control flow, so a trace is the whole model, at any batch.
    # TorchScript is deprecated in favour of torch.export (pt2), and says so at each call: DEPLOY.md says it once.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        traced = torch.jit.trace(src.model, src.example(fixed_batch or 2), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files=metadata.as_strings(native))


def _write_pt2(src: ModelSource, path: Path, fixed_batch: Optional[int], native: dict[str, Any]) -> None:
    torch.export.save(_exported(src, fixed_batch), str(path), extra_files=metadata.as_strings(native))


def executorch_lowering():
    """ExecuTorch's lowering function and its XNNPACK partitioner."""
    # the optional executorch extra, which imports torchao
    with extras.torchao_notices_muted():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower, XnnpackPartitioner


def _write_executorch(src: ModelSource, path: Path, fixed_batch: Optional[int], native: dict[str, Any]) -> None:
    to_edge_transform_and_lower, XnnpackPartitioner = executorch_lowering()
    if src.quantized:
        # quantize/dequantize that XNNPACK does not take (an x86-quantized model's) run on ExecuTorch's
        # portable quantized kernels, which this import (of the optional executorch extra) registers
        import executorch.kernels.quantized  # noqa: F401

    lowered = to_edge_transform_and_lower(_exported(src, fixed_batch), partitioner=[XnnpackPartitioner()])
    path.write_bytes(lowered.to_executorch().buffer)


def torchvision_builder(src: ModelSource) -> dict[str, Any]:
    """The arguments of torchvision.models.mobilenet_v2 that build this model's architecture."""
    m = src.cfg.model
    return {"builder": "torchvision.models.mobilenet_v2", "num_classes": len(src.classes),
            "width_mult": m.width_mult, "round_nearest": m.round_nearest}


def _write_torchvision(src: ModelSource, path: Path, fixed_batch: Optional[int], native: dict[str, Any]) -> None:
    # mbv2's MobileNetV2 uses torchvision's parameter names, so its state dict is torchvision's as it is
    torch.save({k: v.contiguous() for k, v in src.model.state_dict().items()}, path)


WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "pt2": _write_pt2,
           "executorch": _write_executorch, "torchvision": _write_torchvision}
