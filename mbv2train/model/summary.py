"""Layer table, parameter and multiply-add counts for MobileNetV2.

Multiply-adds are counted the way the MobileNetV2 paper and the published checkpoint tables count them:
conv layers (output elements x in_channels/groups x kH x kW) and linear layers (in x out); BatchNorm,
activations, pooling and the residual additions are not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mbv2train.model import MobileNetV2, build_model
from mbv2train.words import plural

GRID_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
GRID_RESOLUTIONS = (96, 128, 160, 192, 224)


@dataclass
class LayerRow:
    name: str  # dotted module path, as in the state dict ("" for the whole model)
    type: str
    depth: int  # 0 for the whole model, 1 for its children, ...
    output_shape: list[int]
    params: int  # parameters of this module and everything inside it
    macs: int  # multiply-adds of this module and everything inside it, for one image


@dataclass
class ModelSummary:
    input_size: list[int]  # [batch, channels, height, width]
    params: int
    trainable_params: int
    macs: int  # one image
    batch_macs: int
    param_bytes: int
    activation_bytes: int  # float32 outputs of every leaf layer, whole batch
    layers: list[LayerRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def count_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-adds of one conv or linear call over its whole output (0 for other layer types)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def summarize(model: nn.Module, image_size: int = 224, batch_size: int = 1, depth: int = 2) -> ModelSummary:
    """Run one forward pass of ``model`` on a blank image and collect the rows down to ``depth``.

    One image is enough: every count scales linearly with the batch, so batch totals are multiplied
    out rather than computed. Under no_grad only a couple of activations are alive at a time.
    """
    shapes: dict[str, list[int]] = {}
    leaf_macs: dict[str, int] = {}
    leaf_elements: dict[str, int] = {}

    def record(name: str):
        def hook(module, inputs, output):
            shapes[name] = [batch_size, *output.shape[1:]]
            if not any(True for _ in module.children()):
                leaf_macs[name] = leaf_macs.get(name, 0) + count_macs(module, output)
                leaf_elements[name] = leaf_elements.get(name, 0) + output.numel()
        return hook

    was_training = model.training
    handles = [m.register_forward_hook(record(name)) for name, m in model.named_modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    rows = []
    for name, module in model.named_modules():
        level = 0 if name == "" else name.count(".") + 1
        if level > depth:
            continue
        inside = [leaf for leaf in leaf_macs if name == "" or leaf == name or leaf.startswith(name + ".")]
        rows.append(LayerRow(
            name=name,
            type=type(module).__name__,
            depth=level,
            output_shape=shapes.get(name, []),
            params=sum(p.numel() for p in module.parameters()),
            macs=sum(leaf_macs[leaf] for leaf in inside),
        ))

    params = list(model.parameters())
    macs = sum(leaf_macs.values())
    return ModelSummary(
        input_size=[batch_size, 3, image_size, image_size],
        params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        macs=macs,
        batch_macs=macs * batch_size,
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        activation_bytes=sum(leaf_elements.values()) * batch_size * 4,
        layers=rows,
    )


def summarize_config(model_config, image_size: int = 224, batch_size: int = 1, depth: int = 2) -> ModelSummary:
    """Summary of the MobileNetV2 that a ``config.ModelConfig`` describes."""
    return summarize(build_model(model_config), image_size, batch_size, depth)


def grid(num_classes: int = 1000, widths=GRID_WIDTHS, resolutions=GRID_RESOLUTIONS) -> list[dict]:
    """Parameters and multiply-adds (one image) for every width x resolution pair."""
    cells = []
    for width in widths:
        model = MobileNetV2(num_classes=num_classes, width_mult=width)
        for size in resolutions:
            s = summarize(model, size, depth=0)
            cells.append({"width_mult": width, "image_size": size, "params": s.params, "macs": s.macs})
    return cells


# ----------------------------------------------------------------------------------------------------
# Text output


def human(n: float, unit: str = "") -> str:
    """3504872 -> '3.50M'; the short form printed beside exact integers."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def mebibytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_summary(s: ModelSummary, title: str) -> str:
    name_width = max(len(_layer_label(r)) for r in s.layers) + 2
    header = f"{'Layer (type)':<{name_width}}{'Output shape':<22}{'Params':>12}{'Mult-adds':>16}"
    rule = "-" * len(header)
    lines = [title, "", header, rule]
    for r in s.layers:
        shape = str(r.output_shape) if r.output_shape else "-"
        lines.append(f"{_layer_label(r):<{name_width}}{shape:<22}{r.params:>12,}{r.macs:>16,}")
    batch = s.input_size[0]
    totals = [
        ("Parameters", f"{s.params:,}", f"({human(s.params)})"),
        ("Trainable parameters", f"{s.trainable_params:,}", f"({human(s.trainable_params)})"),
        ("Multiply-adds per image", f"{s.macs:,}", f"({human(s.macs)})"),
        (f"Multiply-adds, batch of {batch}", f"{s.batch_macs:,}", f"({human(s.batch_macs)})"),
        ("Parameter memory", mebibytes(s.param_bytes), "(float32)"),
        ("Activation memory", mebibytes(s.activation_bytes),
         f"(float32 outputs of every layer, batch of {batch})"),
    ]
    label_width = max(len(label) for label, _, _ in totals) + 2
    value_width = max(len(value) for _, value, _ in totals)
    lines.append(rule)
    lines += [f"{label + ':':<{label_width}}{value:>{value_width}}  {note}" for label, value, note in totals]
    return "\n".join(lines)


def _layer_label(r: LayerRow) -> str:
    if r.depth == 0:
        return r.type
    return f"{'  ' * r.depth}{r.name} ({r.type})"


def format_grid(cells: list[dict], num_classes: int) -> str:
    widths = sorted({c["width_mult"] for c in cells})
    sizes = sorted({c["image_size"] for c in cells})
    by_key = {(c["width_mult"], c["image_size"]): c for c in cells}
    header = f"{'width':<7}{'params':>10}" + "".join(f"{f'{px}px':>11}" for px in sizes)
    lines = [f"MobileNetV2 parameters and multiply-adds per image ({plural(num_classes, 'class')})", "", header,
             "-" * len(header)]
    for w in widths:
        row = f"{w:<7g}{human(by_key[(w, sizes[0])]['params']):>10}"
        row += "".join(f"{human(by_key[(w, px)]['macs']):>11}" for px in sizes)
        lines.append(row)
    return "\n".join(lines)
