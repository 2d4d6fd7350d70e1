"""Pretrained weights in (model.pretrained): torchvision's ImageNet weights by tag, a torchvision-format
state dict, or an mbv2 checkpoint (its EMA weights with model.pretrained_ema).

A run that starts from one builds its model as usual, then takes every backbone tensor from the file. The
backbone must fit exactly (a width that differs is an error naming both). An mbv2 checkpoint knows its class
names, so its classifier rows go to the data's classes of the same names, and the data's other classes keep
the rows of the model's own fresh initialization; a state dict knows only its number of classes, so its
classifier is taken whole when that number is the data's and left at the fresh initialization otherwise.
The file's SHA-256 goes into the run's config (model.pretrained_sha256), so config.yaml and every checkpoint
say which file the run started from, and a config that names a hash refuses any other file. Files are
read with ``weights_only=True``.

torchvision's weights come through torchvision's own API and cache ($TORCH_HOME/hub/checkpoints): a file
already there is read without any network access; a missing one is downloaded, and when that fails the
error says which file to put where.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

import torch
from torchvision.models import MobileNet_V2_Weights

from mbv2train import checkpoint as ckpt
from mbv2train.config import PRETRAINED_TAGS, Config, ModelConfig
from mbv2train.errors import CheckpointError
from mbv2train.progress import is_main_process
from mbv2train.model import HEAD, MobileNetV2
from mbv2train.words import plural
from mbv2train.shortlist import shortlist
from mbv2train.config.preflight import pretrained_file

__all__ = ["Source", "LoadReport", "read", "resolve_config", "load_into", "torchvision_file"]

# Widths tried when a state dict does not say its own (the paper's and torchvision's usual ones), after
# the one its last block's channel count suggests.
COMMON_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
LAST_BLOCK = "features.17.conv.2.weight"  # the 320-channel projection (at width 1) of the paper's last stage
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's, in a state dict saved through them


@dataclass
class Source:
    """Pretrained weights read from a file, in torchvision's key names."""

    name: str  # as model.pretrained says it: a tag or a path
    file: Path
    sha256: str
    weights: dict[str, torch.Tensor]
    width_mult: Optional[float]  # the width they were trained at; None when no width tried fits them
    round_nearest: int
    classes: Optional[list[str]] = None  # the class of each classifier row; None for a bare state dict


@dataclass
class LoadReport:
    """What load_into took from the file and what it left at the model's initialization, for the log."""

    loaded: int  # tensors taken whole from the file
    reinitialized: list[str]  # the model's keys left at their fresh initialization
    source_classes: int
    model_classes: int
    kept_rows: Optional[int] = None  # classifier rows matched by class name; None: no names to match
    fresh_classes: Sequence[str] = ()  # the data's classes the file has no row for

    def line(self, source: Source) -> str:
        where = f"{source.name} ({source.file}, " if source.name in PRETRAINED_TAGS else f"{source.file} ("
        what = f"pretrained: {where}sha256 {source.sha256[:12]}...): loaded {plural(self.loaded, 'tensor')}"
        counts = f"{plural(self.source_classes, 'class')} in the file, {self.model_classes} in the data"
        if self.kept_rows is not None:
            named = f"{shortlist(self.fresh_classes)}; " if self.fresh_classes else ""
            return (f"{what}; classifier rows matched by class name: {self.kept_rows} kept, "
                    f"{len(self.fresh_classes)} initialized fresh ({named}{counts})")
        if not self.reinitialized:
            return f"{what}, nothing re-initialized"
        return f"{what}; re-initialized {', '.join(self.reinitialized)} ({counts})"


