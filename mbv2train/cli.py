"""The ``mbv2`` command: parses options and calls one function per command.

torch is imported inside the commands that need it, so ``mbv2 --help`` and config errors answer at
once instead of after the second or more that importing torch takes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mbv2train import __version__
from mbv2train.errors import UserError

app = typer.Typer(
    help="Train, evaluate and inspect MobileNetV2 (Sandler et al., 2018) on ImageNet-style image folders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and check YAML configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Datasets: write the demo dataset, check a dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ConfigOption = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="YAML config file; settings it leaves out keep their defaults.")]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override one setting, e.g. --set model.width_mult=0.75 (repeatable).")]


def reports_user_errors(command):
    """Turn the project's UserError into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            exc.__traceback__ = None  # frees a failed DataLoader's workers now, not at some later collection
            one_line = str(exc).replace("\n", "\\n")  # a value typed with a newline stays on the line
            typer.echo(f"error: {one_line}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted; nothing was saved for the current step", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            if not _cut_short_by_ctrl_c(exc):
                raise
            typer.echo("error: interrupted; nothing was saved for the current step", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _cut_short_by_ctrl_c(exc: BaseException) -> bool:
    """Whether an error was raised while a KeyboardInterrupt was unwinding: a Ctrl-C can land inside a
    library's half-done bookkeeping (tqdm's lock, say), whose cleanup then fails with an error of its own."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__context__
    return False


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mbv2train {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Train, evaluate and inspect MobileNetV2 (Sandler et al., 2018) on ImageNet-style image folders."""


@app.command()
@reports_user_errors
def train(
    config: ConfigOption = None,
    data: Annotated[Optional[Path], typer.Option(
        help="Dataset folder with train/ and val/ inside (sets data.root).")] = None,
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
) -> None:
    """Train MobileNetV2 on an ImageNet-style folder (one subfolder per class).

    SIGTERM, SIGINT or SIGUSR1 finish the current step, write a checkpoint and exit with 128 + the signal
    number; a second Ctrl-C stops at once.
    """
    from mbv2train.config import load_config
    from mbv2train.faults import Faults

    cfg = load_config(config, overrides or [], options={
        "data.root": ("--data", str(data) if data is not None else None),
        "train.output_dir": ("--output-dir", str(output_dir) if output_dir is not None else None)})
    faults = Faults.parse(fault or [])

    from mbv2train.preemption import Preempted
    from mbv2train.trainer import fit  # torch comes in here

    try:
        fit(cfg, resume=resume, allow_changes=allow_change or [], faults=faults)
    except Preempted as stopped:
        command = ["mbv2", *sys.argv[1:]]
        if "--resume" not in command:
            command += ["--resume", "auto"]
        typer.echo(f"{stopped}\nresume with: {shlex.join(command)}")
        raise typer.Exit(stopped.exit_code) from None


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
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Report loss, top-1 and top-5 of a checkpoint on a validation folder."""
    from mbv2train.evaluation import EvalRequest, run_eval

    result = run_eval(EvalRequest(ckpt=ckpt, data=data, config=config, overrides=overrides or [], ema=ema,
                                  batch_size=batch_size, width_mult=width_mult, num_classes=num_classes))
    if as_json:
        typer.echo(json.dumps({"top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
                               "images": result["images"], "ema": result["ema"], "ckpt": str(ckpt)}))
    else:
        weights = "EMA weights" if result["ema"] else "weights"
        typer.echo(f"{ckpt} ({weights}) on {result['val_dir']}: top-1 {result['top1']:.4f}  "
                   f"top-5 {result['top5']:.4f}  loss {result['loss']:.4f}  images {result['images']}")


@data_app.command("demo")
@reports_user_errors
def data_demo(dest: Annotated[Path, typer.Argument(help="Folder to write train/ and val/ into.")]) -> None:
    """Write scikit-learn's handwritten digits (1,797 real scans, 10 classes) as an ImageFolder of PNGs."""
    from mbv2train.data.demo import write_demo_dataset

    info = write_demo_dataset(dest)
    state = "written" if info["created"] else "already there"
    typer.echo(f"digits demo dataset {state}: {dest} ({info['train']} train / {info['val']} val images, "
               f"{info['classes']} classes)")


@data_app.command("check")
@reports_user_errors
def data_check(
    folder: Annotated[Path, typer.Argument(help="A dataset root (train/ and val/ inside) or one split folder.")],
    workers: Annotated[Optional[int], typer.Option(min=1, help="Processes to scan with (default: all cores).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Fail on warnings too (files that train fine but other tools may misread).")] = False,
) -> None:
    """Scan a dataset for unreadable images, empty or mismatched class folders and wrong extensions.

    Exits 1 when it finds an error (training would stop or lose files), 0 otherwise; warnings (e.g. PNG data
    in a .jpg file) are reported but exit 0 unless --strict.
    """
    from mbv2train.data.check import check_dataset, format_report

    report = check_dataset(folder, workers=workers, strict=strict)
    typer.echo(json.dumps(report) if as_json else format_report(report))
    raise typer.Exit(0 if report["ok"] else 1)


@app.command()
@reports_user_errors
def summary(
    config: ConfigOption = None,
    width_mult: Annotated[Optional[float], typer.Option(
        help="Width multiplier (overrides model.width_mult).")] = None,
    image_size: Annotated[int, typer.Option(min=1, max=4096, help="Input height and width in pixels.")] = 224,
    num_classes: Annotated[Optional[int], typer.Option(
        help="Number of classes (overrides model.num_classes).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size for the shapes and batch totals.")] = 1,
    depth: Annotated[int, typer.Option(
        min=0, help="How many levels of the module tree the table shows (0: the model only).")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    show_grid: Annotated[bool, typer.Option(
        "--grid", help="Parameters and multiply-adds for widths 0.35-1.4 at 96-224 px, as one table.")] = False,
    overrides: SetOption = None,
) -> None:
    """Print the layer table, parameter count and multiply-adds of MobileNetV2."""
    from mbv2train.config import load_config

    cfg = load_config(config, overrides or [], options={"model.width_mult": ("--width-mult", width_mult),
                                                         "model.num_classes": ("--num-classes", num_classes)})

    from mbv2train import summary as summ  # torch comes in here

    num_classes = cfg.model.num_classes or 1000  # unset means "from the data"; summary has none

    if show_grid:
        cells = summ.grid(num_classes=num_classes)
        if as_json:
            typer.echo(json.dumps({"num_classes": num_classes, "cells": cells}))
        else:
            typer.echo(summ.format_grid(cells, num_classes))
        return

    model_cfg = dataclasses.replace(cfg.model, num_classes=num_classes)
    result = summ.summarize_config(model_cfg, image_size=image_size, batch_size=batch_size, depth=depth)
    if as_json:
        typer.echo(json.dumps({"model": "MobileNetV2", "width_mult": cfg.model.width_mult,
                               "num_classes": num_classes, **result.to_dict()}))
    else:
        title = (f"MobileNetV2, width {cfg.model.width_mult:g}, {num_classes} classes, "
                 f"input {'x'.join(map(str, result.input_size))}")
        typer.echo(summ.format_summary(result, title))


@config_app.command("show")
@reports_user_errors
def config_show(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    import yaml

    from mbv2train.config import load_config

    cfg = load_config(config, overrides or [])
    typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())


def main() -> None:
    app(prog_name="mbv2")


if __name__ == "__main__":
    sys.exit(main())
