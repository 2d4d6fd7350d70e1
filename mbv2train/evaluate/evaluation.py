"""`mbv2 eval`: top-1 / top-5 of a checkpoint (or a bare state dict) on a validation folder, with
per-class results and a confusion matrix (eval_report.py), a sweep over crop sizes, and flip TTA.

``load_model`` is shared with `mbv2 predict`: both see the same weights, config and preprocessing.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from mbv2train import checkpoint as ckpt
from mbv2train import cpu_threads, data, devices
from mbv2train.evaluate import loop, report as eval_report
from mbv2train.config import yaml_schema
from mbv2train.config import Config, DataConfig, config_from_dict, load_config
from mbv2train.model import int8file, sidecar as metadata
from mbv2train.errors import CheckpointError, ConfigError, DataError
from mbv2train.model import build_model
from mbv2train.config.preflight import data_folder
from mbv2train.devices import resolve_amp, resolve_device
from mbv2train.words import plural
from mbv2train.shortlist import shortlist

TTA_MODES = ("flip",)
MIN_CROP = 8  # data.val_crop's lower bound
# the settings that decide what an image looks like to the model: the ones a run reports it was scored with
PREPROCESSING_KEYS = ("data.val_resize", "data.val_crop", "data.interpolation", "data.mean", "data.std")
SAVED_CONFIG = "the checkpoint's config"


@dataclasses.dataclass
class EvalRequest:
    ckpt: Path
    data: Optional[Path] = None  # a dataset root (its val split is used) or a folder of class folders
    config: Optional[Path] = None  # replaces the checkpoint's own config
    overrides: Sequence[str] = ()
    ema: Optional[bool] = None  # None: the weights that picked best.pt (EMA when the run's best metric was EMA)
    batch_size: Optional[int] = None
    width_mult: Optional[float] = None  # for a bare state dict
    num_classes: Optional[int] = None  # for a bare state dict; default: read from its classifier
    device: Optional[str] = None  # auto, cpu, cuda; default: the config's train.device
    per_class: bool = False  # also per-class top-1 and the most confused pairs
    report: Optional[Path] = None  # write per_class.csv, confusion.csv, confusion.png here (implies per_class)
    resolutions: Sequence[int] = ()  # also evaluate at these crop sizes (the sweep)
    tta: Optional[str] = None  # "flip": average the logits of each image and its mirror image


@dataclasses.dataclass
class LoadedModel:
    """A checkpoint made ready to run: its config (with what was asked for), the model in eval mode on
    its device, the class names (None for a bare state dict without the JSON an export writes beside it),
    the runtime that prepares batches, and where the preprocessing settings came from."""

    cfg: Config
    model: nn.Module
    classes: Optional[list[str]]
    ema: bool
    device: torch.device
    runtime: devices.Runtime
    trained_hflip: Optional[float] = None  # the flip probability it was trained with; None: unknown
    preprocessing_from: str = SAVED_CONFIG


def run_eval(req: EvalRequest) -> dict[str, Any]:
    if req.tta is not None and req.tta not in TTA_MODES:
        raise ConfigError(f"--tta {req.tta}: unknown; choose one of {', '.join(TTA_MODES)}")
    if req.report is not None and req.report.exists() and not req.report.is_dir():
        raise ConfigError(f"--report {req.report}: is a file; the report needs a folder")  # before the work
    loaded = load_model(req)
    if req.tta == "flip" and loaded.trained_hflip == 0:
        print("warning: --tta flip: the model was trained without flips (data.hflip 0), so mirrored images are "
              "new to it and flip TTA may lower its accuracy", file=sys.stderr, flush=True)
    cfg = loaded.cfg
    val_dir = val_dir_of(cfg, req.data)
    per_class = req.per_class or req.report is not None
    loader, found = data.build_val_loader(cfg.data, val_dir, device_type=loaded.device.type)
    classes = loaded.classes
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise DataError(f"{val_dir}: its class folders differ from the checkpoint's classes "
                        f"(missing: {shortlist(missing)}; unexpected: {shortlist(extra)})")
    if classes is None and len(found) != cfg.model.num_classes:
        raise DataError(f"{val_dir}: {plural(len(found), 'class folder')} but the model predicts "
                        f"{plural(cfg.model.num_classes, 'class')}")

    tta_flip = req.tta == "flip"
    metrics = loop.evaluate(loaded.model, loader, loaded.runtime, per_class=per_class, tta_flip=tta_flip)
    result = {**metrics, "ema": loaded.ema, "val_dir": str(val_dir), "tta": req.tta,
              "preprocessing": preprocessing_of(loaded)}
    if per_class:
        confusion = result.pop("confusion")
        result.update(eval_report.summarize(confusion, found))
        if req.report is not None:
            result["report"] = eval_report.write_report(req.report, confusion, found)
    if req.resolutions:
        result["sweep"] = [_sweep_row(loaded, val_dir, size, metrics, tta_flip) for size in req.resolutions]
    return result


def preprocessing_of(loaded: LoadedModel) -> dict[str, Any]:
    """The validation preprocessing a model is run with, and where it came from (``from``)."""
    d = loaded.cfg.data
    return {"from": loaded.preprocessing_from, "resize": d.val_resize, "crop": d.val_crop,
            "interpolation": d.interpolation, "mean": list(d.mean), "std": list(d.std)}


def preprocessing_line(info: dict[str, Any]) -> str:
    """preprocessing_of's dict as the line that tells a user how the images were prepared."""
    def numbers(values) -> str:
        return " ".join(f"{v:g}" for v in values)

    return (f"preprocessing from {info['from']}: resize {info['resize']}, crop {info['crop']}, "
            f"{info['interpolation']}, mean {numbers(info['mean'])}, std {numbers(info['std'])}")


