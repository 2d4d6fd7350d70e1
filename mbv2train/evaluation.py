"""`mbv2 eval`: top-1 / top-5 of a checkpoint (or a bare state dict) on a validation folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mbv2train import checkpoint as ckpt
from mbv2train import data, engine, yaml_schema
from mbv2train.config import Config, config_from_dict, load_config
from mbv2train.errors import CheckpointError, DataError
from mbv2train.model import build_model
from mbv2train.devices import resolve_amp, resolve_device


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


def run_eval(req: EvalRequest) -> dict[str, Any]:
    state = ckpt.load_checkpoint(req.ckpt)
    if ckpt.is_training_checkpoint(state):
        if req.width_mult is not None or req.num_classes is not None:
            raise CheckpointError(f"{req.ckpt}: --width-mult and --num-classes are for bare state dicts; "
                                  f"a training checkpoint carries its own model settings")
        saved, weights, classes, used_ema = _from_training_checkpoint(state, req)
        cfg = _with_requests(saved, req)
    else:
        cfg, weights, classes, used_ema = _from_state_dict(state, req), state, None, False
    val_dir = _val_dir(cfg, req.data)

    device = resolve_device(cfg.train.device)
    loader, found = data.build_val_loader(cfg.data, val_dir, device_type=device.type)
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise DataError(f"{val_dir}: its class folders differ from the checkpoint's classes "
                        f"(missing: {', '.join(missing[:5]) or '-'}; unexpected: {', '.join(extra[:5]) or '-'})")
    if classes is None and len(found) != cfg.model.num_classes:
        raise DataError(f"{val_dir}: {len(found)} class folders but the model predicts "
                        f"{cfg.model.num_classes} classes")

    model = build_model(cfg.model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{req.ckpt}: weights do not fit MobileNetV2(width_mult={cfg.model.width_mult:g}, "
                              f"num_classes={cfg.model.num_classes}): {first[1].strip() if len(first) > 1 else first[0]}"
                              ) from None
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    rt = engine.Runtime.create(device, resolve_amp(cfg.train.amp, device), cfg.train.channels_last,
                               cfg.data.mean, cfg.data.std)
    metrics = engine.evaluate(model, loader, rt)
    return {**metrics, "ema": used_ema, "val_dir": str(val_dir)}


def _from_training_checkpoint(state, req: EvalRequest):
    cfg = config_from_dict(state["config"], f"{req.ckpt} (saved config)")
    use_ema = req.ema if req.ema is not None else str(state.get("best_metric", "")).startswith("ema_")
    if use_ema:
        if state.get("ema") is None:
            raise CheckpointError(f"{req.ckpt}: --ema asked for, but the run kept no EMA weights")
        # AveragedModel keeps the model under "module." beside its own n_averaged counter
        weights = ckpt.strip_prefix({k: v for k, v in state["ema"].items() if k != "n_averaged"}, "module.")
    else:
        weights = state["model"]
    return cfg, weights, list(state["class_names"]), use_ema


def _options(req: EvalRequest) -> dict[str, tuple[str, Any]]:
    return {"data.val_batch_size": ("--batch-size", req.batch_size)}


def _with_requests(saved: Config, req: EvalRequest) -> Config:
    """A training checkpoint's config with --config's data and train settings and the --set overrides.

    The model stays the checkpoint's: its weights define it. A model setting asked for that differs from
    the saved one is refused rather than dropped, so that nobody believes they evaluated another model.
    """
    if req.config is not None:
        asked = load_config(req.config, req.overrides, _options(req))
    elif req.overrides or req.batch_size is not None:
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


def _model_origin(req: EvalRequest) -> dict[str, str]:
    """Where each setting of the requested config came from ("--set ...", the --config file), as
    load_config saw it; only wanted on the way to an error, so read again rather than carried around."""
    return yaml_schema.load(Config, req.config, req.overrides, _options(req))[1]


def _from_state_dict(state, req: EvalRequest) -> Config:
    """Defaults, or --config, then --set, then --width-mult / --num-classes: a bare state dict has no config
    of its own, so every model setting asked for applies; num_classes unset is read from its classifier."""
    if not isinstance(state, dict) or "classifier.1.weight" not in state:
        raise CheckpointError(f"{req.ckpt}: neither an mbv2 training checkpoint nor a MobileNetV2 state dict")
    if req.ema:
        raise CheckpointError(f"{req.ckpt}: --ema needs a training checkpoint; this is a bare state dict")
    options = {**_options(req), "model.width_mult": ("--width-mult", req.width_mult),
               "model.num_classes": ("--num-classes", req.num_classes)}
    cfg = load_config(req.config, req.overrides, options)
    if cfg.model.num_classes is None:
        num_classes = int(state["classifier.1.weight"].shape[0])
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))
    return cfg


def _val_dir(cfg: Config, data_dir: Optional[Path]) -> Path:
    if data_dir is None:
        if cfg.data.val_dir is None and cfg.data.root is None:
            raise DataError("no validation data: pass --data DIR")
        return Path(cfg.data.val_dir) if cfg.data.val_dir else Path(cfg.data.root) / cfg.data.val_split
    if not data_dir.is_dir():
        raise DataError(f"data folder not found: {data_dir}")
    split = data_dir / cfg.data.val_split
    return split if split.is_dir() else data_dir
