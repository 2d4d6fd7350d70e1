"""Data: ImageNet-style folders in, uint8 batches out.

folders.py    the folder layout, classes, and reading an image file as RGB
decode.py     JPEGs (by content) decoded by libjpeg-turbo into uint8 tensors; other formats through PIL
transforms.py the crop window and flip draws, train/val transforms (uint8 in the workers), MixUp/CutMix
encoded.py    data.decode: device, worker side: JPEG bytes, header, crop window and flip, no decoding
gpu_decode.py data.decode: device, training-process side: batched decode (nvJPEG on CUDA), crop, resize
loaders.py    seeded dataset, epoch sampler, DataLoaders, the record of skipped unreadable images
check.py      `mbv2 data check`: every file decoded as training would, the layout checked
demo.py       the demo datasets written by `mbv2 data demo`
"""

from mbv2train.data.folders import ImageFolderDataset, find_classes, is_image_file, load_image, resolve_dirs
from mbv2train.data.loaders import (BadImageLog, EpochSampler, Loaders, SeededDataset, available_cpus,
                                    build_loaders, build_val_loader, worker_count)
from mbv2train.data.transforms import build_mix_transform, build_train_transform, build_val_transform

__all__ = ["BadImageLog", "EpochSampler", "ImageFolderDataset", "Loaders", "SeededDataset", "available_cpus",
           "build_loaders", "build_mix_transform", "build_train_transform", "build_val_loader", "build_val_transform",
           "find_classes", "is_image_file", "load_image", "resolve_dirs", "worker_count"]
