"""`mbv2 summary` and `mbv2 config show`."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Optional

import typer

from mbv2train.cli.app import ConfigOption, SetOption, app, config_app, reports_user_errors
from mbv2train.words import plural

# The commands import their code (and torch) inside, so that --help stays fast (see __init__.py).


@app.command()
@reports_user_errors
def summary(
    config: ConfigOption = None,
    width_mult: Annotated[Optional[float], typer.Option(
        help="Width multiplier (overrides model.width_mult).")] = None,
    image_size: Annotated[Optional[int], typer.Option(
        min=1, max=4096, show_default=False,
        help="Input height and width in pixels; default: the config's data.image_size (224).")] = None,
    num_classes: Annotated[Optional[int], typer.Option(
        help="Number of classes (overrides model.num_classes); default: model.num_classes, else the class "
             "folders of the config's training data, else 1000.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size for the shapes and batch totals.")] = 1,
    depth: Annotated[int, typer.Option(
        min=0, help="How many levels of the module tree the table shows (0: the model only).")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    show_grid: Annotated[bool, typer.Option(
        "--grid", help="Parameters and multiply-adds for widths 0.35-1.4 at 96-224 px, as one table.")] = False,
    overrides: SetOption = None,
) -> None:
    """Print MobileNetV2's layer table, parameters and multiply-adds.

    The model is the one --config describes (its width, data.image_size, and classes), ImageNet's at 224 px
    without one."""
    from mbv2train.config import load_config

    cfg = load_config(config, overrides or [], options={"model.width_mult": ("--width-mult", width_mult),
                                                         "model.num_classes": ("--num-classes", num_classes)})

    from mbv2train.data.folders import class_count  # torch comes in here
    from mbv2train.model import summary as summ

    num_classes, classes_from, note = class_count(cfg)
    if note is not None:
        typer.echo(f"note: {note}", err=True)

    if show_grid:
        cells = summ.grid(num_classes=num_classes)
        if as_json:
            typer.echo(json.dumps({"num_classes": num_classes, "cells": cells}))
        else:
            typer.echo(summ.format_grid(cells, num_classes))
        return

    model_cfg = dataclasses.replace(cfg.model, num_classes=num_classes)
    result = summ.summarize_config(model_cfg, image_size=image_size or cfg.data.image_size, batch_size=batch_size,
                                   depth=depth)
    if as_json:
        typer.echo(json.dumps({"model": "MobileNetV2", "width_mult": cfg.model.width_mult,
                               "num_classes": num_classes, **result.to_dict()}))
    else:
        source = f" ({classes_from})" if classes_from else ""
        title = (f"MobileNetV2, width {cfg.model.width_mult:g}, {plural(num_classes, 'class')}{source}, "
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
