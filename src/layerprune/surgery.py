"""Finding the decoder layers of any architecture and cutting them out.

Three things must agree after a cut, or generation with a KV cache breaks or
a reload silently re-initialises weights: the module list, each attention
module's `layer_idx` (the cache slot it writes), and the config. Every
per-layer config pattern follows the cut: per-layer lists (`layer_types`,
`no_rope_layers`), lists of layer indices (`moe_layers`, `mlp_only_layers`),
counts from the bottom (`max_window_layers`, `first_k_dense_replace`), and
Qwen-MoE's sparse step (rewritten as an explicit list). Patterns that cannot
follow a cut (Jamba's periods and offsets) are refused. After every real cut,
a model built from the new config on the meta device must have exactly the
pruned model's weights, names and shapes, or the cut is refused: a saved
folder always reloads as it was.

The map from current to ORIGINAL layer indices lives in the config as
`layerprune_original_layers`, so it is cut like any other per-layer list and
survives save and reload.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from torch import nn

from .errors import LayerpruneError

MAP_KEY = "layerprune_original_layers"
# Which config lists are per-layer is decided once, at the original depth, and kept in the config:
# at a later depth another list (say, of 5 multipliers) could have the length of the model by chance.
LAYER_KEYS_KEY = "layerprune_per_layer_keys"
# Attribute paths for models whose _no_split_modules does not name the block class.
KNOWN_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
               "model.language_model.layers")
# Config scalars that count layers from the bottom; they shrink with the layers below them.
COUNT_KEYS = ("max_window_layers", "first_k_dense_replace")
# Config lists of layer indices (which layers are MoE, which stay dense): renumbered to the kept layers.
INDEX_KEYS = ("moe_layers", "mlp_only_layers")
# Periodic patterns that no config value can express after an arbitrary cut.
UNFOLLOWABLE_KEYS = ("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset")


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
        and key not in INDEX_KEYS
    }


def _sparse_step_as_list(config, depth: int) -> None:
    """Qwen2/3-MoE: layer i is sparse when (i + 1) % decoder_sparse_step == 0 and i is not in
    mlp_only_layers. A cut shifts the period, so the pattern becomes step 1 plus an explicit list."""
    step = getattr(config, "decoder_sparse_step", None)
    if not isinstance(step, int) or step <= 1 or not isinstance(getattr(config, "mlp_only_layers", None), list):
        return
    config.mlp_only_layers = [i for i in range(depth) if i in config.mlp_only_layers or (i + 1) % step]
    config.decoder_sparse_step = 1


def check_cut_supported(model: nn.Module) -> None:
    """Refuse, before any work, an architecture whose layer pattern cannot follow a cut."""
    config = text_config(model)
    fixed = [key for key in UNFOLLOWABLE_KEYS if getattr(config, key, None) not in (None, 1, 0)]
    if fixed:
        raise LayerpruneError(f"{type(model).__name__} ({config.model_type}) lays its layers out by "
                              f"{', '.join(fixed)}, a pattern no config can keep after removing a layer",
                              "layerprune cannot prune this architecture; use a model with per-layer config lists")


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
        setattr(config, LAYER_KEYS_KEY, sorted(_per_layer_fields(config, depth)))
    _sparse_step_as_list(config, depth)
    for key in INDEX_KEYS:
        indices = getattr(config, key, None)
        if isinstance(indices, (list, tuple)):
            setattr(config, key, [new for new, old in enumerate(keep) if old in set(indices)])
    for key in getattr(config, LAYER_KEYS_KEY, None) or _per_layer_fields(config, depth):
        value = getattr(config, key)
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
    check_cut_supported(model)
    originals = original_indices(model)
    removed = [find_layers(model).layers[d] for d in sorted(set(drop))]
    keep_layers(model, [k for k in range(depth) if k not in set(drop)])
    drop_units(model, removed)
    check_structure(model)
    return [originals[d] for d in sorted(set(drop))]


def drop_units(model: nn.Module, removed: list[nn.Module]) -> None:
    """Forget the FSDP units of layers cut out of a sharded model: the root lists every unit once
    it has run, and would otherwise keep the removed layers' shards alive (shard.py makes the
    units; the cut is the one place a unit goes)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return
    context = model._get_fsdp_state()._state_ctx
    gone = {id(layer._get_fsdp_state()) for layer in removed if isinstance(layer, FSDPModule)}
    context.all_states[:] = [state for state in context.all_states if id(state) not in gone]


def check_structure(model: nn.Module) -> None:
    """The model the config now describes (built on the meta device, no memory) must hold exactly
    the pruned model's weights: else a reload would drop some and re-initialise others."""
    import torch

    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception as err:  # the architecture's own config validation
        raise LayerpruneError(f"{type(model).__name__}: the config after the cut is not valid ({err})",
                              "layerprune cannot prune this architecture") from err
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:3]
        raise LayerpruneError(f"{type(model).__name__} ({text_config(model).model_type}): after the cut its config "
                              f"no longer describes its weights (e.g. {[k for k, _ in diff]})",
                              "layerprune cannot prune this architecture; please report it")


@contextmanager
def layer_view(model: nn.Module, keep: Sequence[int]) -> Iterator[None]:
    """Temporarily run the model with only the layers `keep`; everything is restored on exit."""
    where = find_layers(model)
    config = text_config(model)
    old_layers = where.layers
    saved = dict(vars(config))  # keep_layers assigns new values, never mutates old ones
    keep_layers(model, keep)
    try:
        yield
    finally:
        setattr(where.parent, where.name, old_layers)
        for key in set(vars(config)) - set(saved):
            delattr(config, key)
        for key, value in saved.items():
            setattr(config, key, value)
        _renumber(old_layers)