def parse_resolutions(text: Optional[str]) -> list[int]:
    """--resolutions "160,192,224" -> [160, 192, 224]; ConfigError (one line) for anything else."""
    if text is None:
        return []
    sizes = []
    for part in text.split(","):
        try:
            size = int(part.strip())
        except ValueError:
            raise ConfigError(f"--resolutions {text}: {part.strip()!r} is not a whole number of pixels; "
                              f"give crop sizes such as 160,192,224") from None
        if size < MIN_CROP:
            raise ConfigError(f"--resolutions {text}: {size} is too small a crop; at least {MIN_CROP} pixels")
        sizes.append(size)
    return list(dict.fromkeys(sizes))


def sweep_sizes(cfg: DataConfig, crop: int) -> tuple[int, int]:
    """(resize, crop) for a crop size of the sweep: the config's val_resize / val_crop ratio kept (256 / 224
    = 1 / 0.875 by default), rounded down as timm rounds crop / crop_pct."""
    return crop * cfg.val_resize // cfg.val_crop, crop


def _sweep_row(loaded: LoadedModel, val_dir: Path, size: int, at_config: dict[str, Any],
               tta_flip: bool) -> dict[str, Any]:
    resize, crop = sweep_sizes(loaded.cfg.data, size)
    row = {"crop": crop, "resize": resize}
    if (resize, crop) == (loaded.cfg.data.val_resize, loaded.cfg.data.val_crop):
        metrics = at_config  # the main evaluation already ran at this size
    else:
        cfg = dataclasses.replace(loaded.cfg.data, val_resize=resize, val_crop=crop)
        loader, _ = data.build_val_loader(cfg, val_dir, device_type=loaded.device.type)
        metrics = loop.evaluate(loaded.model, loader, loaded.runtime, tta_flip=tta_flip)
    return {**row, **{k: metrics[k] for k in ("top1", "top5", "loss", "images")}}


