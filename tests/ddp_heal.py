"""Heal a tiny model and save its weights; run as one process or under `accelerate launch`.

Used by test_distributed.py: the weights must not depend on the number of processes."""

import sys

import torch
from accelerate import PartialState

from layerprune.config import HealConfig
from layerprune.data import Corpus
from layerprune.distill import heal
from layerprune.surgery import remove_layers
from layerprune.targets import compute_targets

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import tiny_model  # noqa: E402


def main(out: str, cached: bool) -> None:
    teacher = tiny_model("llama")
    student = tiny_model("llama")
    remove_layers(student, [3])
    g = torch.Generator().manual_seed(0)
    data = Corpus(docs={}, blocks={"train": torch.randint(3, 96, (16, 24), generator=g)})
    state = PartialState()
    targets = compute_targets(teacher, data.blocks["train"], f"{out}.targets-{state.process_index}", topk=96,
                              progress=False) if cached else None
    config = HealConfig(steps=3, batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=1)
    heal(student, teacher, data, config, steps=3, cuts=[3], targets=targets, progress=False)
    if state.is_main_process:
        torch.save(student.state_dict(), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "cached")
