"""The one preparation `prune` and `compare` share: checks, the folder claim, loading, the depth
plan, the inputs and the healing resources, in the order a user's mistakes should surface.

    check(config, final_tasks)                  # names, options, the launch: before any model loads
    with outdir.claimed(out, ...):              # the caller claims its folder (prune may resume in it)
        prepared = prepare(config, out, ...)    # load, plan the depth, check what the data and disk
                                                # must hold, build the inputs and the healing resources
        ... one PruneRun (prune), or one per variant on the same `prepared` (compare)
        prepared.resources.close()

A comparison prepares once with its deepest variant's configuration, so the stream is checked to
hold that variant's healings and every variant's guard reads the same validation blocks (the
original's moments on them made once).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import PruneConfig
from .depth import Depth, plan_depth
from .healing import (Resources, build_resources, check_mse_layers, check_teacher_text_disk, healing_text,
                      text_folder)
from .inputs import RunInputs, build_inputs, check_names
from .models import check_trainable, load_model
from .output import warn_if_no_gguf
from .processes import is_main_process
from .shard import check_launch, load_sharded_models
from .sources import probe
from .surgery import num_layers

log = logging.getLogger(__name__)


def check(config: PruneConfig, final_tasks=(), warn_ignored: bool = True) -> None:
    """What needs no model: the options, the registries' names, the dtype that must train, the
    launch; then the options given that this configuration never reads, a log line each (a
    comparison's variants each read their own: it has none to name)."""
    config.validate()
    check_names(config, config.metric, final_tasks)
    check_trainable(config.dtype, config.device, config.heal.method != "none")
    if config.fsdp:
        check_launch()
    for line in config.ignored() if warn_ignored and is_main_process() else ():
        log.warning(line)


@dataclass
class Prepared:
    """What a run (or every variant of a comparison) starts from."""

    teacher: torch.nn.Module
    tokenizer: object
    depth: Depth
    inputs: RunInputs
    resources: Resources
    student: torch.nn.Module | None = None   # --fsdp: the sharded student, made with the teacher

    def for_seed(self, config: PruneConfig, out: Path, progress: bool, **inputs) -> "Prepared":
        """The same preparation with inputs built for `config`'s seed (a comparison's later seeds:
        their sampled task items and, with --train-data teacher, the original's text on that seed);
        the target cache, the Accelerator and the guard's task stay."""
        built = build_inputs(config, self.teacher, self.tokenizer, **inputs)
        text = healing_text(config, built.corpus, self.depth.remove, self.teacher, text_folder(out, config.seed),
                            progress)
        return dataclasses.replace(self, inputs=built, resources=dataclasses.replace(self.resources, text=text))


def prepare(config: PruneConfig, out: Path, progress: bool, depth: dict | None = None,
            seeds: tuple[int, ...] | None = None, **inputs) -> Prepared:
    """Load the model, plan the depth (or keep `depth`, what a resumed run's first start chose),
    check the healing options and the disk the original's text needs (a comparison's `seeds`: one
    text each), build the inputs (`inputs`: build_inputs' options) and the healing resources
    over the folder `out`."""
    torch.manual_seed(config.seed)
    probe(config.data)
    student = None
    if config.fsdp:   # the main process reads the weights; every process keeps its shards of both models
        teacher, tokenizer, student = load_sharded_models(config.model, config.dtype, config.device,
                                                          config.heal.mixed_precision)
    else:
        teacher, tokenizer = load_model(config.model, config.dtype, config.device)
    if is_main_process():
        warn_if_no_gguf(config, teacher.config)
    planned = Depth(**depth) if depth else plan_depth(config, teacher)
    check_mse_layers(config.heal, num_layers(teacher))
    check_teacher_text_disk(config, planned.remove, out, copies=len(seeds or (config.seed,)))
    built = build_inputs(config, teacher, tokenizer, **inputs)
    text_in = text_folder(out, config.seed if seeds else None)
    resources = build_resources(config, built.corpus, planned.remove, teacher, text_in, out, progress)
    return Prepared(teacher, tokenizer, planned, built, resources, student)