def load_model(req: EvalRequest, classes_needed: Optional[str] = None) -> LoadedModel:
    """The checkpoint's model with the weights asked for (EMA or raw), on its device, in eval mode.

    ``classes_needed``: the command that needs the class names a training checkpoint holds; it refuses
    anything else."""
    state = ckpt.load_checkpoint(req.ckpt)
    if int8file.is_int8_file(state):
        return _from_int8_file(state, req)
    # an export's JSON holds what a training checkpoint would give: the class names and the preprocessing
    if classes_needed and not ckpt.is_training_checkpoint(state) and not metadata.sidecar_of(req.ckpt).is_file():
        raise CheckpointError(f"{req.ckpt}: not a training checkpoint of mbv2 train; {classes_needed} needs one "
                              f"for the class names and the preprocessing it holds")
    if ckpt.is_training_checkpoint(state):
        if req.width_mult is not None or req.num_classes is not None:
            raise CheckpointError(f"{req.ckpt}: --width-mult and --num-classes are for bare state dicts; "
                                  f"a training checkpoint carries its own model settings")
        saved, weights, classes, used_ema = _from_training_checkpoint(state, req)
        cfg, trained_hflip = _with_requests(saved, req), saved.data.hflip
        preprocessing_from = _requested_source(SAVED_CONFIG, req)
    else:
        (cfg, classes, preprocessing_from), weights, used_ema = _from_state_dict(state, req), state, False
        trained_hflip = None  # a bare state dict does not say how it was trained
    cpu_threads.use(cfg.train.threads, cfg.data.workers_asked, say=cpu_threads.to_stderr)

    try:
        device = resolve_device(cfg.train.device)
    except ConfigError as exc:
        if req.device is None:
            raise
        raise ConfigError(f"--device {req.device}: {exc}") from None
    model = build_model(cfg.model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(f"{req.ckpt}: weights do not fit MobileNetV2(width_mult={cfg.model.width_mult:g}, "
                              f"num_classes={cfg.model.num_classes}): {detail}") from None
    model = model.to(device).eval()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runtime = devices.Runtime.create(device, resolve_amp(cfg.train.amp, device), cfg.train.channels_last,
                               cfg.data.mean, cfg.data.std)
    return LoadedModel(cfg, model, classes, used_ema, device, runtime, trained_hflip, preprocessing_from)


def _from_int8_file(state, req: EvalRequest) -> LoadedModel:
    """An int8 model from mbv2 quantize: its program runs on the CPU, with the preprocessing it was
    calibrated and evaluated with (data settings may still be changed as for a training checkpoint)."""
    if req.width_mult is not None or req.num_classes is not None:
        raise CheckpointError(f"{req.ckpt}: --width-mult and --num-classes are for bare state dicts; "
                              f"an int8 model carries its own model settings")
    if req.ema is not None and req.ema != state["ema"]:
        which = "EMA" if state["ema"] else "raw"
        raise CheckpointError(f"{req.ckpt}: an int8 model holds one set of weights (quantized from the {which} "
                              f"weights); leave out --ema/--no-ema")
    saved = config_from_dict(state["config"], f"{req.ckpt} (saved config)")
    cfg = _with_requests(saved, req)
    if req.device not in (None, "auto", "cpu"):
        raise ConfigError(f"--device {req.device}: int8 models from mbv2 quantize run on the CPU")
    device = torch.device("cpu")
    cpu_threads.use(cfg.train.threads, cfg.data.workers_asked, say=cpu_threads.to_stderr)
    model = int8file.FrozenProgram(int8file.load_program(state, req.ckpt), len(state["class_names"]))
    runtime = devices.Runtime.create(device, None, False, cfg.data.mean, cfg.data.std)
    return LoadedModel(cfg, model, list(state["class_names"]), bool(state["ema"]), device, runtime, saved.data.hflip,
                       _requested_source(SAVED_CONFIG, req))


def _from_training_checkpoint(state, req: EvalRequest):
    cfg = config_from_dict(state["config"], f"{req.ckpt} (saved config)")
    use_ema = req.ema if req.ema is not None else str(state.get("best_metric", "")).startswith("ema_")
    if use_ema:
        if state.get("ema") is None:
            raise CheckpointError(f"{req.ckpt}: --ema asked for, but the run kept no EMA weights")
        weights = ckpt.ema_weights(state)
    else:
        weights = state["model"]
    return cfg, weights, list(state["class_names"]), use_ema


def _options(req: EvalRequest) -> dict[str, tuple[str, Any]]:
    return {"data.val_batch_size": ("--batch-size", req.batch_size), "train.device": ("--device", req.device)}


def _with_requests(saved: Config, req: EvalRequest) -> Config:
    """A training checkpoint's config with --config's data and train settings and the --set overrides.

    The model stays the checkpoint's: its weights define it. A model setting asked for that differs from
    the saved one is refused rather than dropped, so that nobody believes they evaluated another model.
    """
    if req.config is not None:
        asked = load_config(req.config, req.overrides, _options(req))
    elif req.overrides or req.batch_size is not None or req.device is not None:
        asked = config_from_dict(saved.to_dict(), f"{req.ckpt} (saved config)", req.overrides, _options(req))
    else:
        return saved
    _refuse_model_changes(saved, asked, req)
    return dataclasses.replace(asked, model=saved.model)


def _refuse_model_changes(saved: Config, asked: Config, req: EvalRequest) -> None:
    for f in dataclasses.fields(saved.model):
        old, new = getattr(saved.model, f.name), getattr(asked.model, f.name)
        if new == old or (f.name == "num_classes" and new is None):  # None: "from the data", which it is
            continue
        where = _model_origin(req).get(f"model.{f.name}")
        if where is None:  # --config leaves it at its default: nothing was asked for
            continue
        if not where.startswith("--set "):
            where = f"{where}: model.{f.name} {new}"
        raise CheckpointError(f"{where}: the model comes from the checkpoint, whose weights were trained with "
                              f"model.{f.name} {old}; mbv2 eval cannot change it, so leave model.{f.name} out")


def _requested_source(saved: str, req: EvalRequest) -> str:
    """Where the preprocessing comes from: ``saved`` (a checkpoint's config, an export's JSON) or --config,
    and --set where it changes a preprocessing setting."""
    source = f"--config {req.config}" if req.config is not None else saved
    if any(item.split("=", 1)[0].strip() in PREPROCESSING_KEYS for item in req.overrides):
        source += " and --set"
    return source


def _model_origin(req: EvalRequest) -> dict[str, str]:
    """Where each setting of the requested config came from ("--set ...", the --config file), as
    load_config saw it; only wanted on the way to an error, so read again rather than carried around."""
    return yaml_schema.load(Config, req.config, req.overrides, _options(req))[1]


def _from_state_dict(state, req: EvalRequest) -> tuple[Config, Optional[list[str]], str]:
    """(config, class names, where the preprocessing came from) of a bare state dict.

    The JSON `mbv2 export` writes beside it (a torchvision export's) gives the preprocessing, the model and
    the class names; without one, the defaults. --config replaces the preprocessing (the model stays the
    JSON's), then --set and --width-mult / --num-classes apply: a bare state dict has no config of its own,
    so every model setting asked for applies; num_classes unset is read from its classifier."""
    if not isinstance(state, dict) or "classifier.1.weight" not in state:
        raise CheckpointError(f"{req.ckpt}: neither an mbv2 training checkpoint nor a MobileNetV2 state dict")
    if req.ema:
        raise CheckpointError(f"{req.ckpt}: --ema needs a training checkpoint; this is a bare state dict")
    options = {**_options(req), "model.width_mult": ("--width-mult", req.width_mult),
               "model.num_classes": ("--num-classes", req.num_classes)}
    exported = metadata.read_sidecar(req.ckpt)
    if exported is None:
        cfg, classes = load_config(req.config, req.overrides, options), None
        saved = f"defaults (no {metadata.sidecar_of(req.ckpt).name} beside the file)"
    else:
        base, where = exported.settings, str(exported.path)
        if req.config is not None:
            base = {**load_config(req.config).to_dict(), "model": exported.settings["model"]}
            where = str(req.config)
        cfg, classes, saved = config_from_dict(base, where, req.overrides, options), exported.classes, where
    if cfg.model.num_classes is None:
        num_classes = int(state["classifier.1.weight"].shape[0])
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))
    return cfg, classes, _requested_source(saved, req)


def val_dir_of(cfg: Config, data_dir: Optional[Path]) -> Path:
    """The validation folder: ``data_dir``'s val split (or ``data_dir`` itself when it has none), else the
    config's data.val_dir or data.root's val split."""
    if data_dir is None:
        if cfg.data.val_dir is None and cfg.data.root is None:
            raise DataError("no validation data: pass --data DIR")
        return Path(cfg.data.val_dir) if cfg.data.val_dir else Path(cfg.data.root) / cfg.data.val_split
    data_folder(data_dir)
    split = data_dir / cfg.data.val_split
    return split if split.is_dir() else data_dir
