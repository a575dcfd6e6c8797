"""prune(): config -> inputs -> loop [score -> cut -> heal -> evaluate -> checkpoint] -> save.

`build_inputs` makes what every iteration measures against, once, frozen
(`RunInputs`). The loop's state is explicit (`Loop`: the student, its
records, the teacher-target cache, where checkpoints go). `run_removals` is
the public seam: "run these removals with this config from these inputs";
`prune` and `compare` both call it. Which text each healing reads, and the
healing guard's validation text, is heal_text.py's; writing the finished
folder is saving.py's. Input errors surface before the output folder is
touched, and the folder gets `history.json` only at the very end, so a
folder that looks finished is finished.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint, outdir
from .checkpoint import Evaluation, History, IterationRecord, PendingIteration, ResumePoint
from .config import PruneConfig, Recipe
from .data import Corpus, StreamPosition, load_corpus
from .sources import probe
from .errors import LayerpruneError, NonFiniteError
from .guard import Guard, GuardLog
from .heal import HealLog, check_mse_layers, heal, plan
from .heal_text import carried_lr, last_position, validation_blocks
from .importance import REMOVAL_METRICS, ScoringContext, Selection, check_metric, select_layers
from .gguf_export import open_source, source_of
from .models import check_context, check_trainable, load_model, model_name
from .options import to_dict
from .patch import candidate_patches, cut, effective_kind
from .report import write_loss_log
from .saving import save_result
from .speed import compare_speed
from .surgery import check_cut_supported, num_layers, original_indices
from .targets import TeacherTargets, check_budgets, plan_caches
from .tasks import Task, TaskData, blocks_to_batches, build_tasks, check_task_name, evaluate_tasks, quality_retained

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInputs:
    """Built once per run and never changed: the teacher, the data, the tasks, the teacher's scores."""

    teacher: torch.nn.Module
    tokenizer: object
    corpus: Corpus
    calib_batches: list
    importance_tasks: list[Task]
    eval_tasks: list[Task]
    final_tasks: list[Task]
    teacher_scores: dict   # on the importance tasks (calibration text), for the quality metric
    teacher_eval: dict     # on the evaluation tasks (held-out text)


@dataclass
class Loop:
    """What the loop carries from one iteration to the next. `out`: where checkpoints and loss
    logs go (None: nothing is written, as in a comparison); `resume`: where a resumed run
    continues."""

    student: torch.nn.Module
    records: list[IterationRecord] = field(default_factory=list)
    targets: TeacherTargets | None = None
    out: Path | None = None
    resume: ResumePoint = field(default_factory=ResumePoint)
    position: StreamPosition = StreamPosition()   # where the next healing's fresh text starts
    validation: torch.Tensor | None = None   # the healing guard's blocks (None: healing unguarded)
    lr: float | None = None   # the next healing's starting lr: the last guarded one's winner (None: --heal-lr)
    after_each: Callable[[IterationRecord, torch.nn.Module], None] | None = None  # e.g. compare's second domain

    def resumed(self, iteration: int) -> tuple[PendingIteration | None, dict | None]:
        pending = self.resume.pending
        if pending is not None and pending.iteration == iteration:
            return pending, self.resume.heal_state
        return None, None


def check_names(config: Recipe, metric: str | None) -> None:
    """Registry names, checked before any model is loaded."""
    if metric is not None:
        check_metric(metric)
    for name in config.tasks:
        check_task_name(name, for_importance=True)
    for name in (*config.eval_tasks, *getattr(config, "final_tasks", ())):
        check_task_name(name)


