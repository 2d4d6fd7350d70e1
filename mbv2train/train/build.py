"""Everything a training run computes with, built from a config and the checkpoint it resumes from.

``build_run`` is all of it and nothing else: it opens no run directory and runs no collective, so that
`mbv2 train` and `mbv2 bench train` build the same run, and a test can build one without a process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mbv2train import data, devices, rng
from mbv2train.config import Config, with_num_classes
from mbv2train.distributed import DistInfo
from mbv2train.errors import DataError
from mbv2train.model import build_model, pretrained
from mbv2train.progress import log
from mbv2train.train import optim
from mbv2train.train.batchnorm_sync import synchronize_batchnorm
from mbv2train.train.epoch import TrainSettings
from mbv2train.words import plural

PRECISION_NAMES = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class BuiltRun:
    """A run's parts, as `mbv2 train` has them just before its first step."""

    cfg: Config  # resolved: the class count, and what a pretrained file or the checkpoint fixed
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    dist: DistInfo
    loaders: Any  # data.Loaders
    model: torch.nn.Module
    ema: Optional[AveragedModel]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    runtime: devices.Runtime
    settings: TrainSettings
    steps_per_epoch: int
    global_batch: int  # images per optimizer step over all processes
    bad_train: Optional[data.BadImageLog]  # with data.bad_images: skip
    bad_val: Optional[data.BadImageLog]

    @property
    def classes(self) -> list[str]:
        return self.loaders.classes

    @property
    def precision(self) -> str:
        return PRECISION_NAMES[self.amp_dtype]


def train_settings(cfg: Config) -> TrainSettings:
    """The parts of the train config a step needs."""
    train = cfg.train
    return TrainSettings(seed=train.seed, label_smoothing=train.label_smoothing, accum_steps=train.accum_steps,
                         grad_clip_norm=train.grad_clip_norm, ema_every_steps=train.ema_every_steps,
                         ema_decay=train.ema_decay, log_every_steps=train.log_every_steps,
                         skip_nonfinite=train.nonfinite == "skip", max_nonfinite_skips=train.max_nonfinite_skips)


def build_run(cfg: Config, state: Optional[dict[str, Any]], device: torch.device, amp_dtype, dist: DistInfo,
              pretrained_weights: bool = True) -> BuiltRun:
    """Build the loaders, model, EMA, optimizer, schedule, scaler and runtime of a run.

    ``state`` is the checkpoint the run resumes from (None: a fresh run, which starts from model.pretrained's
    weights when set, unless ``pretrained_weights`` is False, as for benchmarks). The weights and the
    optimizer's state are not loaded from ``state`` here (the trainer does, after checking the resume);
    ``state`` only fixes what the saved run resolved from its config."""
    loaders = data.build_loaders(cfg.data, cfg.train.seed, dist.rank, dist.world_size, device.type)
    source = None
    if state is None and cfg.model.pretrained is not None and pretrained_weights:
        source = pretrained.read(cfg.model)
    cfg = pretrained.resolve_config(cfg, source, state["config"] if state is not None else None)
    cfg = with_num_classes(cfg, len(loaders.classes))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(rng.derive_seed(cfg.train.seed, rng.INIT))
    model = build_model(cfg.model)
    if source is not None:  # before the EMA copies the model
        log(pretrained.load_into(model, source, loaders.classes).line(source))
    if cfg.train.sync_bn:  # before the EMA copies the model and the optimizer takes its parameters
        model = synchronize_batchnorm(model, device.type, dist.world_size)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = None
    if cfg.train.ema:
        # on the device, its count included: the epoch updates it there (step_guard.EmaUpdate)
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True,
                            device=device)
    global_batch = cfg.data.batch_size * dist.world_size * cfg.train.accum_steps
    optimizer = optim.build_optimizer(model, cfg.optim, global_batch)
    steps_per_epoch = len(loaders.train) // cfg.train.accum_steps
    if steps_per_epoch == 0:
        raise DataError(f"{loaders.train_dir}: too few images for one optimizer step of "
                        f"{cfg.data.batch_size} x {plural(cfg.train.accum_steps, 'accumulation step')}")
    scheduler = optim.build_scheduler(optimizer, cfg.schedule, cfg.train.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    runtime = devices.Runtime.create(device, amp_dtype, cfg.train.channels_last, cfg.data.mean, cfg.data.std)
    bad_train = bad_val = None
    if cfg.data.bad_images == "skip":
        bad_train = data.BadImageLog(len(loaders.train.dataset), cfg.data.max_bad_fraction, "training",
                                     folder=loaders.train_dir, processes=dist.world_size)
        bad_val = data.BadImageLog(len(loaders.val.dataset), cfg.data.max_bad_fraction, "validation",
                                   folder=loaders.val_dir, processes=dist.world_size)
    return BuiltRun(cfg=cfg, device=device, amp_dtype=amp_dtype, dist=dist, loaders=loaders, model=model, ema=ema,
                    optimizer=optimizer, scheduler=scheduler, scaler=scaler, runtime=runtime,
                    settings=train_settings(cfg), steps_per_epoch=steps_per_epoch, global_batch=global_batch,
                    bad_train=bad_train, bad_val=bad_val)
