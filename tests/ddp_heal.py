"""Heal a tiny model and save its weights; run as one process or under a two-process launcher.

Used by test_distributed.py: the weights must not depend on the number of processes."""

import sys

import torch
from accelerate import PartialState

from layerprune.config import HealConfig
from layerprune.healing.loop import heal
from layerprune.healing.job import plan
from layerprune.surgery import remove_layers
from layerprune.healing.targets import TeacherTargets

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import tiny_model  # noqa: E402


def main(out: str, modes: str) -> None:
    """modes, comma-separated, each healed from the same start and saved as `out.MODE.pt`: straight
    (teacher and student every step), cached (teacher targets cached) or local (two local steps,
    then global ones: the trained layer above the mapped state is unused first). One launch heals
    them all: each launch's start (the processes, their imports) costs more than a tiny healing."""
    state = PartialState(cpu=True)
    for mode in modes.split(","):
        heal_one(f"{out}.{mode}", mode, state)


def heal_one(out: str, mode: str, state: PartialState) -> None:
    cached = mode == "cached"
    teacher = tiny_model("llama")
    student = tiny_model("llama")
    remove_layers(student, [3])
    blocks = torch.randint(3, 96, (16, 24), generator=torch.Generator().manual_seed(0))
    targets = TeacherTargets.open(f"{out}.targets-{state.process_index}", teacher, blocks, topk=96,
                                  progress=False) if cached else None
    config = HealConfig(steps=3, batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=1,
                        local_steps=2 if mode == "local" else 0)
    heal(student, teacher, blocks, plan(student, config, 3, iteration=1, seed=0, dropped=[3]), targets,
         progress=False)
    if state.is_main_process:
        torch.save(student.state_dict(), f"{out}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
