"""`mbv2 export` and `mbv2 quantize`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from mbv2train.cli.app import JsonOption, app, reports_user_errors
from mbv2train.words import plural

# The commands import their code (and torch) inside, so that --help stays fast (see __init__.py).

EmaOption = Annotated[Optional[bool], typer.Option(
    "--ema/--no-ema", help="Take the EMA weights or the raw ones; default: whichever the run's best metric "
                           "followed (as mbv2 eval).")]


@app.command()
@reports_user_errors
def export(
    ckpt: Annotated[Path, typer.Option(help="Checkpoint from mbv2 train, or an int8 model from mbv2 quantize.")],
    format: Annotated[str, typer.Option(
        "--format", help="onnx, torchscript, pt2 (torch.export), executorch (.pte, XNNPACK) or torchvision "
                         "(a state dict for torchvision.models.mobilenet_v2).")],
    output: Annotated[Optional[Path], typer.Option(
        help="File to write; default: beside the checkpoint, named after it (best.pt -> best.onnx).")] = None,
    ema: EmaOption = None,
    image_size: Annotated[Optional[int], typer.Option(
        help="Input size in pixels; default: the checkpoint's data.val_crop.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help="A fixed batch size; default: any batch (ExecuTorch: 1).")] = None,
    dynamic_batch: Annotated[bool, typer.Option(
        "--dynamic-batch", help="Any batch size (the default for onnx, torchscript and pt2).")] = False,
    data: Annotated[Optional[Path], typer.Option(
        help="Dataset whose val images the export is checked on; default: the checkpoint's.")] = None,
    images: Annotated[int, typer.Option(help="How many val images to check the export on.")] = 256,
    as_json: JsonOption = False,
) -> None:
    """Write a model in a deployment format, checked against PyTorch.

    The file is loaded back in its format's runtime and compared with PyTorch on real images; the command
    fails (exit 1) when they disagree beyond the tolerance (docs/DEPLOY.md).

    Every file carries the class names and the preprocessing (mbv2.classes, mbv2.mean, mbv2.std,
    mbv2.resize, mbv2.crop, mbv2.interpolation, mbv2.checkpoint_sha256, mbv2.version): in the ONNX
    model's metadata, in TorchScript's and torch.export's extra files, and in a JSON file beside the
    ExecuTorch and torchvision files.
    """
    from mbv2train.deploy.requests import ExportRequest, check_export

    req = ExportRequest(ckpt=ckpt, format=format, output=output, ema=ema, image_size=image_size,
                        batch_size=batch_size, dynamic_batch=dynamic_batch, data=data, images=images)
    check_export(req)
    from mbv2train.deploy.export import run_export

    def log(line: str) -> None:
        if not as_json:
            typer.echo(line, err=True)

    result = run_export(req, log)
    if as_json:
        typer.echo(json.dumps({k: result[k] for k in ("format", "path", "bytes", "max_abs_diff",
                                                       "top1_agreement", "images")}))
        return
    typer.echo(f"wrote {result['path']} ({result['bytes']:,} bytes)" + "".join(
        f" and {p}" for p in result["files"][1:]))
    typer.echo(f"checked: max abs logit difference {result['max_abs_diff']:.3g}, top-1 agreement "
               f"{result['top1_agreement']:.2%} on {plural(result['images'], 'image')} (needed: {result['tolerance']})")


@app.command()
@reports_user_errors
def quantize(
    ckpt: Annotated[Path, typer.Option(help="Float checkpoint from mbv2 train.")],
    data: Annotated[Path, typer.Option(
        help="Dataset folder: calibration images come from its train/ split, scores from its val/ split.")],
    calibration_images: Annotated[int, typer.Option(
        help="Training images the activation ranges are measured on (a seeded random sample).")] = 512,
    backend: Annotated[str, typer.Option(
        help="x86 (torchao's X86InductorQuantizer: servers, onnxruntime) or xnnpack (ExecuTorch on phones; "
             "needs the executorch extra).")] = "x86",
    output: Annotated[Optional[Path], typer.Option(
        help="File to write; default: beside the checkpoint (best.pt -> best.int8.pt).")] = None,
    ema: EmaOption = None,
    as_json: JsonOption = False,
) -> None:
    """Quantize a model to int8 and compare it with the float one.

    PT2E post-training quantization; the comparison: top-1 / top-5 on the val split, file sizes, CPU latency
    at batch 1 and throughput at batch 32.

    The int8 file loads in mbv2 eval and mbv2 predict, and mbv2 export writes it as ONNX (with
    QuantizeLinear/DequantizeLinear nodes), pt2 or ExecuTorch.
    """
    from mbv2train.deploy.requests import QuantizeRequest, check_quantize

    req = QuantizeRequest(ckpt=ckpt, data=data, calibration_images=calibration_images, backend=backend,
                          output=output, ema=ema)
    check_quantize(req)
    from mbv2train.deploy.quantize import run_quantize

    def log(line: str) -> None:
        if not as_json:
            typer.echo(line, err=True)

    result = run_quantize(req, log)
    if as_json:
        typer.echo(json.dumps(result))
        return
    f, q = result["float"], result["int8"]
    rows = [("top-1", f"{f['top1']:.2%}", f"{q['top1']:.2%}"), ("top-5", f"{f['top5']:.2%}", f"{q['top5']:.2%}"),
            ("file bytes", f"{f['bytes']:,}", f"{q['bytes']:,}"),
            ("latency, batch 1 (ms)", f"{f['latency_ms_batch1']:.2f}", f"{q['latency_ms_batch1']:.2f}"),
            ("throughput, batch 32 (img/s)", f"{f['images_per_s_batch32']:.0f}", f"{q['images_per_s_batch32']:.0f}")]
    typer.echo(f"{'':30}{'float':>14}{'int8':>14}")
    for name, a, b in rows:
        typer.echo(f"{name:30}{a:>14}{b:>14}")
    typer.echo(f"top-1 drop {100 * result['top1_drop']:.2f} points on {plural(q['images'], 'image')}; int8 file "
               f"{result['size_ratio']:.2f}x the float one; timed in eager PyTorch with "
               f"{plural(result['threads'], 'thread')}")
    typer.echo(f"wrote {result['output']} (evaluate it with: mbv2 eval --ckpt {result['output']})")
