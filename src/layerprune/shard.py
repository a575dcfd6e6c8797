"""Sharded runs (--fsdp): the student and the teacher split over the processes with PyTorch FSDP2.

Each decoder layer is one `fully_shard` unit and the root (embeddings, final norm, LM head) is
another, so each of N processes holds about 1/N of every model's parameters, and of the
student's gradients and optimizer states. A unit is gathered only while it runs. Every forward
pass is then a collective: all processes must run the same passes in the same order, which is
why the shares of batches are padded to one length (tasks.engine.my_share) and why everything
that reads or writes whole tensors goes through the few functions here:
- `editable(module)`: a cut's patch folds into one layer, gathered alone and written back;
- a removed layer's unit leaves the root's list with the cut (surgery.drop_units), nothing gathered;
- `save_folder`: the output folder is written one gathered unit at a time;
- `load_sharded_models`: the main process reads the weights, the others get their shards;
- `save_shards`/`load_shards`: checkpoints through torch.distributed.checkpoint, each process
  writing and reading its own shard.
The same code runs on CPU (gloo) and GPU (nccl); on GPU, bf16 compute with float32 master
weights comes from FSDP2's MixedPrecisionPolicy.
"""

from __future__ import annotations

import copy
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import LayerpruneError
from .models import load_model, resolve_device
from .processes import LAUNCH_FIX, is_main_process, process_count, wait_for_everyone
from .surgery import find_layers

def check_launch() -> None:
    """--fsdp shards over processes: one process alone has nothing to share with."""
    if process_count() < 2:
        raise LayerpruneError(f"--fsdp needs a distributed launch of 2 or more processes (this is {process_count()})",
                              f"{LAUNCH_FIX}, N >= 2")


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is, or holds, an FSDP unit (PEFT's wrapper around a sharded student does)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())   # modules() starts with the model


def shard(model: nn.Module, mixed_precision: str = "no", device: torch.device | None = None) -> nn.Module:
    """fully_shard every decoder layer, then the root; in place. `mixed_precision` "bf16" on a
    GPU: parameters gathered in bf16 for compute, gradients reduced and kept in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    try:
        layers = find_layers(model).layers
    except LayerpruneError as err:
        raise LayerpruneError(f"--fsdp wraps each decoder layer, but {err.problem}", err.fix) from err
    classes = sorted({type(layer).__name__ for layer in layers})
    if len(classes) != 1:
        raise LayerpruneError(f"--fsdp wraps each decoder layer, but {type(model).__name__}'s layer list holds "
                              f"{', '.join(classes)}", "run this architecture without --fsdp")
    device = device or next(model.parameters()).device   # a model on the meta device is sharded for `device`
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" and device.type == "cuda" else MixedPrecisionPolicy()
    mesh = init_device_mesh(device.type, (process_count(),))   # the model's device, not the machine's first
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # the root reshards after its forward too: FSDP2 keeps a root unit whole after the forward,
    # waiting for a backward, and most passes here (scoring, evaluation, the teacher) have none
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return model


def load_sharded_models(name: str | None, dtype: str, device: str, mixed_precision: str = "no"):
    """(teacher, tokenizer, student) for --fsdp, both models sharded. The main process alone
    reads the weights; the others build the model's shape on the meta device and receive their
    shards from it (torch.distributed.checkpoint's broadcast from rank 0), so a process holds
    the whole model only on the main one, and only while loading. The student is built the same
    way and filled from the teacher's shards, each process copying its own: FSDP modules cannot
    be deep-copied, and a copy before sharding would hold two whole models."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict


    main, place = is_main_process(), resolve_device(device)
    teacher, tokenizer = load_model(name, dtype, device, weights=main)
    whole_weights = teacher.state_dict() if main else {}
    with torch.device("meta"):
        student = type(teacher)(copy.deepcopy(teacher.config)).to(next(teacher.parameters()).dtype)
    shard(teacher, mixed_precision, place)
    shard(student, mixed_precision, place)
    if not main:
        teacher.to_empty(device=place)
    set_model_state_dict(teacher, whole_weights, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True))
    del whole_weights
    for buffer in teacher.buffers():   # what the weights do not hold (rotary tables), as the main one has it
        torch.distributed.broadcast(buffer, src=0)
    student.to_empty(device=place)
    with torch.no_grad():
        for (_, mine), (_, original) in zip(student.state_dict().items(), teacher.state_dict().items()):
            _local(mine).copy_(_local(original))
        for mine, original in zip(student.buffers(), teacher.buffers()):
            mine.copy_(original)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    student.eval().requires_grad_(False)
    return teacher, tokenizer, student


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def adapters_synchronised(model: nn.Module) -> nn.Module:
    """LoRA on a sharded student: the adapters peft adds are plain tensors, the same on every
    process, that FSDP does not manage. DDP is told to leave the sharded parameters alone, so
    the Accelerator's DDP wrapper synchronises the adapters' gradients and nothing else."""
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    sharded = [name for name, param in model.named_parameters() if isinstance(param, DTensor)]
    sharded += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded)
    return model