def build_inputs(config: Recipe, teacher, tokenizer, final_tasks=(), teacher_scores: bool = True) -> RunInputs:
    """Everything the loop measures against, from the loaded teacher. Whatever the model or the
    data cannot do (an architecture no cut or patch suits, blocks longer than its context, a task
    the text cannot feed) fails here, before any heavy work."""
    check_cut_supported(teacher)
    effective_kind(teacher, config.patch)
    check_context(teacher, config.data.seq_len)
    check_budgets(config.heal, teacher, config.data.seq_len)
    # compare's replaceme fits its published patch whatever --patch says
    patching = config.patch != "none" or "replaceme" in getattr(config, "methods", ())
    corpus = load_corpus(config.data, tokenizer, patch_pool=patching)
    bs = config.data.batch_size
    importance = build_tasks(config.tasks, TaskData(tokenizer, corpus.blocks["calib"], corpus.docs["calib"], bs,
                                                    config.seed))
    eval_data = TaskData(tokenizer, corpus.blocks["eval"], corpus.docs["eval"], bs, config.seed)
    eval_tasks = build_tasks(config.eval_tasks, eval_data)
    # Built now so that a task the data cannot feed fails before any work, not at the end.
    suite = build_tasks(dict.fromkeys((*config.eval_tasks, *final_tasks)), eval_data)
    return RunInputs(teacher, tokenizer, corpus, blocks_to_batches(corpus.blocks["calib"], bs), importance,
                     eval_tasks, suite, evaluate_tasks(teacher, importance, teacher) if teacher_scores else {},
                     evaluate_tasks(teacher, eval_tasks, teacher))


def evaluate_student(inputs: RunInputs, student) -> Evaluation:
    scores = evaluate_tasks(student, inputs.eval_tasks, inputs.teacher)
    return Evaluation(scores, quality_retained(scores, inputs.teacher_eval), [t.name for t in inputs.eval_tasks])


def _kl_and_ppl(evaluation: Evaluation) -> dict:
    tasks = evaluation.tasks
    picked = {"kl": tasks.get("kl", {}).get("kl"), "perplexity": tasks.get("perplexity", {}).get("perplexity")}
    return {key: value for key, value in picked.items() if value is not None}


def _patch_teacher(inputs: RunInputs, config: PruneConfig):
    """The model whose states a patch reproduces when not the current student's own (--patch-target)."""
    return inputs.teacher if config.patch_target == "teacher" else None


def _select(inputs: RunInputs, config: PruneConfig, student, count: int, iteration: int, progress: bool):
    """Score the removable layers and choose; with a patch, the removal metrics score patched
    candidates, their patches fitted on training blocks. Returns the selection and those patches
    (None when candidates were not patched), which the cut then reuses."""
    ctx = ScoringContext(inputs.calib_batches, inputs.importance_tasks, inputs.teacher, inputs.teacher_scores,
                         config.removable(num_layers(student)), progress=progress)
    if config.patch != "none" and config.metric in REMOVAL_METRICS and config.mode != "block":
        ctx.patches = candidate_patches(student, ctx.candidates, inputs.corpus.patch_blocks, config.patch,
                                        config.data.batch_size, progress, _patch_teacher(inputs, config))
    try:
        return select_layers(student, config.metric, config.mode, count, ctx, config.shortlist), ctx.patches
    except NonFiniteError as err:
        raise NonFiniteError(f"iteration {iteration}: {err.problem}; the last checkpoint holds the state before it",
                             err.fix) from err


