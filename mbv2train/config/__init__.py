"""Configuration: one frozen Config per run, read from strict YAML with --set overrides.

settings.py    the dataclasses per section (model, data, optim, schedule, train), load_config, the reference
yaml_schema.py strict YAML reading: unknown keys, types and overrides named in one line
preflight.py   the files and folders a config or a command names, checked before torch is imported
"""

from mbv2train.config.settings import (BEST_METRICS, DEFAULT_WORKERS, PRETRAINED_TAGS, Config, DataConfig,
                                       ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, config_from_dict,
                                       describe_settings, load_config, pretrained_is_file, with_num_classes)

__all__ = ["BEST_METRICS", "DEFAULT_WORKERS", "PRETRAINED_TAGS", "Config", "DataConfig", "ModelConfig",
           "OptimConfig", "ScheduleConfig", "TrainConfig", "config_from_dict", "describe_settings", "load_config",
           "pretrained_is_file", "with_num_classes"]
