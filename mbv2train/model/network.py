"""MobileNetV2 (Sandler et al., 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").

The module tree is laid out so that ``state_dict()`` keys are exactly those of
``torchvision.models.mobilenet_v2``: weights trained by either load into the other with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from mbv2train.errors import ConfigError

# The paper's Table 2, one row per stage: expansion factor t, output channels c, repeats n, first stride s.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
# The module that maps features to classes: what a fine-tune onto other classes replaces. Every other
# parameter (the "backbone", i.e. ``features``) is shared by models of any number of classes.
HEAD = "classifier"


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor``, never dropping below 90% of ``value``.

    Hardware runs channel counts that are multiples of 8 faster; the 90% floor keeps a width multiplier
    from shrinking a layer by more than the user asked for.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Sequential):
    """Conv -> BatchNorm -> ReLU6, the unit every non-projection conv of the network uses."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_channels


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear), with a shortcut when shapes allow.

    The projection has no activation: the paper shows that ReLU on the narrow bottleneck destroys
    information (the "linear bottleneck").
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(in_channels * expand_ratio))
        self.stride = stride
        self.out_channels = out_channels
        self.use_res_connect = stride == 1 and in_channels == out_channels

        layers: list[nn.Module] = []
        if expand_ratio != 1:  # the t=1 block works on the input channels directly
            layers.append(ConvBNReLU6(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, kernel_size=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for ``num_classes`` classes at width multiplier ``width_mult``."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2,
                 round_nearest: int = 8):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        in_channels = make_divisible(STEM_CHANNELS * width_mult, round_nearest)
        # The paper keeps the last conv at 1280 channels for multipliers below 1: small models would
        # otherwise lose most of their classifier capacity.
        self.last_channel = make_divisible(LAST_CHANNELS * max(1.0, width_mult), round_nearest)

        features: list[nn.Module] = [ConvBNReLU6(3, in_channels, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_channels = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(in_channels, out_channels, s if i == 0 else 1, t))
                in_channels = out_channels
        features.append(ConvBNReLU6(in_channels, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        self.backbone_frozen = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out) convs, N(0, 0.01) classifier, BatchNorm as identity, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Train only the classifier (or everything again): the backbone's parameters stop (or start)
        asking for gradients, and its BatchNorm layers keep their running statistics while frozen, so
        that a frozen backbone computes exactly what it did before, in training steps too."""
        self.backbone_frozen = frozen
        self.features.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "MobileNetV2":
        # model.train() (the engine calls it every epoch; DDP and torch.compile pass it down) must not
        # switch a frozen backbone's BatchNorm back to batch statistics
        super().train(mode)
        if mode and self.backbone_frozen:
            self.features.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def build_model(model_config) -> MobileNetV2:
    """MobileNetV2 from a ``config.ModelConfig``."""
    if model_config.width_mult is None:
        raise ConfigError(f"model.width_mult is unset: only mbv2 train reads it from model.pretrained "
                          f"({model_config.pretrained}); set model.width_mult")
    return MobileNetV2(
        num_classes=model_config.num_classes,
        width_mult=model_config.width_mult,
        dropout=model_config.dropout,
        round_nearest=model_config.round_nearest,
    )