def merge_adapters(model: nn.Module) -> None:
    """Fold LoRA adapters into a sharded student one layer at a time (each gathered alone, its
    shards written back), then take the adapters out."""
    from peft.tuners.lora import LoraLayer

    for layer in find_layers(model.get_base_model()).layers:
        with editable(layer):
            for module in layer.modules():
                if isinstance(module, LoraLayer):
                    module.merge()
    model.unload()


@contextmanager
def editable(module: nn.Module) -> Iterator[None]:
    """Within the block, `module`'s parameters are whole tensors that may be changed in place;
    on exit each process keeps its own shard of the result. Only this module is gathered. A
    module of an unsharded model is left as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    sharded = [(owner, name, param) for owner in module.modules() for name, param in owner._parameters.items()
               if isinstance(param, DTensor)]
    if not sharded:
        yield
        return
    for owner, name, param in sharded:
        owner._parameters[name] = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, param in sharded:
                whole = owner._parameters[name]
                param.copy_(distribute_tensor(whole.detach(), param.device_mesh, param.placements, src_data_rank=None))
                owner._parameters[name] = param


def distinct_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's state dict with each tensor once (a tied weight under its first name)."""
    seen, out = set(), []
    for name, tensor in model.state_dict(keep_vars=True).items():   # the parameters themselves: a tied one is one
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append((name, tensor))
    return out


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of a sharded model, gathered on the CPU (every process must ask for it)."""
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def _unit_of(name: str, layers_path: str) -> str:
    match = re.match(rf"{re.escape(layers_path)}\.(\d+)\.", name)
    return f"layer-{int(match.group(1))}" if match else "root"


def save_folder(model: nn.Module, tokenizer, out: Path) -> None:
    """Write a sharded model as a plain HF folder that from_pretrained loads: one safetensors
    file per decoder layer and one for the rest, with the index that maps them (HF's sharded
    layout). Each layer's file is written as soon as its tensors are gathered, so the main
    process holds at most the root unit and one layer whole. Every process calls it; the main
    one writes."""
    from collections import Counter

    from safetensors.torch import save_file
    from transformers import PreTrainedModel

    where = find_layers(model)
    layers_path = next(name for name, module in model.named_modules() if module is where.layers)
    tensors = distinct_tensors(model)
    unit_of = {name: _unit_of(name, layers_path) for name, _ in tensors}
    units = list(dict.fromkeys(unit_of.values()))
    file_of = {unit: f"model-{i + 1:05d}-of-{len(units):05d}.safetensors" for i, unit in enumerate(units)}
    left, held, weight_map, total = Counter(unit_of.values()), {}, {}, 0
    main = is_main_process()
    for name, tensor in tensors:
        gathered, unit = whole(tensor), unit_of[name]
        left[unit] -= 1
        if not main:
            continue
        held.setdefault(unit, {})[name] = gathered.contiguous()
        weight_map[name] = file_of[unit]
        total += gathered.numel() * gathered.element_size()
        if left[unit] == 0:
            save_file(held.pop(unit), str(out / file_of[unit]), metadata={"format": "pt"})
    if main:
        from torch.distributed.fsdp import FSDPModule

        base = next(c for c in type(model).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule))
        model.config.architectures = [base.__name__]
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
        tokenizer.save_pretrained(out)
    wait_for_everyone()


def save_shards(state: dict, folder: Path) -> None:
    """Every process writes its shard of `state` (DTensors and plain values) into `folder`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(folder))


def load_shards(state: dict, folder: Path) -> None:
    """Fill `state` (of the same structure, DTensors of the same sharding) in place from `folder`."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=str(folder))


def prepare_training(accelerator, model: nn.Module, optimizer, loader, lora: bool):
    """The healing's (model, optimizer, loader) through Accelerate: DDP for an unsharded model;
    for a sharded one, FSDP2 reduces the gradients itself (no DDP), except LoRA's adapters, which
    are plain tensors beside the sharded rest and get DDP alone."""
    if is_sharded(model) and not lora:
        optimizer, loader = accelerator.prepare(optimizer, loader)
        return model, optimizer, loader
    if is_sharded(model):
        adapters_synchronised(model)
    return accelerator.prepare(model, optimizer, loader)


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's state for a checkpoint: its own, or this process's shards of it."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer.optimizer)


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer.optimizer, state)