def torchvision_file(tag: str) -> tuple[Any, Path]:
    """(torchvision's weights enum member, the file torchvision caches it as) for a model.pretrained tag."""
    weights = MobileNet_V2_Weights[PRETRAINED_TAGS[tag]]
    # torch.hub's cache: $TORCH_HOME/hub/checkpoints, file named after the URL (what load_state_dict_from_url uses)
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _fetch_torchvision(tag: str, show_progress: bool) -> Path:
    weights, path = torchvision_file(tag)
    if path.is_file():
        return path  # torchvision would read it from there too, without the network
    try:
        # torchvision's weights API: downloads into its cache and checks the hash its file name carries
        weights.get_state_dict(progress=show_progress, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as exc:  # URLError, timeouts, DNS failures are OSErrors; a bad hash a RuntimeError
        reason = " ".join(str(exc).split())[:160]
        raise CheckpointError(f"model.pretrained {tag}: {path.name} is not in {path.parent} and could not be "
                              f"downloaded ({reason}); download {weights.url} and put it there (the folder "
                              f"follows $TORCH_HOME), or set model.pretrained to the file's path") from None
    if not path.is_file():
        raise CheckpointError(f"model.pretrained {tag}: torchvision did not leave {path.name} in {path.parent}")
    return path


def read(model_cfg: ModelConfig, show_progress: Optional[bool] = None) -> Source:
    """The weights model.pretrained names; CheckpointError (one line) for a missing, damaged, foreign or
    mismatched (model.pretrained_sha256) file, or EMA weights asked of a file that has none.
    ``show_progress``: a download's progress bar (by default in the main process only)."""
    name = model_cfg.pretrained
    if name in PRETRAINED_TAGS:
        path = _fetch_torchvision(name, is_main_process() if show_progress is None else show_progress)
    else:
        path = pretrained_file(model_cfg)
    sha256 = ckpt.file_sha256(path)
    expected = model_cfg.pretrained_sha256
    if expected is not None and expected.lower() != sha256:
        raise CheckpointError(f"model.pretrained: {path} has SHA-256 {sha256}, not the {expected.lower()} that "
                              f"model.pretrained_sha256 asks for")
    try:
        content = ckpt.load_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"model.pretrained: {exc}") from None
    weights, width, round_nearest = _weights_of(content, path, model_cfg)
    if width is None:
        width = _width_that_fits(weights, round_nearest)
    return Source(name=name, file=path, sha256=sha256, weights=weights, width_mult=width,
                  round_nearest=round_nearest, classes=_class_names_of(content, weights))


def _class_names_of(content: Any, weights: dict[str, torch.Tensor]) -> Optional[list[str]]:
    """The class of each classifier row, from a training checkpoint that records one name per row."""
    names = content.get("class_names") if ckpt.is_training_checkpoint(content) else None
    rows = weights[f"{HEAD}.1.weight"].shape[0]
    if isinstance(names, list) and len(names) == rows and all(isinstance(n, str) for n in names):
        return names
    return None


def _weights_of(content: Any, path: Path, model_cfg: ModelConfig
                ) -> tuple[dict[str, torch.Tensor], Optional[float], int]:
    """(state dict, width_mult if the file says it, round_nearest) of a checkpoint or a bare state dict."""
    if ckpt.is_training_checkpoint(content):
        saved = (content.get("config") or {}).get("model") or {}
        width, round_nearest = saved.get("width_mult"), saved.get("round_nearest", model_cfg.round_nearest)
        if model_cfg.pretrained_ema:
            if content.get("ema") is None:
                raise CheckpointError(f"model.pretrained_ema: {path} holds no EMA weights (its run had train.ema "
                                      f"off); set model.pretrained_ema: false")
            weights = ckpt.ema_weights(content)
        else:
            weights = content["model"]
    else:
        if model_cfg.pretrained_ema:
            raise CheckpointError(f"model.pretrained_ema: {path} is a bare state dict, not an mbv2 checkpoint: "
                                  f"it has no EMA weights")
        weights, width, round_nearest = content, None, model_cfg.round_nearest
    if not isinstance(weights, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                for k, v in weights.items()):
        raise CheckpointError(f"model.pretrained: {path} is neither a state dict nor an mbv2 checkpoint")
    for prefix in WRAPPER_PREFIXES:
        if weights and all(k.startswith(prefix) for k in weights):
            weights = ckpt.strip_prefix(weights, prefix)
    if "features.0.0.weight" not in weights or f"{HEAD}.1.weight" not in weights:
        some = shortlist(weights, limit=3) if weights else "nothing"
        raise CheckpointError(f"model.pretrained: {path} does not hold MobileNetV2 weights (no features.0.0.weight "
                              f"or {HEAD}.1.weight; it holds {some})")
    return weights, width, int(round_nearest)


def _reference(width_mult: float, round_nearest: int, num_classes: int = 1) -> dict[str, torch.Size]:
    """Tensor shapes of a MobileNetV2 of that width, computed without allocating its weights."""
    with torch.device("meta"):
        model = MobileNetV2(num_classes=num_classes, width_mult=width_mult, round_nearest=round_nearest)
    return {k: v.shape for k, v in model.state_dict().items()}