def _heal(inputs: RunInputs, config: PruneConfig, loop: Loop, pending: PendingIteration, final: bool,
          progress: bool) -> HealLog | None:
    """Heal after the removal `pending` describes (already made); checkpoints carry `pending`.
    The text is the next stretch of the training stream, or its first blocks again with
    --train-data reuse; caches are used only where that text is read again (targets.plan_caches)."""
    heal_config, seq_len = config.heal, config.data.seq_len
    steps = heal_config.final_steps if final else heal_config.steps_per_removal(seq_len)
    if heal_config.method == "none" or steps == 0:
        return None
    count = heal_config.final_blocks() if final else heal_config.blocks_per_removal(seq_len)
    reuse = heal_config.train_data == "reuse"
    stream = inputs.corpus.train
    start = StreamPosition() if reuse else loop.position
    end = stream.advance(start, count)
    text = stream.span(start, count)
    caches, targets, owned = _caches(inputs, config, loop, text, pending.iteration, progress)
    job = plan(loop.student, heal_config, steps, pending.iteration, config.seed + pending.iteration,
               pending.selection.drop)
    job = dataclasses.replace(job, prefix_cache=caches.prefix, lr=loop.lr)
    guard = None if loop.validation is None else \
        Guard(inputs.teacher, loop.validation, config.data.batch_size, heal_config.guard_retries)
    log.info("healing iteration %d: %d steps on %d blocks (%s text from document %d); %s", pending.iteration, steps,
             count, "the same" if reuse else "fresh", start.doc, caches.why)
    _, state = loop.resumed(pending.iteration)
    if state is None:
        pending.held_out_before = _kl_and_ppl(evaluate_student(inputs, loop.student))
    save = None
    if loop.out is not None:
        as_dict = to_dict(config)
        save = lambda heal_state: checkpoint.save_heal_checkpoint(loop.out, as_dict, pending, heal_state)  # noqa: E731
    try:
        result = heal(loop.student, inputs.teacher, text, dataclasses.replace(job, resume=state, on_checkpoint=save),
                      targets, progress, guard)
    finally:
        if owned:
            targets.close()
    result.held_out_before = pending.held_out_before
    result.text = {"start": start.to_json(), "end": end.to_json(), "blocks": count, "epochs": heal_config.epochs,
                   "caches": caches.why}
    if not reuse:
        loop.position = end
    if result.guard is not None:
        guarded = GuardLog(**result.guard)
        loop.lr = guarded.next_lr()
        (log.warning if guarded.outcome == "unhealed" else log.info)("healing iteration %d: %s", pending.iteration,
                                                                      guarded.sentence())
    if loop.out is not None and _is_main_process():
        write_loss_log(loop.out / "logs" / "heal.csv", result.rows)
    return result


def _caches(inputs: RunInputs, config: PruneConfig, loop: Loop, text, iteration: int, progress: bool):
    """What this healing caches (targets.plan_caches), with the teacher targets it reads, if any,
    and whether they are this healing's own (to close after it). Reused text shares one cache
    across the run (`loop.targets`); text read again only within this healing gets its own."""
    heal_config, reuse = config.heal, config.heal.train_data == "reuse"
    folder = teacher_cache_dir(loop.out) if loop.out is not None else None
    caches = plan_caches(heal_config, inputs.teacher, config.data.seq_len, text.count,
                         folder or Path(tempfile.gettempdir()), reused=reuse)
    if not caches.targets:
        return caches, None, False

    def open_at(path):
        return TeacherTargets.open(path, inputs.teacher, text, heal_config.teacher_topk, config.data.batch_size,
                                   progress)

    if not reuse:
        return caches, open_at((folder or Path(tempfile.mkdtemp(prefix="layerprune-"))) / f"iteration-{iteration}"), \
            True
    if loop.targets is None:
        loop.targets = open_at(folder or Path(tempfile.mkdtemp(prefix="layerprune-")))
    if loop.targets.blocks.count != text.count:   # e.g. a final healing of another length
        return dataclasses.replace(caches, targets=False,
                                   targets_why="teacher online: the run's target cache holds other blocks"), None, False
    return caches, loop.targets, False


