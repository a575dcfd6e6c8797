"""Running parts of a model: capture what enters each layer, run from a cached state.

Both work through forward hooks on the decoder blocks and the final norm, so
they hold for every architecture whose blocks take the hidden states as their
first argument (all of transformers' decoder-only models). The embedding
scaling, masks, rotary tables and per-layer attention types stay the model's
own business.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .shard import is_sharded
from .surgery import find_layers, layer_view


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last block (a sibling of the layer list in every HF decoder)."""
    parent = find_layers(model).parent
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _output_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def capture(model: nn.Module, inputs: bool = True, final: bool = False) -> Iterator[dict]:
    """Record per forward: `states[i]` entering layer i and `states[L]` leaving the last layer;
    with `final`, also `final` = the output of the final norm."""
    layers = find_layers(model).layers
    norm = final_norm(model)
    record: dict = {"states": [None] * (len(layers) + 1)}
    handles = []

    def pre(index):
        def hook(module, args, kwargs):
            record["states"][index] = _hidden_arg(args, kwargs)
        return hook

    if inputs:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre(index), with_kwargs=True))
        handles.append(layers[-1].register_forward_hook(
            lambda m, a, out: record["states"].__setitem__(len(layers), _output_tensor(out))))
    if final:
        if norm is None:
            raise RuntimeError(f"no final norm found in {type(model).__name__}")
        handles.append(norm.register_forward_hook(lambda m, a, out: record.__setitem__("final", out)))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def logits_to_keep(model) -> dict:
    """The forward argument that makes `model` compute logits at the last position only, where
    its class takes one (for callers that read the head's input, not the logits)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(model).forward).parameters else {}


@dataclass
class FinalState:
    """The final norm's output [B, T, H], standing in for a batch's logits where the caller applies
    the LM head itself, a row at a time (tasks.engine: a large vocabulary's [B, T, V] is not made)."""

    h: torch.Tensor


def final_output(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, final: bool):
    """The model's logits, or with `final` the final norm's output, the LM head not run at all (a
    head over Gemma-3's 262K vocabulary costs 0.1 s even for `logits_to_keep`'s one position a
    row: it reads all of its 671 MB)."""
    if final:
        return FinalState(_until_final_norm(model, input_ids, attention_mask, normed=True))
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def layer_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, final: bool = False
                 ) -> tuple[list, torch.Tensor | FinalState]:
    """Run the model once; return (states entering each layer + last output, logits), or with
    `final` the final norm's output in place of the logits."""
    with capture(model) as record:
        return record["states"], final_output(model, input_ids, attention_mask, final)


@contextmanager
def injected(model: nn.Module, start: int, hidden: torch.Tensor, keep: Sequence[int]) -> Iterator[None]:
    """Within the block, the model runs only layers `keep` (all >= start) and takes `hidden` as
    the state entering layer `start`: layers below it are not run. Gradients flow as usual."""
    keep = list(keep)
    if keep and keep[0] < start:
        raise ValueError(f"injected needs kept layers >= {start}, got {keep}")
    with layer_view(model, keep):
        layers = find_layers(model).layers
        target = layers[0] if keep else final_norm(model)

        def inject(module, args, kwargs):
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handle = target.register_forward_pre_hook(inject, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


@torch.no_grad()
def run_from(model: nn.Module, start: int, hidden: torch.Tensor, keep: Sequence[int],
             input_ids: torch.Tensor, attention_mask: torch.Tensor, final: bool = False
             ) -> torch.Tensor | FinalState:
    """Logits of the model restricted to layers `keep` (all >= start), given the state entering
    layer `start`; with `final`, the final norm's output instead."""
    with injected(model, start, hidden, keep):
        return final_output(model, input_ids, attention_mask, final)


class _Stop(Exception):
    pass


def _until_final_norm(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      normed: bool = False) -> torch.Tensor:
    """Run the model's (current view of its) layers; return the state entering the final norm,
    having run neither the norm nor the LM head; with `normed`, the norm's output (the head not run)."""
    record = {}

    def grab(module, args, kwargs):
        record["h"] = _hidden_arg(args, kwargs)
        raise _Stop

    def grab_normed(module, args, output):
        record["h"] = _output_tensor(output)
        raise _Stop

    norm = final_norm(model)
    handle = norm.register_forward_hook(grab_normed) if normed else \
        norm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return record["h"]


@torch.no_grad()
def prefix_state(model: nn.Module, stop: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The state entering layer `stop`, running only layers below it (no norm, no LM head)."""
    with layer_view(model, range(stop)):
        return _until_final_norm(model, input_ids, attention_mask)


def forward_layers(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   whole: bool = False) -> None:
    """A forward pass through the model's (current view of its) layers, for callers that read only
    captured states (the patch fit, a local healing step): it stops before the final norm and the
    LM head, which on a large vocabulary cost as much as several layers. `whole` runs everything:
    a sharded model (--fsdp) or a DDP wrapper must finish its forward, FSDP for its own hooks after
    the forward, DDP to prepare the gradients' synchronisation. Gradients flow as usual."""
    if whole or final_norm(model) is None:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    else:
        _until_final_norm(model, input_ids, attention_mask)


@torch.no_grad()
def run_layers(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """`forward_layers` without gradients, whole for a sharded model."""
    forward_layers(model, input_ids, attention_mask, whole=is_sharded(model))


@torch.no_grad()
def states_up_to(model: nn.Module, top: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list:
    """`capture`'s states (entering each layer, and leaving the last) of layers 0..top, running
    only those layers."""
    with layer_view(model, range(top + 1)), capture(model) as record:
        run_layers(model, input_ids, attention_mask)
    return record["states"]


def layer_outputs(model: nn.Module, layer_ids: Sequence[int], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of layers `layer_ids`, running only the layers up to the highest of them."""
    states = states_up_to(model, max(layer_ids), input_ids, attention_mask)
    return [states[i + 1] for i in layer_ids]
