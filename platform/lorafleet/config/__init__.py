"""lorafleet's configs: one base (`base`: home, YAML + `--set` loading, `ConfigError`) and one
schema module per concern (`finetune`: a training run; sweeps, compare ladders and serving have
theirs beside it). Every config problem is reported at once, before any worker starts."""

from lorafleet.config.base import (
    ConfigError,
    Section,
    apply_overrides,
    default_home,
    dump_config,
    home_location,
    registry_root,
    format_errors,
    load_raw,
    read_yaml,
    set_home,
    validate,
)
from lorafleet.config.finetune import (
    DataConfig,
    FinetuneConfig,
    LoraSettings,
    MethodConfig,
    ModelConfig,
    RunConfig,
    ScalingConfig,
    TaskConfig,
    TrainConfig,
    load_config,
    parse_config,
    resolve,
)
from lorafleet.config.tracking import MlflowSettings, TensorboardSettings, TrackingConfig

__all__ = [
    "ConfigError",
    "Section",
    "apply_overrides",
    "default_home",
    "dump_config",
    "home_location",
    "registry_root",
    "format_errors",
    "load_raw",
    "read_yaml",
    "set_home",
    "validate",
    "DataConfig",
    "FinetuneConfig",
    "LoraSettings",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "ScalingConfig",
    "TaskConfig",
    "TrainConfig",
    "load_config",
    "parse_config",
    "resolve",
    "MlflowSettings",
    "TensorboardSettings",
    "TrackingConfig",
]