def _is_main_process() -> bool:
    """Under `accelerate launch` every process runs the whole loop, and only this one writes."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def teacher_cache_dir(out: Path | None) -> Path:
    from accelerate import PartialState

    if out is None:
        raise ValueError("a run without an output folder needs its teacher targets opened by the caller")
    return Path(out) / "cache" / f"teacher-{PartialState().process_index}"


def _iteration(inputs: RunInputs, config: PruneConfig, loop: Loop, pending: PendingIteration,
               progress: bool, fitted: dict | None = None) -> IterationRecord:
    """Cut (reusing the candidates' `fitted` patches), heal, evaluate: one record."""
    originals = original_indices(loop.student)
    removed, patched = cut(loop.student, pending.selection.drop, inputs.corpus.patch_blocks, config.patch,
                           config.data.batch_size, progress, _patch_teacher(inputs, config), fitted)
    t0 = time.perf_counter()
    heal_log = _heal(inputs, config, loop, pending, final=False, progress=progress)
    heal_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluation = evaluate_student(inputs, loop.student)
    if heal_log is not None:
        heal_log.held_out_after = _kl_and_ppl(evaluation)
    selection = pending.selection
    return IterationRecord(
        pending.iteration, {str(originals[i]): (None if s != s else s) for i, s in enumerate(selection.scores)},
        selection.drop, removed, num_layers(loop.student), evaluation, heal_log,
        {"score_s": pending.score_s, "heal_s": heal_s, "eval_s": time.perf_counter() - t0},
        selection.shortlist, selection.block_start, patched)


def run_removals(inputs: RunInputs, config: PruneConfig, count: int, loop: Loop, progress: bool = True
                 ) -> list[IterationRecord]:
    """Remove `count` layers from `loop.student` as `config` says, from `inputs`; returns the
    records (resumed ones included). Iterative mode makes one record per layer, the others one."""
    last = count if config.mode == "iterative" else 1
    for iteration in range(len(loop.records) + 1, last + 1):
        pending, _ = loop.resumed(iteration)
        fitted = None  # a resumed iteration refits its patch: the same blocks give the same T
        if pending is not None:
            log.info("iteration %d: resuming its healing at step %d", iteration, pending.step)
        else:
            t0 = time.perf_counter()
            selection, fitted = _select(inputs, config, loop.student, count, iteration, progress)
            pending = PendingIteration(iteration, selection, time.perf_counter() - t0)
        record = _iteration(inputs, config, loop, pending, progress, fitted)
        loop.records.append(record)
        _log_iteration(inputs, record, last)
        if loop.after_each is not None:
            loop.after_each(record, loop.student)
        if loop.out is not None:
            if _is_main_process():
                checkpoint.save_checkpoint(loop.out, to_dict(config), loop.records, loop.student)
            _wait_for_everyone()
    return loop.records


def _log_iteration(inputs: RunInputs, record: IterationRecord, total: int) -> None:
    ppl = record.eval.tasks.get("perplexity", {}).get("perplexity")
    teacher_ppl = inputs.teacher_eval.get("perplexity", {}).get("perplexity")
    ppl_text = f" | held-out ppl {ppl:.2f} (teacher {teacher_ppl:.2f})" if ppl is not None else ""
    log.info("iteration %d/%d: removed layer %s (original %s) -> %d layers | quality retained %.3f%s | %.1fs",
             record.iteration, total, record.removed_current, record.removed_original, record.layers_after,
             record.eval.quality_retained, ppl_text, sum(record.timings.values()))


def final_evaluation(inputs: RunInputs, student) -> tuple[Evaluation, Evaluation, dict]:
    """The final model on the evaluation tasks and on the whole final suite, and the teacher's
    suite scores (its per-iteration scores are reused: the teacher never changes)."""
    started = time.perf_counter()
    unseen = [task for task in inputs.final_tasks if task.name not in inputs.teacher_eval]
    if unseen:
        log.info("final evaluation of the original: %s on held-out text", ", ".join(task.name for task in unseen))
    teacher = {**inputs.teacher_eval, **evaluate_tasks(inputs.teacher, unseen, inputs.teacher)}
    teacher = {task.name: teacher[task.name] for task in inputs.final_tasks}
    log.info("final evaluation of the pruned model: %s on held-out text",
             ", ".join(task.name for task in inputs.final_tasks))
    suite = evaluate_tasks(student, inputs.final_tasks, inputs.teacher)
    names = [task.name for task in inputs.eval_tasks]
    scores = {name: suite[name] for name in names}
    log.info("final evaluation done in %.0fs", time.perf_counter() - started)
    return (Evaluation(scores, quality_retained(scores, teacher), names),
            Evaluation(suite, quality_retained(suite, teacher), list(suite)), teacher)


def prune(config: PruneConfig, progress: bool = True, resume: bool = False, overwrite: bool = False) -> History:
    """Run a whole pruning job and write the output folder. An unfinished run of the same
    configuration in `config.out` is continued from its last checkpoint. The folder is claimed
    first (outdir.claim: ours, locked for this run alone); a run that fails before writing
    anything leaves it as it found it."""
    config.validate()
    check_names(config, config.metric)
    check_trainable(config.dtype, config.device, config.heal.method != "none")
    out = Path(config.out)
    with outdir.claimed(out, config.model, overwrite, main=_is_main_process()):
        return _prune(config, out, progress, resume)


def _prune(config: PruneConfig, out: Path, progress: bool, resume: bool) -> History:
    _wait_for_everyone()
    point = checkpoint.resume_point(to_dict(config), out, resume)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    probe(config.data)
    _check_gguf_export(config)
    teacher, tokenizer = load_model(config.model, config.dtype, config.device)
    depth = num_layers(teacher)
    count = config.layers_to_remove(depth)  # depth checks before any heavy work
    check_mse_layers(config.heal, depth)
    inputs = build_inputs(config, teacher, tokenizer, config.final_tasks, config.metric == "quality")
    validation = validation_blocks(config, inputs.corpus, count, progress)
    loop = Loop(copy.deepcopy(teacher), list(point.records), out=out, resume=point,
                position=last_position(point.records), validation=validation, lr=carried_lr(point.records))
    if point.folder is not None:
        checkpoint.restore_student(loop.student, point.folder, point.records)
    log.info("%s: %d layers, removing %d by %s (%s), healing: %s", model_name(config.model),
             depth, count, config.metric, config.mode, config.heal.method)
    records = run_removals(inputs, config, count, loop, progress)
    final_heal = None
    if config.heal.final_steps:
        final, _ = loop.resumed(count + 1)
        final = final or PendingIteration(count + 1, Selection([], []))
        final_heal = _heal(inputs, config, loop, final, final=True, progress=progress)
    final_eval, suite, teacher_suite = final_evaluation(inputs, loop.student)
    speed = compare_speed(teacher, loop.student, progress=progress) if config.measure_speed else {}
    history = History(to_dict(config), model_name(config.model), depth,
                      num_layers(loop.student), [layer for r in records for layer in r.removed_original],
                      original_indices(loop.student), teacher_suite, records, final_heal, final_eval, suite,
                      time.perf_counter() - started)
    gguf_problem = save_result(out, loop.student, tokenizer, history, speed, config) if _is_main_process() else None
    if loop.targets is not None:
        loop.targets.close()
    _wait_for_everyone()
    if _is_main_process():
        shutil.rmtree(out / "cache", ignore_errors=True)  # a cache an interrupted process left, never reopened
        checkpoint.clear(out)
    log.info("saved %d-layer model to %s (removed original layers %s) in %.0fs", history.final_layers, out,
             history.removed_original, history.seconds)
    if gguf_problem is not None:
        raise gguf_problem
    return history


def _check_gguf_export(config: PruneConfig) -> None:
    """Say at the start, not after hours, that model.gguf will not be written (the run goes on:
    its HF folder is still a result; the error comes again at the end)."""
    source = source_of(config.model) if config.gguf else None
    if source is not None and _is_main_process():
        try:
            open_source(source)
        except LayerpruneError as err:
            log.warning("model.gguf will not be written: %s", err)
