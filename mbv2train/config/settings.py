"""Run configuration: frozen dataclasses, one per YAML section, and ``load_config``.

Every key has a default, so a YAML file names only what it changes. Reading is strict (see
yaml_schema.py); checks that involve several keys live in ``Config.validate``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from mbv2train.config import yaml_schema
from mbv2train.errors import ConfigError, DataError
from mbv2train.config.yaml_schema import setting

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "PRETRAINED_TAGS",
           "ScheduleConfig", "TrainConfig", "describe_settings", "load_config", "pretrained_is_file"]


@dataclass(frozen=True)
class ModelConfig:
    """The network: MobileNetV2's width and classifier head."""

    width_mult: Optional[float] = setting(
        None, "width multiplier on every layer's channels (paper: 0.35 to 1.4); null: the width of "
              "model.pretrained's weights, else 1.0", gt=0)
    dropout: float = setting(0.2, "dropout probability before the classifier", ge=0, lt=1)
    num_classes: Optional[int] = setting(
        None, "number of classes; null: the number of class folders in the training data (summary without data: 1000)",
        ge=1)
    round_nearest: int = setting(8, "channel counts are rounded to a multiple of this", ge=1)
    pretrained: Optional[str] = setting(
        None, "weights to start from: torchvision-v1 or torchvision-v2 (torchvision's ImageNet weights, from "
              "its cache under $TORCH_HOME), or the path of a state dict (.pth) or an mbv2 checkpoint; "
              "null: random init")
    pretrained_ema: bool = setting(False, "model.pretrained is an mbv2 checkpoint: start from its EMA weights")
    pretrained_sha256: Optional[str] = setting(
        None, "SHA-256 the model.pretrained file must have; null: not checked (a run records the one it loaded)")

    def __post_init__(self):
        # Only a pretrained file can say its width, and only `mbv2 train` reads it (pretrained.py); with no
        # file to read, an unset width is the paper's 1.0 from the start, so every other reader sees a number.
        if self.width_mult is None and not pretrained_is_file(self.pretrained):
            object.__setattr__(self, "width_mult", 1.0)


# model.pretrained values that name torchvision's weights (torchvision.models.MobileNet_V2_Weights) rather
# than a file
PRETRAINED_TAGS = {"torchvision-v1": "IMAGENET1K_V1", "torchvision-v2": "IMAGENET1K_V2"}


def pretrained_is_file(pretrained: Optional[str]) -> bool:
    return pretrained is not None and pretrained not in PRETRAINED_TAGS


DEFAULT_WORKERS = 4  # data.num_workers unset


