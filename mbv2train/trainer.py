"""fit(cfg): builds everything, resumes, runs the epochs, evaluates, saves and logs."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mbv2train import checkpoint as ckpt
from mbv2train import data, engine, optim, rng, run_state
from mbv2train.config import Config
from mbv2train.distributed import DistInfo, init_distributed, shutdown_distributed
from mbv2train.errors import CheckpointError, ConfigError, DataError
from mbv2train.model import build_model
from mbv2train.progress import Progress, log
from mbv2train.tracking import TIMING_FIELDS, NullTracker, Tracker, truncate_metrics

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but no CUDA GPU is visible")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def resolve_amp(choice: str, device: torch.device) -> Optional[torch.dtype]:
    """auto: bf16 on CUDA GPUs that support it (no loss scaling needed), fp16 on older GPUs, none on CPU.

    On the CPU, full float32 is the default because bf16 speed depends on the processor (it is only
    fast with native bf16 instructions) and costs accuracy on CPUs that emulate it; ask for it with
    train.amp: bf16 where it helps (docs/PERFORMANCE.md has measurements).
    """
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if choice == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp: fp16 needs a CUDA GPU; use bf16 or none on the CPU")
    return AMP_DTYPES[choice]


def fit(cfg: Config, resume: Optional[str] = None) -> dict[str, Any]:
    """Train according to ``cfg``; ``resume`` is None, "auto" (last.pt in the run dir if any) or a path.

    Returns the last epoch's metrics row (or an empty dict when there was nothing left to train).
    """
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    dist = init_distributed(device.type)
    try:
        return _fit(cfg, resume, device, amp_dtype, dist)
    finally:
        shutdown_distributed()


def _fit(cfg: Config, resume: Optional[str], device: torch.device, amp_dtype, dist: DistInfo) -> dict[str, Any]:
    run_dir = Path(cfg.train.output_dir)
    say = dist.is_main
    loaders = data.build_loaders(cfg.data, cfg.train.seed, dist.rank, dist.world_size, device.type)
    cfg = _with_num_classes(cfg, len(loaders.classes))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    state = _find_resume_state(resume, run_dir)
    if state is not None:
        _check_resumable(state, cfg, loaders.classes, dist.world_size, say)

    torch.manual_seed(rng.derive_seed(cfg.train.seed, rng.INIT))
    model = build_model(cfg.model).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = None
    if cfg.train.ema:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
    global_batch = cfg.data.batch_size * dist.world_size * cfg.train.accum_steps
    optimizer = optim.build_optimizer(model, cfg.optim, global_batch)
    steps_per_epoch = len(loaders.train) // cfg.train.accum_steps
    if steps_per_epoch == 0:
        raise DataError(f"{loaders.train_dir}: too few images for one optimizer step of "
                        f"{cfg.data.batch_size} x {cfg.train.accum_steps} accumulation steps")
    scheduler = optim.build_scheduler(optimizer, cfg.schedule, cfg.train.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    start_epoch, global_step, best_value = 0, 0, None
    if state is not None:
        run_state.restore(state, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start_epoch, global_step, best_value = state["epoch"], state["global_step"], state["best_value"]

    tracker = NullTracker()
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"train.output_dir: cannot create {run_dir}: {exc.strerror or exc}") from None
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        # Rows and curves past the checkpoint belong to an attempt that died before saving: drop them.
        truncate_metrics(run_dir / "metrics.jsonl", start_epoch)
        tracker = Tracker(run_dir, purge_step=global_step + 1 if state is not None else 0)
        if state is None:
            tracker.hparams(cfg.to_dict())
            if cfg.train.tb_images:
                tracker.images(_augmented_samples(loaders.train.dataset, cfg.train.tb_images))

    train_model = model
    if cfg.train.compile:
        train_model = torch.compile(model)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    rt = engine.Runtime.create(device, amp_dtype, cfg.train.channels_last, cfg.data.mean, cfg.data.std)
    settings = engine.TrainSettings(seed=cfg.train.seed, label_smoothing=cfg.train.label_smoothing,
                                    accum_steps=cfg.train.accum_steps, grad_clip_norm=cfg.train.grad_clip_norm,
                                    ema_every_steps=cfg.train.ema_every_steps,
                                    log_every_steps=cfg.train.log_every_steps)
    mix = data.build_mix_transform(cfg.data, cfg.model.num_classes)
    best_metric = cfg.best_metric()
    precision = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    log(f"run dir {run_dir} | {device.type} x {dist.world_size} | {precision} | "
        f"{len(loaders.classes)} classes | {steps_per_epoch} steps/epoch of {global_batch} images | "
        f"{'resuming after epoch ' + str(start_epoch) if state is not None else 'starting'}", say)

    row: dict[str, Any] = {}
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        loaders.train_sampler.set_epoch(epoch)
        progress = Progress(len(loaders.train) // cfg.train.accum_steps * cfg.train.accum_steps,
                            f"epoch {epoch}/{cfg.train.epochs}", cfg.train.log_every_steps, enabled=say)
        train_metrics, global_step = engine.train_one_epoch(
            train_model, loaders.train, optimizer, scheduler, scaler, rt, settings, epoch, global_step,
            ema=ema, mix=mix, progress=progress,
            log_step=lambda step, values: tracker.scalars(step, values, prefix="step"))
        progress.close()

        val_started = time.perf_counter()
        row = {"epoch": epoch, "step": global_step, **train_metrics,
               **_prefixed("val_", _evaluate(model, loaders.val, rt, f"val {epoch}", say))}
        if ema is not None:
            row.update(_prefixed("ema_val_", _evaluate(ema.module, loaders.val, rt, f"ema val {epoch}", say)))
        row["val_time_s"] = time.perf_counter() - val_started

        is_best = best_value is None or row[best_metric] > best_value
        if is_best:
            best_value = row[best_metric]
        if dist.is_main:
            tracker.epoch(row, global_step)
            state = run_state.training_state(
                model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, scaler=scaler, epoch=epoch,
                global_step=global_step, best_metric=best_metric, best_value=best_value,
                config=cfg.to_dict(), class_names=loaders.classes, world_size=dist.world_size)
            _save(state, run_dir, epoch, is_best, cfg)
            log(_epoch_line(row, best_metric, best_value), say)
    tracker.close()
    if start_epoch >= cfg.train.epochs:
        log(f"nothing to train: {run_dir} already finished its {cfg.train.epochs} epochs", say)
    elif say:
        log(f"done: best {best_metric} {best_value:.4f}; checkpoints in {run_dir} "
            f"(evaluate with: mbv2 eval --ckpt {run_dir / ckpt.BEST})")
    return row


def _with_num_classes(cfg: Config, found: int) -> Config:
    """model.num_classes unset means "as many as the data has"; set, it must agree with the data."""
    if cfg.model.num_classes is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=found))
    if cfg.model.num_classes != found:
        raise DataError(f"model.num_classes is {cfg.model.num_classes} but the training data has {found} "
                        f"class folders (unset model.num_classes to take it from the data)")
    return cfg


def _find_resume_state(resume: Optional[str], run_dir: Path) -> Optional[dict[str, Any]]:
    if resume is None:
        if (run_dir / ckpt.LAST).exists():
            raise CheckpointError(f"{run_dir} already holds a run ({ckpt.LAST}); continue it with --resume auto "
                                  f"or choose another --output-dir")
        return None
    if resume == "auto":
        last = run_dir / ckpt.LAST
        return ckpt.load_checkpoint(last) if last.exists() else None
    state = ckpt.load_checkpoint(resume)
    if not ckpt.is_training_checkpoint(state):
        raise CheckpointError(f"{resume}: not a training checkpoint written by mbv2 train (a bare state dict "
                              f"has no optimizer or schedule to resume)")
    return state


def _check_resumable(state: dict[str, Any], cfg: Config, classes: list[str], world_size: int, say: bool) -> None:
    if state["class_names"] != classes:
        raise CheckpointError("the checkpoint's class list differs from the training data's "
                              f"({len(state['class_names'])} vs {len(classes)} classes)")
    refused, harmless = run_state.config_changes(state["config"], cfg.to_dict())
    if state.get("world_size", 1) != world_size:  # the global batch, hence steps and LR, would change
        refused.append(f"processes: {state.get('world_size', 1)} -> {world_size}")
    if refused:
        raise CheckpointError("resuming would change the experiment: " + "; ".join(refused))
    for line in harmless:
        log(f"warning: resuming with a changed setting: {line}", say)


def _evaluate(model, loader, rt, desc: str, say: bool) -> dict[str, float]:
    progress = Progress(len(loader), desc, log_every=max(len(loader), 1), enabled=say)
    metrics = engine.evaluate(model, loader, rt, progress)
    progress.close()
    return metrics


def _augmented_samples(dataset, count: int) -> torch.Tensor:
    """The first training images exactly as epoch 1 augments them (uint8), for TensorBoard."""
    return torch.stack([dataset[(1, i)][0] for i in range(min(count, len(dataset)))])


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {prefix + key: value for key, value in metrics.items()}


def _save(state: dict[str, Any], run_dir: Path, epoch: int, is_best: bool, cfg: Config) -> None:
    last = run_dir / ckpt.LAST
    ckpt.save_checkpoint(state, last)
    if is_best:
        ckpt.copy_checkpoint(last, run_dir / ckpt.BEST)
    if cfg.train.save_every_epochs and epoch % cfg.train.save_every_epochs == 0:
        ckpt.copy_checkpoint(last, run_dir / f"epoch_{epoch}.pt")
        ckpt.prune_epoch_copies(run_dir, cfg.train.keep_checkpoints)


def _epoch_line(row: dict[str, Any], best_metric: str, best_value: float) -> str:
    parts = [f"epoch {row['epoch']}", f"train_loss {row['train_loss']:.4f}", f"val_loss {row['val_loss']:.4f}",
             f"val_top1 {row['val_top1']:.4f}", f"val_top5 {row['val_top5']:.4f}"]
    if "ema_val_top1" in row:
        parts.append(f"ema_val_top1 {row['ema_val_top1']:.4f}")
    parts += [f"lr {row['lr']:.4g}", f"{row['img_per_s']:.0f} img/s",
              f"best {best_metric} {best_value:.4f}"]
    return " | ".join(parts)


def without_timing(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row minus the fields that measure time: what two identical runs must agree on."""
    return {k: v for k, v in row.items() if k not in TIMING_FIELDS}

