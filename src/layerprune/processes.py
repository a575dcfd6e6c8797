"""The processes of a run: how many, which one this is, and whether the launch gave what it says.

Under `torchrun --nproc_per_node N` or `accelerate launch --num_processes N` every process runs
the whole command; Accelerate's `PartialState` joins them into one process group. Which backend
it picks depends on one flag at its first creation: on a machine without CUDA, or with `--device
cpu`, the group must be made for the CPU (gloo), else each process silently runs alone. The
first creation is here, before anything else asks.
"""

from __future__ import annotations

import os

from .errors import LayerpruneError

LAUNCH_FIX = ("launch with `accelerate launch --num_processes N -m layerprune ...` or `torchrun --nproc_per_node N "
              "-m layerprune ...`")


def process_state(device: str = "auto"):
    """The run's PartialState, created once for `device` (later calls return the same one)."""
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes != launched:
        raise LayerpruneError(f"the launcher started {launched} processes but they did not join one process group "
                              f"(each runs alone as {state.distributed_type})",
                              LAUNCH_FIX)
    return state


def is_main_process() -> bool:
    """Every process runs the whole loop, and only this one writes."""
    return process_state().is_main_process


def wait_for_everyone() -> None:
    process_state().wait_for_everyone()


def process_count() -> int:
    return process_state().num_processes


def processes_line(fsdp: bool) -> str:
    """What the run's first log line says of its processes (nothing for one)."""
    count = process_count()
    return "" if count == 1 else f"; {count} processes" + (", models sharded (FSDP2)" if fsdp else " (data parallel)")


def averaged_over_processes(statistic):
    """A normaliser taken over the whole global batch: when N processes each hold 1/N of it, the
    teacher's power is averaged over them (it carries no gradient), so a loss divided by it, and
    the healed weights, do not depend on the number of processes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return statistic
    total = statistic.detach().clone()
    dist.all_reduce(total)   # a sum: gloo has no average
    return total / dist.get_world_size()
