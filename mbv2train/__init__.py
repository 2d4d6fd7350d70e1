"""mbv2train: train MobileNetV2 (Sandler et al., 2018) on ImageNet-style image folders."""

__version__ = "0.1.0"