def _backbone_misfits(weights: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> list[str]:
    """'key: file shape vs model shape' for each backbone tensor that does not fit."""
    return [f"{k}: {list(weights[k].shape)} vs {list(shape)}" for k, shape in shapes.items()
            if not k.startswith(HEAD + ".") and k in weights and weights[k].shape != shape]


def _width_that_fits(weights: dict[str, torch.Tensor], round_nearest: int) -> Optional[float]:
    guesses = list(COMMON_WIDTHS)
    if LAST_BLOCK in weights:  # its channels are 320 x width, rounded: exact for the usual widths
        guesses.insert(0, weights[LAST_BLOCK].shape[0] / 320)
    for width in guesses:
        if not _backbone_misfits(weights, _reference(width, round_nearest)):
            return width
    return None


def resolve_config(cfg: Config, source: Optional[Source], saved: Optional[dict[str, Any]] = None) -> Config:
    """model.width_mult and model.pretrained_sha256 made concrete for a run.

    A fresh run takes them from ``source`` (the width only when unset; a set width must fit the file). A
    resumed run (``saved``: its checkpoint's config) takes what that run recorded, without reading the
    file again: its weights come from the checkpoint.
    """
    model = cfg.model
    if saved is not None:
        saved_model = saved.get("model", {})
        width = model.width_mult if model.width_mult is not None else saved_model.get("width_mult")
        sha = model.pretrained_sha256
        if sha is None and saved_model.get("pretrained") == model.pretrained:
            sha = saved_model.get("pretrained_sha256")
        return _with_model(cfg, width_mult=width, pretrained_sha256=sha)
    if source is None:
        return cfg
    width = model.width_mult
    if width is None:
        if source.width_mult is None:
            raise CheckpointError(f"model.pretrained: the layer sizes of {source.file} fit none of the widths "
                                  f"{', '.join(map(str, COMMON_WIDTHS))}; set model.width_mult")
        width = source.width_mult
    else:
        misfits = _backbone_misfits(source.weights, _reference(width, model.round_nearest))
        if misfits:
            theirs = f"width_mult {source.width_mult:g}" if source.width_mult is not None else "another width"
            raise CheckpointError(f"model.pretrained {source.name}: its weights are for {theirs}, but "
                                  f"model.width_mult is {width:g} ({misfits[0]}); leave model.width_mult unset "
                                  f"to take the file's")
    return _with_model(cfg, width_mult=width, pretrained_sha256=source.sha256)


def _with_model(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))


@torch.no_grad()
def load_into(model: MobileNetV2, source: Source, classes: Optional[Sequence[str]] = None) -> LoadReport:
    """Copy ``source``'s weights into ``model`` (built at the width resolve_config settled, freshly
    initialized): the whole backbone, then the classifier.

    With class names on both sides (``classes``: the model's, in row order), each class the file has keeps
    its row, wherever it is in the file; the rows of the other classes stay as initialized. Without them,
    the classifier is taken whole when it has the model's number of classes, and left as initialized
    otherwise (the same number of classes is no sign of the same classes, but it is all a state dict says)."""
    target = model.state_dict()
    # BatchNorm's batch counters are absent from older files; the model's own (zero) then stay
    missing = [k for k in target if k not in source.weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in source.weights if k not in target]
    if missing or unexpected:
        raise CheckpointError(f"model.pretrained: {source.file} is not a MobileNetV2 state dict "
                              f"(missing: {shortlist(missing)}; unexpected: {shortlist(unexpected)})")
    misfits = _backbone_misfits(source.weights, {k: v.shape for k, v in target.items()})
    if misfits:  # resolve_config checked the width; a round_nearest that differs ends here
        raise CheckpointError(f"model.pretrained: {source.file} does not fit this model: {misfits[0]}")
    head = [k for k in target if k.startswith(HEAD + ".")]
    counts = {"source_classes": int(source.weights[f"{HEAD}.1.weight"].shape[0]),
              "model_classes": int(target[f"{HEAD}.1.weight"].shape[0])}
    taken = {k: v for k, v in source.weights.items() if not k.startswith(HEAD + ".")}
    if source.classes is not None and classes is not None:
        row_in_file = {name: row for row, name in enumerate(source.classes)}
        kept = [(row, row_in_file[name]) for row, name in enumerate(classes) if name in row_in_file]
        rows = {k: target[k].clone() for k in head}  # the fresh initialization, for the classes not kept
        if kept:
            model_rows, file_rows = (torch.tensor(side) for side in zip(*kept))
            for k in head:
                rows[k][model_rows] = source.weights[k][file_rows].to(rows[k].dtype)
        model.load_state_dict({**target, **taken, **rows})
        return LoadReport(loaded=len(taken), reinitialized=[], kept_rows=len(kept),
                          fresh_classes=[name for name in classes if name not in row_in_file], **counts)
    head_fits = all(source.weights[k].shape == target[k].shape for k in head)
    if head_fits:
        taken.update({k: source.weights[k] for k in head})
    model.load_state_dict({**target, **taken})
    return LoadReport(loaded=len(taken), reinitialized=[] if head_fits else head, **counts)