@dataclass(frozen=True)
class DataConfig:
    """Where the images are, how they are augmented, and how they are batched."""

    root: Optional[str] = setting(None, "dataset folder holding one folder per split (see train_split, val_split)")
    train_split: str = setting("train", "name of the training folder under root")
    val_split: str = setting("val", "name of the validation folder under root")
    train_dir: Optional[str] = setting(None, "training folder (one subfolder per class); overrides root")
    val_dir: Optional[str] = setting(None, "validation folder (one subfolder per class); overrides root")
    image_size: int = setting(224, "training crop size in pixels (RandomResizedCrop output)", ge=8)
    scale: tuple[float, ...] = setting((0.08, 1.0), "RandomResizedCrop area range, fractions of the image",
                                       gt=0, le=1)
    ratio: tuple[float, ...] = setting((3 / 4, 4 / 3), "RandomResizedCrop aspect-ratio range", gt=0)
    hflip: float = setting(0.5, "probability of a horizontal flip", ge=0, le=1)
    auto_augment: Literal["none", "autoaugment", "randaugment", "trivialaugment"] = setting(
        "none", "policy augmentation: none, autoaugment (ImageNet policy), randaugment, trivialaugment (Wide)")
    random_erasing: float = setting(0.0, "probability of RandomErasing per training image", ge=0, le=1)
    mixup_alpha: float = setting(0.0, "MixUp Beta(alpha, alpha) parameter; 0 turns MixUp off", ge=0)
    cutmix_alpha: float = setting(0.0, "CutMix Beta(alpha, alpha) parameter; 0 turns CutMix off", ge=0)
    val_resize: int = setting(256, "validation images are resized so their short side has this many pixels", ge=8)
    val_crop: int = setting(224, "validation center crop in pixels", ge=8)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = setting(
        "bilinear", "resampling filter for the train crop and the val resize")
    mean: tuple[float, ...] = setting((0.485, 0.456, 0.406), "per-channel mean (RGB, 0-1 scale) subtracted")
    std: tuple[float, ...] = setting((0.229, 0.224, 0.225), "per-channel std (RGB, 0-1 scale) divided by", gt=0)
    decode: Literal["workers", "device"] = setting(
        "workers", "where JPEGs are decoded: workers (libjpeg-turbo in the loader processes) or device "
                   "(nvJPEG on the GPU; in the training process on a CPU); other formats always in the workers")
    batch_size: int = setting(32, "training images per step per process (global batch = this x processes)", ge=1)
    val_batch_size: Optional[int] = setting(None, "validation batch size per process; null: batch_size", ge=1)
    num_workers: Optional[int] = setting(
        None, "data-loading worker processes per training process; null: 4, or the CPUs available when "
              "fewer; a number above the CPUs is capped, with a warning", ge=0)
    pin_memory: bool = setting(True, "page-locked host memory for faster copies (CUDA only)")
    persistent_workers: bool = setting(True, "keep workers alive between epochs")
    prefetch_factor: int = setting(2, "batches each worker loads ahead", ge=1)
    bad_images: Literal["error", "skip"] = setting(
        "error", "an unreadable image: error stops the run naming the file; skip warns and substitutes another")
    max_bad_fraction: float = setting(0.01, "skip: stop when more than this fraction of a split is unreadable",
                                      ge=0, le=1)

    @property
    def workers_asked(self) -> int:
        """num_workers as set, or its default when unset; the loader fits it to the CPUs."""
        return DEFAULT_WORKERS if self.num_workers is None else self.num_workers


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer and its hyper-parameters."""

    name: Literal["sgd", "rmsprop", "adamw"] = setting("sgd", "sgd, rmsprop or adamw")
    lr: float = setting(0.045, "peak learning rate (at lr_reference_batch when that is set)", gt=0)
    lr_reference_batch: Optional[int] = setting(
        None, "if set, lr is scaled by global batch / this (linear scaling rule); null: lr is used as is", ge=1)
    momentum: float = setting(0.9, "momentum for sgd and rmsprop", ge=0, lt=1)
    nesterov: bool = setting(False, "Nesterov momentum (sgd)")
    weight_decay: float = setting(4e-5, "L2 weight decay (decoupled for adamw)", ge=0)
    norm_weight_decay: Optional[float] = setting(
        None, "weight decay for BatchNorm weights and biases; null: weight_decay", ge=0)
    bias_weight_decay: Optional[float] = setting(
        None, "weight decay for conv and linear biases; null: weight_decay", ge=0)
    alpha: float = setting(0.9, "rmsprop: decay of the squared-gradient average (TensorFlow's 'decay')",
                           gt=0, lt=1)
    eps: Optional[float] = setting(
        None, "epsilon, added outside the square root (PyTorch style); null: 0.0316 for rmsprop "
              "(~ TensorFlow's 1e-3 inside it), 1e-8 for adamw", gt=0)
    betas: tuple[float, ...] = setting((0.9, 0.999), "adamw beta1, beta2", ge=0, lt=1)
    backbone_lr_scale: float = setting(
        1.0, "learning rate of every layer but the classifier, as a fraction of the classifier's (fine-tuning)",
        gt=0)


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning rate over time; stepped every iteration, so epochs may be fractional."""

    name: Literal["cosine", "exponential", "step", "constant"] = setting(
        "cosine", "decay after warmup: cosine, exponential (x gamma per epoch), step, constant")
    warmup_epochs: float = setting(0.0, "linear warmup length in epochs", ge=0)
    warmup_start_factor: float = setting(0.01, "warmup starts at lr x this", gt=0, le=1)
    min_lr: float = setting(0.0, "cosine: lr at the last step", ge=0)
    gamma: float = setting(0.98, "exponential: factor per epoch; step: factor per step_epochs", gt=0, le=1)
    step_epochs: float = setting(30.0, "step: epochs between multiplications by gamma", gt=0)


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, precision, regularization, checkpoints and logging."""

    epochs: int = setting(300, "number of epochs", ge=1)
    freeze_backbone_epochs: int = setting(
        0, "first epochs in which only the classifier trains (the other layers keep their weights and "
           "BatchNorm statistics); 0: none", ge=0)
    seed: int = setting(0, "seed for initialization, shuffling, augmentation and dropout", ge=0)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto: cuda when available, else cpu")
    amp: Literal["auto", "none", "bf16", "fp16"] = setting(
        "auto", "mixed precision; auto: bf16 on CUDA GPUs that support it, fp16 on older ones, none on CPU")
    channels_last: bool = setting(True, "NHWC memory format (much faster convs on CPU and tensor cores)")
    compile: bool = setting(False, "torch.compile the model (slower start, faster steps)")
    threads: Optional[int] = setting(
        None, "intra-op CPU threads; null: the CPUs this process may use less data.num_workers and what other "
              "processes keep busy (OMP_NUM_THREADS or MKL_NUM_THREADS, when set, decide instead)", ge=1)
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing", ge=0, lt=1)
    grad_clip_norm: Optional[float] = setting(None, "clip gradients to this global L2 norm; null: off", gt=0)
    accum_steps: int = setting(1, "micro-batches accumulated per optimizer step", ge=1)
    ema: bool = setting(False, "keep an exponential moving average of the weights and evaluate it too")
    ema_decay: float = setting(0.9999, "EMA decay per update", gt=0, lt=1)
    ema_every_steps: int = setting(1, "optimizer steps between EMA updates", ge=1)
    best_metric: Optional[str] = setting(
        None, "metric whose maximum picks best.pt; null: ema_val_top1 with EMA, else val_top1")
    output_dir: str = setting("runs/mbv2", "run directory: config, metrics, TensorBoard files, checkpoints")
    save_every_epochs: int = setting(0, "also keep epoch_N.pt every this many epochs; 0: only last and best",
                                     ge=0)
    keep_checkpoints: int = setting(3, "how many epoch_N.pt copies to keep (oldest go first)", ge=1)
    log_every_steps: int = setting(50, "steps between log lines when output is not a terminal", ge=1)
    checkpoint_every_steps: int = setting(0, "also write last.pt every this many optimizer steps; 0: off", ge=0)
    checkpoint_every_minutes: float = setting(0.0, "also write last.pt every this many minutes; 0: off", ge=0)
    nonfinite: Literal["raise", "skip"] = setting(
        "raise", "a NaN/inf loss: the step is undone; raise stops the run at the next log or checkpoint, skip goes on")
    max_nonfinite_skips: int = setting(10, "skip: stop after this many non-finite steps in a row", ge=1)
    tb_images: int = setting(16, "augmented training images shown in TensorBoard at start; 0: none", ge=0)
    tb_per_class: bool = setting(False, "per-class val top-1 and the most confused class pairs in TensorBoard "
                                        "at each epoch's end")
    dist_timeout_s: float = setting(
        600.0, "under torchrun: seconds a collective waits for a process that died or hung before the run "
               "stops with an error", gt=0)
    sync_bn: bool = setting(
        False, "under torchrun: BatchNorm normalizes with the statistics of the global batch (SyncBatchNorm); "
               "false: each process's own, with running statistics averaged over processes before each "
               "evaluation and save")


BEST_METRICS = ("val_top1", "val_top5", "ema_val_top1", "ema_val_top5")


@dataclass(frozen=True)
class Config:
    """Everything a run needs. Each field is one section of the YAML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (lists instead of tuples), fit for YAML, JSON and checkpoints."""
        return yaml_schema.plain(self)

    def best_metric(self) -> str:
        return self.train.best_metric or ("ema_val_top1" if self.train.ema else "val_top1")

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for each check that involves more than one key; empty when all is well."""
        d, o, s, t = self.data, self.optim, self.schedule, self.train
        problems = []
        for key, pair in (("data.scale", d.scale), ("data.ratio", d.ratio)):
            if len(pair) != 2 or pair[0] > pair[1]:
                problems.append((key, f"must be two numbers [low, high], got {list(pair)}"))
        if len(o.betas) != 2:
            problems.append(("optim.betas", f"must be two numbers [beta1, beta2], got {list(o.betas)}"))
        for key, values in (("data.mean", d.mean), ("data.std", d.std)):
            if len(values) != 3:
                problems.append((key, f"must be three numbers (R, G, B), got {list(values)}"))
        if d.val_crop > d.val_resize:
            problems.append(("data.val_crop", f"{d.val_crop} is larger than data.val_resize {d.val_resize}"))
        if d.train_split == d.val_split and d.train_dir is None and d.val_dir is None:
            problems.append(("data.val_split", f"same folder as data.train_split ('{d.train_split}')"))
        if s.warmup_epochs >= t.epochs:
            problems.append(("schedule.warmup_epochs",
                             f"{s.warmup_epochs:g} is not shorter than train.epochs {t.epochs}"))
        if s.name == "cosine" and s.min_lr > o.lr:
            problems.append(("schedule.min_lr", f"{s.min_lr:g} is above optim.lr {o.lr:g}"))
        m = self.model
        if m.pretrained is not None and not m.pretrained.strip():
            problems.append(("model.pretrained", "is empty; use null, torchvision-v1, torchvision-v2 or a file path"))
        if m.pretrained_ema and not pretrained_is_file(m.pretrained):
            problems.append(("model.pretrained_ema", f"needs model.pretrained to be an mbv2 checkpoint file, "
                                                     f"got {m.pretrained!r}"))
        if m.pretrained_sha256 is not None:
            if m.pretrained is None:
                problems.append(("model.pretrained_sha256", "is set but model.pretrained is not"))
            elif not re.fullmatch(r"[0-9a-fA-F]{64}", m.pretrained_sha256):
                problems.append(("model.pretrained_sha256",
                                 f"must be 64 hexadecimal digits, got {m.pretrained_sha256!r}"))
        if o.nesterov and (o.name != "sgd" or o.momentum == 0):
            problems.append(("optim.nesterov", "needs optim.name sgd with optim.momentum > 0"))
        if t.best_metric is not None and t.best_metric not in BEST_METRICS:
            problems.append(("train.best_metric",
                             f"must be one of {', '.join(BEST_METRICS)}; got {t.best_metric!r}"))
        elif self.best_metric().startswith("ema_") and not t.ema:
            problems.append(("train.best_metric", f"{self.best_metric()} needs train.ema: true"))
        return problems


