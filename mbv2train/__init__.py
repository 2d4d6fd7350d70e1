"""mbv2train: train MobileNetV2 (Sandler et al., 2018) on ImageNet-style image folders.

Layers, top to bottom; a module imports only from its own package or a lower layer (import-linter checks it):

    cli/                 the `mbv2` command: options in, one call per command, no logic
    bench/, deploy/      `mbv2 bench`; export and int8 quantization
    train/               building a run and running it: epoch, step guard, checkpointer, resume state
    evaluate/            the evaluation loop, `mbv2 eval`, its reports, predict
    model/ | data/       the network and its files | folders, decoding, transforms, loaders (never each other)
    config/              the Config, strict YAML, checks on the paths it names
    leaf modules here    errors, words, rng, devices, progress, distributed, checkpoint files, signals, ...

docs/ARCHITECTURE.md tells the same story at length.
"""

__version__ = "0.1.0"
