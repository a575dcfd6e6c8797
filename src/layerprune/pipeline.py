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

from . import checkpoint, outdir
from .checkpoint import History
from .config import PruneConfig
from .models import model_name, transformers_bars
from .options import to_dict
from .output import clear_run_files, save_result
from .prepare import check, prepare
from .processes import is_main_process, processes_line, wait_for_everyone
from .run import PruneRun
from .surgery import num_layers

log = logging.getLogger(__name__)


def prune(config: PruneConfig, progress: bool = True, resume: bool = False, overwrite: bool = False) -> History:
    """Run a whole pruning job and write the output folder. An unfinished run of the same
    configuration in `config.out` is continued from its last checkpoint. The folder is claimed
    first (outdir.claim: ours, locked for this run alone); a run that fails before writing
    anything leaves it as it found it."""
    check(config, config.final_tasks)
    out = Path(config.out)
    with outdir.claimed(out, config.model, overwrite, main=is_main_process()), transformers_bars(progress):
        return _prune(config, out, progress, resume)


def _prune(config: PruneConfig, out: Path, progress: bool, resume: bool) -> History:
    wait_for_everyone()
    point = checkpoint.resume_point(to_dict(config), out, resume)
    started = time.perf_counter()
    # The depth first (a resumed run keeps what its first start chose), then the rest of the inputs.
    prepared = prepare(config, out, progress, depth=point.depth, final_tasks=config.final_tasks,
                       teacher_scores=config.metric == "quality")
    teacher, depth = prepared.teacher, prepared.depth
    run = PruneRun(config, prepared.inputs, depth, prepared.resources, out=out, resume=point, progress=progress,
                   student=prepared.student).setup()
    log.info("%s: %d layers, removing %d (%s) by %s (%s), healing: %s%s", model_name(config.model),
             num_layers(teacher), depth.remove, depth.why, config.metric, config.mode, config.heal.method,
             processes_line(config.fsdp))
    for iteration in run.remaining():
        run.step(iteration)
    history = run.finish(started)
    gguf_problem = save_result(out, run.student, prepared.tokenizer, history, config) \
        if is_main_process() or config.fsdp else None   # sharded: every process gathers what is written
    prepared.resources.close()   # the teacher-target cache (a failed run keeps it for its resume)
    wait_for_everyone()
    if is_main_process():
        clear_run_files(out)
    log.info("saved %d-layer model to %s (removed original layers %s) in %.0fs", history.final_layers, out,
             history.removed_original, history.seconds)
    if gguf_problem is not None:
        raise gguf_problem
    return history
