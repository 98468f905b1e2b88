"""Job configuration: one YAML file, validated by pydantic, every field described.

One module per section: `base` (the strict model, ConfigError), `model`, `generation`
(with limits and the member defaults), `resources`, `io` (input, storage, output), `job`
(faults, ray, JobConfig), `scores` and `loading` (YAML, overrides, error text). Their public names are
re-exported here: this package is the config's interface.
"""

from k3batch.config.base import ConfigError, Dtype, Strict
from k3batch.config.generation import GenerationConfig, LimitsConfig, apply_member_defaults
from k3batch.config.io import InputConfig, OutputConfig, SecretInValue, StorageConfig
from k3batch.config.job import FaultsConfig, JobConfig, RayConfig
from k3batch.config.loading import (
    format_validation_error,
    load_config,
    parse_overrides,
    set_path,
)
from k3batch.config.model import (
    PRECISIONS,
    DeviceMap,
    DtypeMap,
    LoraConfig,
    ModelConfig,
)
from k3batch.config.performance import CompileConfig, PerformanceConfig
from k3batch.config.resources import ResourcesConfig, TextEncoderPoolConfig
from k3batch.config.scores import ClassifierConfig, ScoresConfig

__all__ = [
    "PRECISIONS",
    "ClassifierConfig",
    "CompileConfig",
    "ConfigError",
    "DeviceMap",
    "Dtype",
    "DtypeMap",
    "FaultsConfig",
    "GenerationConfig",
    "InputConfig",
    "JobConfig",
    "LimitsConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "PerformanceConfig",
    "RayConfig",
    "ResourcesConfig",
    "ScoresConfig",
    "SecretInValue",
    "StorageConfig",
    "Strict",
    "TextEncoderPoolConfig",
    "set_path",
    "apply_member_defaults",
    "format_validation_error",
    "load_config",
    "parse_overrides",
]