def _checked(cfg: Config, origin: dict[str, str], default_where: str) -> Config:
    problems = cfg.problems()
    if problems:
        raise yaml_schema.clash_error(*problems[0], origin, default_where)
    return cfg


def with_num_classes(cfg: Config, found: int) -> Config:
    """model.num_classes unset means "as many as the data has" (``found``); set, it must agree with the data."""
    if cfg.model.num_classes is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=found))
    if cfg.model.num_classes != found:
        raise DataError(f"model.num_classes is {cfg.model.num_classes} but the training data has {found} "
                        f"class folders (unset model.num_classes to take it from the data)")
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                options: dict[str, tuple[str, Any]] | None = None) -> Config:
    """Read ``path`` (or start from the defaults when it is None), apply overrides, validate everything.

    ``overrides`` are ``--set section.key=value`` strings. ``options`` maps a dotted key to the command-line
    option that set it and its value, e.g. {"model.width_mult": ("--width-mult", 0.5)}; they apply last,
    and a None value is skipped.
    """
    cfg, origin = yaml_schema.load(Config, path, overrides, options)
    return _checked(cfg, origin, str(path) if path is not None else "config")


def config_from_dict(data: dict[str, Any], where: str, overrides: Sequence[str] = (),
                     options: dict[str, tuple[str, Any]] | None = None) -> Config:
    """A Config from a plain dict (e.g. the one a checkpoint saved) plus overrides, checked like a file."""
    cfg, origin = yaml_schema.load(Config, None, overrides, options, base=(where, data))
    return _checked(cfg, origin, where)


def describe_settings() -> list[dict[str, Any]]:
    """Every config key with its type, default and help text, for reference tables."""
    return yaml_schema.describe(Config)
