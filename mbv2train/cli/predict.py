"""`mbv2 predict`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from mbv2train.cli.app import app, reports_user_errors

# The commands import their code (and torch) inside, so that --help stays fast (see __init__.py).


@app.command()
@reports_user_errors
def predict(
    paths: Annotated[list[Path], typer.Argument(
        help="Image files, or folders searched recursively for images.", show_default=False)],
    ckpt: Annotated[Path, typer.Option(
        help="Checkpoint from mbv2 train, or a state dict from mbv2 export --format torchvision with its JSON "
             "beside it: its class names and validation preprocessing are used.")],
    topk: Annotated[Optional[int], typer.Option(
        help="Classes shown per image, most probable first; default: 5, or every class when there are fewer.",
        show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Images per batch; default: the checkpoint's validation batch size.")] = None,
    ema: Annotated[Optional[bool], typer.Option(
        "--ema/--no-ema", help="Use the EMA weights or the raw ones; default: whichever the run's best "
                               "metric followed (as mbv2 eval).")] = None,
    device: Annotated[Optional[str], typer.Option(
        help="auto, cpu or cuda; default: the checkpoint's train.device.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per image.")] = False,
) -> None:
    """Print the most probable classes of each image.

    One line per image, tab-separated: the path, then the class and its probability for each of the top-k
    classes, most probable first.

    Results go to stdout in the order the paths were given (a folder's images in sorted order); the
    progress bar and warnings go to stderr. An unreadable file gets one warning line and the command
    exits with 1 after predicting the others.
    """
    from mbv2train.config import preflight

    preflight.for_predict(ckpt, paths)
    from mbv2train.evaluate.predict import PredictRequest, predict as run_predict

    def show(prediction) -> None:
        if as_json:
            typer.echo(json.dumps({"path": prediction.path, "topk": [
                {"class": name, "index": index, "prob": prob} for name, index, prob in prediction.topk]}))
        else:
            typer.echo("\t".join([prediction.path, *(f"{name}\t{prob:.4f}" for name, _, prob in prediction.topk)]))

    def warn(reason: str) -> None:
        typer.echo(f"warning: {reason}", err=True)

    unreadable = run_predict(PredictRequest(ckpt=ckpt, paths=paths, topk=topk, batch_size=batch_size, ema=ema,
                                            device=device), show, warn,
                             on_note=lambda line: typer.echo(f"note: {line}", err=True))
    if unreadable:
        raise typer.Exit(1)
