"""The building blocks of every configuration: the allowed values, `opt()` (a field with its
help, its flag and whether it changes a result), and the checks `validate()` methods share."""

from __future__ import annotations

import dataclasses
from dataclasses import field

from ..errors import LayerpruneError
from ..options import flag_of

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
MODES = ("iterative", "one-shot", "block")
HEAL_METHODS = ("distill", "none")
TRAINABLE = ("neighbours", "all", "lora", "last")
COMPARE_METHODS = ("shortgpt", "iterative-bi", "angular-block", "sleb-nll", "replaceme", "last-layers",
                   "last-layers-ft", "layerprune")
PATCHES = ("none", "lstsq", "diag")
PATCH_TARGETS, PATCH_FITS = ("layer", "teacher"), ("lstsq", "normalised", "cosine")
TRAIN_DATA, MSE_SCALES = ("stream", "reuse", "teacher", "mix"), ("raw", "relative", "channel")
GGUF_TYPES = ("source", "q8_0", "f16", "f32")
# The metrics that score a layer by removing it (and so score patched candidates, on a shortlist, screened).
REMOVAL_METRICS = ("nll", "quality")
# The healing budget when neither --heal-tokens nor --heal-steps is given.
DEFAULT_HEAL_STEPS = 30


def opt(default, help: str, flag: str | None = None, result: bool = True, **kw):
    """A config field with its help text and optional flag name. `result=False` declares that the
    option changes neither the pruned model nor any figure a checkpoint records (where the run
    writes, how often it logs, how it spends memory for the same arithmetic): resume accepts it
    changed, and the model card's "default recipe" ignores it (options.result_free reads it)."""
    metadata = {"help": help, **({"flag": flag} if flag else {}), **({} if result else {"result": False})}
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=metadata)
    return field(default=default, metadata=metadata, **kw)


def gguf_type():
    """One declaration for `prune` and `export-gguf`."""
    return opt("source", "the type of the tensors the run changed, in model.gguf: source (their type in the source "
                         "GGUF where gguf can quantise it, else Q8_0), or q8_0, f16, f32 (larger, closer to the HF "
                         "folder)", result=False)


def positive(obj, names, prefix: str = "") -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise LayerpruneError(f"{prefix}{name} must be at least 1, got {getattr(obj, name)}",
                                  f"pass a positive {flag_of(type(obj), name)}")


def non_negative(obj, names, prefix: str = "") -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise LayerpruneError(f"{prefix}{name} must be >= 0, got {getattr(obj, name)}",
                                  f"pass a non-negative {flag_of(type(obj), name)}")


def one_of(value, allowed, what: str) -> None:
    if value not in allowed:
        raise LayerpruneError(f"unknown {what} {value!r}", f"use one of {', '.join(allowed)}")
