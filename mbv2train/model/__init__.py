"""The network and the files that carry it.

network.py    MobileNetV2 (inverted residuals, linear bottlenecks, ReLU6, width multiplier)
pretrained.py starting weights: an mbv2 checkpoint, a torchvision state dict or weights name, by tag
summary.py    `mbv2 summary`: the layer table, parameters and multiply-adds
int8file.py   the int8 file written by `mbv2 quantize`: a torch.export program with its classes
sidecar.py    the classes and preprocessing that travel with an exported file (keys and the JSON beside it)
"""

from mbv2train.model.network import (HEAD, INVERTED_RESIDUAL_SETTING, LAST_CHANNELS, STEM_CHANNELS, ConvBNReLU6,
                                     InvertedResidual, MobileNetV2, build_model, make_divisible)

__all__ = ["HEAD", "INVERTED_RESIDUAL_SETTING", "LAST_CHANNELS", "STEM_CHANNELS", "ConvBNReLU6", "InvertedResidual",
           "MobileNetV2", "build_model", "make_divisible"]
