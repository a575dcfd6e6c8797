"""The typed configuration of every command: the only place defaults live.

Each field carries its help text (and, where it differs from the field name,
its flag) in `metadata`, so the CLI generates every option from here and a
YAML file (`--config run.yaml`, nested `data:` and `heal:` sections) fills
the same fields. The precedence is defaults < YAML < flags. Configs are
frozen, so the exact object that produced a result is what a run writes to
`config.yaml` (options.py turns configs into YAML and back), and
`layerprune prune --config OUT/config.yaml --out NEW` repeats it.

Structural checks live in `validate()`; names of metrics and tasks are
checked by the modules that own those registries (importance.py, tasks/).
"""

from .commands import CompareConfig, EvalConfig, ExportConfig, ModelConfig, PruneConfig, Recipe, ScoreConfig
from .fields import (COMPARE_METHODS, DEFAULT_HEAL_STEPS, DEVICES, DTYPES, GGUF_TYPES, HEAL_METHODS, MODES,
                     MSE_SCALES, PATCH_FITS, PATCH_TARGETS, PATCHES, REMOVAL_METRICS, TRAIN_DATA, TRAINABLE, opt)
from .parts import BenchConfig, DataConfig, HealConfig

__all__ = ["BenchConfig", "COMPARE_METHODS", "CompareConfig", "DEFAULT_HEAL_STEPS", "DEVICES", "DTYPES", "DataConfig",
           "EvalConfig", "ExportConfig", "GGUF_TYPES", "HEAL_METHODS", "HealConfig", "MODES", "MSE_SCALES",
           "ModelConfig", "PATCHES", "PATCH_FITS", "PATCH_TARGETS", "PruneConfig", "REMOVAL_METRICS", "Recipe",
           "ScoreConfig", "TRAINABLE", "TRAIN_DATA", "opt"]
