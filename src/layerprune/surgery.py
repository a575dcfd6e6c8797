"""Finding the decoder layers of any architecture and cutting them out.

Three things must agree after a cut, or generation with a KV cache breaks:
the module list, each attention module's `layer_idx` (the cache slot it
writes), and the config (`num_hidden_layers` plus every per-layer field such
as `layer_types`, and `max_window_layers`). The map from current to ORIGINAL
layer indices lives in the config as `layerprune_original_layers`, so it is
cut like any other per-layer list and survives save and reload.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from torch import nn

from .errors import LayerpruneError

MAP_KEY = "layerprune_original_layers"
# Attribute paths for models whose _no_split_modules does not name the block class.
KNOWN_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers")
# Config scalars that count layers from the bottom; they shrink with the layers below them.
COUNT_KEYS = ("max_window_layers",)


@dataclass
class LayerList:
    parent: nn.Module
    name: str

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.parent, self.name)


def find_layers(model: nn.Module) -> LayerList:
    """The ModuleList of decoder blocks: HF's own metadata first, then known attribute paths."""
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    best: tuple[int, str] | None = None
    if block_names:
        for path, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
                type(m).__name__ in block_names for m in module
            ):
                if best is None or len(module) > best[0]:
                    best = (len(module), path)
    paths = [best[1]] if best else []
    paths += list(KNOWN_PATHS)
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            continue
        if isinstance(getattr(parent, name, None), nn.ModuleList):
            return LayerList(parent, name)
    raise LayerpruneError(f"cannot find the decoder layers of {type(model).__name__}",
                          "layerprune handles decoder-only models that keep their blocks in a ModuleList "
                          "(Llama, Qwen, Mistral, Gemma, Phi, ...)")


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model: nn.Module) -> int:
    return len(find_layers(model).layers)


def original_indices(model: nn.Module) -> list[int]:
    """For each current layer, its index in the original model."""
    mapping = getattr(text_config(model), MAP_KEY, None)
    return list(mapping) if mapping is not None else list(range(num_layers(model)))


def _per_layer_fields(config, depth: int) -> dict[str, list]:
    return {
        key: value for key, value in vars(config).items()
        if isinstance(value, (list, tuple)) and len(value) == depth and not key.startswith("_")
    }


def _renumber(layers: nn.ModuleList) -> None:
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index


def keep_layers(model: nn.Module, keep: Sequence[int]) -> None:
    """Keep only the current layers `keep` (in order) and make config and cache slots agree."""
    where = find_layers(model)
    old = list(where.layers)
    depth = len(old)
    keep = list(keep)
    if sorted(set(keep)) != keep or (keep and not 0 <= keep[0] <= keep[-1] < depth):
        raise ValueError(f"keep must be increasing indices below {depth}, got {keep}")
    config = text_config(model)
    if getattr(config, MAP_KEY, None) is None:
        setattr(config, MAP_KEY, list(range(depth)))
    for key, value in _per_layer_fields(config, depth).items():
        setattr(config, key, type(value)(value[k] for k in keep))
    for key in COUNT_KEYS:
        bound = getattr(config, key, None)
        if isinstance(bound, int):
            setattr(config, key, sum(1 for k in keep if k < bound))
    config.num_hidden_layers = len(keep)
    setattr(where.parent, where.name, nn.ModuleList([old[k] for k in keep]))
    _renumber(where.layers)


def remove_layers(model: nn.Module, drop: Sequence[int]) -> list[int]:
    """Remove the current layers `drop`; return their ORIGINAL indices."""
    depth = num_layers(model)
    bad = [d for d in drop if not 0 <= d < depth]
    if bad:
        raise ValueError(f"layers {bad} do not exist in a model of {depth} layers")
    originals = original_indices(model)
    keep_layers(model, [k for k in range(depth) if k not in set(drop)])
    return [originals[d] for d in sorted(set(drop))]


@contextmanager
def layer_view(model: nn.Module, keep: Sequence[int]) -> Iterator[None]:
    """Temporarily run the model with only the layers `keep`; everything is restored on exit."""
    where = find_layers(model)
    config = text_config(model)
    old_layers = where.layers
    saved = {key: value for key, value in vars(config).items()
             if key in _per_layer_fields(config, len(old_layers)) or key in COUNT_KEYS or key == "num_hidden_layers"}
    had_map = hasattr(config, MAP_KEY)
    keep_layers(model, keep)
    try:
        yield
    finally:
        setattr(where.parent, where.name, old_layers)
        for key, value in saved.items():
            setattr(config, key, value)
        if not had_map and hasattr(config, MAP_KEY):
            delattr(config, MAP_KEY)
        _renumber(old_layers)
