"""`mbv2 train` and `mbv2 eval`."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mbv2train.cli.app import ConfigOption, DataOption, SetOption, app, echo_once, reports_user_errors
from mbv2train.faults import Faults
from mbv2train.preemption import Preempted
from mbv2train.train.run_status import records_run_status

# The commands import the rest (the config's yaml, torch) inside, so that --help stays fast (see __init__.py).


@app.command()
@reports_user_errors
@records_run_status
def train(
    config: ConfigOption = None,
    data: DataOption = None,
    output_dir: Annotated[Optional[Path], typer.Option(
        help="Run directory for checkpoints, metrics and TensorBoard files (sets train.output_dir).")] = None,
    overrides: SetOption = None,
    resume: Annotated[Optional[str], typer.Option(
        help="'auto': continue from the newest valid checkpoint in the run directory, if any; "
             "or a checkpoint path.")] = None,
    allow_change: Annotated[Optional[list[str]], typer.Option(
        help="On resume, accept a change to this config key on purpose (repeatable); it is recorded "
             "in metrics.jsonl.")] = None,
    fault: Annotated[Optional[list[str]], typer.Option(hidden=True)] = None,
    status_file: Annotated[Optional[Path], typer.Option(
        hidden=True, help="Write how the run ended here (one line of JSON) for a job script; a stop by a "
                          "signal then exits 0 (scripts/slurm/train.sbatch).")] = None,
) -> None:
    """Train MobileNetV2 on an ImageNet-style folder of class folders.

    SIGTERM, SIGINT or SIGUSR1 finish the current step, write a checkpoint and exit with 128 + the signal
    number; a second Ctrl-C stops at once. Under torchrun, a process that dies or hangs past
    train.dist_timeout_s stops the others with exit code 1; a group torchrun restarts resumes by itself.
    """
    from mbv2train.config import preflight
    from mbv2train.config import load_config

    cfg = load_config(config, overrides or [], options={
        "data.root": ("--data", str(data) if data is not None else None),
        "train.output_dir": ("--output-dir", str(output_dir) if output_dir is not None else None)})
    faults = Faults.parse(fault or [])
    preflight.for_train(cfg, resume)

    from mbv2train.train.trainer import fit  # torch comes in here

    try:
        fit(cfg, resume=resume, allow_changes=allow_change or [], faults=faults)
    except Preempted as stopped:
        # the job script's status file belongs to that job, not to a resume typed by hand
        command = ["mbv2", *_without_option(sys.argv[1:], "--status-file")]
        if "--resume" not in command:
            command += ["--resume", "auto"]
        echo_once(f"{stopped}\nresume with: {shlex.join(command)}")  # every process stopped: one says so
        raise typer.Exit(stopped.exit_code) from None


def _without_option(args: list[str], option: str) -> list[str]:
    """``args`` less ``option VALUE`` and ``option=VALUE``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


@app.command("eval")
@reports_user_errors
def evaluate(
    ckpt: Annotated[Path, typer.Option(help="Checkpoint from mbv2 train, or a bare MobileNetV2 state dict.")],
    data: Annotated[Optional[Path], typer.Option(
        help="Dataset root (its val split is used) or a folder of class folders; "
             "default: the checkpoint's own data settings.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="Use this config's data and train settings instead of the checkpoint's; "
                               "a training checkpoint keeps its own model.")] = None,
    overrides: SetOption = None,
    ema: Annotated[Optional[bool], typer.Option(
        "--ema/--no-ema", help="Evaluate the EMA weights or the raw ones; "
                               "default: whichever the run's best metric followed.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per batch.")] = None,
    width_mult: Annotated[Optional[float], typer.Option(
        help="Width multiplier of a bare state dict (default 1.0).")] = None,
    num_classes: Annotated[Optional[int], typer.Option(
        min=1, help="Classes of a bare state dict (default: read from its classifier).")] = None,
    device: Annotated[Optional[str], typer.Option(
        help="auto, cpu or cuda; default: the config's train.device.")] = None,
    per_class: Annotated[bool, typer.Option(
        "--per-class", help="Also top-1 and image count per class, and the most confused class pairs.")] = False,
    report: Annotated[Optional[Path], typer.Option(
        help="Write per_class.csv, confusion.csv and confusion.png (with matplotlib) into this folder; "
             "implies --per-class.")] = None,
    resolutions: Annotated[Optional[str], typer.Option(
        help="Also evaluate at these crop sizes, e.g. 160,192,224,256, each resized by the config's "
             "val_resize / val_crop ratio; one row per size.")] = None,
    tta: Annotated[Optional[str], typer.Option(
        help="Test-time augmentation: 'flip' averages the logits of each image and its mirror image.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Report loss, top-1 and top-5 of a checkpoint on a val folder."""
    from mbv2train.config import preflight

    preflight.for_eval(ckpt, data, config)
    from mbv2train.evaluate.evaluation import EvalRequest, parse_resolutions, run_eval

    result = run_eval(EvalRequest(ckpt=ckpt, data=data, config=config, overrides=overrides or [], ema=ema,
                                  batch_size=batch_size, width_mult=width_mult, num_classes=num_classes,
                                  device=device, per_class=per_class, report=report, tta=tta,
                                  resolutions=parse_resolutions(resolutions)))
    for note in result.get("report", {}).get("notes", []):
        typer.echo(f"note: {note}", err=True)
    if as_json:
        keys = ("top1", "top5", "loss", "images", "ema", "tta", "preprocessing", "per_class", "confused", "sweep",
                "report")
        typer.echo(json.dumps({**{k: result[k] for k in keys if k in result}, "ckpt": str(ckpt)}))
        return
    from mbv2train.evaluate.report import per_class_lines, sweep_lines
    from mbv2train.evaluate.evaluation import preprocessing_line

    weights = "EMA weights" if result["ema"] else "weights"
    tta_note = f", TTA {result['tta']}" if result["tta"] else ""
    typer.echo(f"{ckpt} ({weights}{tta_note}) on {result['val_dir']}: top-1 {result['top1']:.4f}  "
               f"top-5 {result['top5']:.4f}  loss {result['loss']:.4f}  images {result['images']}")
    lines = []
    if "per_class" in result:
        lines += per_class_lines(result)
    if "sweep" in result:
        lines += sweep_lines(result["sweep"])
    if "report" in result:
        lines.append(f"report written to {result['report']['dir']}: {', '.join(result['report']['files'])}")
    lines.append(preprocessing_line(result["preprocessing"]))
    for line in lines:
        typer.echo(line)
