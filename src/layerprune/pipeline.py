"""prune(): config -> inputs -> PruneRun -> output folder, top to bottom.

The order is the contract with the user: every input error (names, options, data, model, the
folder) surfaces before heavy work; the output folder is claimed first (outdir.claim) and gets
`history.json` only at the very end, so a folder that looks finished is finished. What the
loop does is run.py's (`PruneRun`), what it measures against inputs.py's (`RunInputs`), and
writing the result output.py's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from . import checkpoint, outdir
from .checkpoint import History
from .config import PruneConfig
from .depth import Depth, plan_depth
from .heal_job import check_mse_layers
from .heal_text import check_teacher_text_disk
from .inputs import build_inputs, check_names
from .models import check_trainable, load_model, model_name, transformers_bars
from .options import to_dict
from .output import clear_run_files, save_result, warn_if_no_gguf
from .processes import is_main_process, processes_line, wait_for_everyone
from .run import PruneRun
from .shard import check_launch, load_sharded_models
from .sources import probe
from .surgery import num_layers

log = logging.getLogger(__name__)


def prune(config: PruneConfig, progress: bool = True, resume: bool = False, overwrite: bool = False) -> History:
    """Run a whole pruning job and write the output folder. An unfinished run of the same
    configuration in `config.out` is continued from its last checkpoint. The folder is claimed
    first (outdir.claim: ours, locked for this run alone); a run that fails before writing
    anything leaves it as it found it."""
    config.validate()
    check_names(config, config.metric, config.final_tasks)
    check_trainable(config.dtype, config.device, config.heal.method != "none")
    if config.fsdp:
        check_launch()
    for line in config.ignored() if is_main_process() else ():
        log.warning(line)
    out = Path(config.out)
    with outdir.claimed(out, config.model, overwrite, main=is_main_process()), transformers_bars(progress):
        return _prune(config, out, progress, resume)


def _prune(config: PruneConfig, out: Path, progress: bool, resume: bool) -> History:
    wait_for_everyone()
    point = checkpoint.resume_point(to_dict(config), out, resume)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    probe(config.data)
    if config.fsdp:   # the main process reads the weights; every process keeps its shards of both models
        teacher, tokenizer, student = load_sharded_models(config.model, config.dtype, config.device,
                                                          config.heal.mixed_precision)
    else:
        (teacher, tokenizer), student = load_model(config.model, config.dtype, config.device), None
    if is_main_process():
        warn_if_no_gguf(config, teacher.config)
    # The depth first (a resumed run keeps what its first start chose), then the rest of the inputs.
    depth = Depth(**point.depth) if point.depth else plan_depth(config, teacher)
    check_mse_layers(config.heal, num_layers(teacher))
    check_teacher_text_disk(config, depth.remove, out)
    inputs = build_inputs(config, teacher, tokenizer, config.final_tasks, config.metric == "quality")
    run = PruneRun(config, inputs, depth, out=out, resume=point, progress=progress, student=student).setup()
    log.info("%s: %d layers, removing %d (%s) by %s (%s), healing: %s%s", model_name(config.model),
             num_layers(teacher), depth.remove, depth.why, config.metric, config.mode, config.heal.method,
             processes_line(config.fsdp))
    for iteration in run.remaining():
        run.step(iteration)
    history = run.finish(started)
    gguf_problem = save_result(out, run.student, tokenizer, history, run.speed, config) \
        if is_main_process() or config.fsdp else None   # sharded: every process gathers what is written
    run.close()
    wait_for_everyone()
    if is_main_process():
        clear_run_files(out)
    log.info("saved %d-layer model to %s (removed original layers %s) in %.0fs", history.final_layers, out,
             history.removed_original, history.seconds)
    if gguf_problem is not None:
        raise gguf_problem
    return history
