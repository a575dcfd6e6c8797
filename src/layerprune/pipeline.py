"""The iterative loop: score every layer, remove the least important, heal, evaluate, record.

`prune(config)` is the one entry point; the CLI calls it too. Errors in the
input surface before the output folder is touched, and the folder only gets
its model files and a `history.json` with status "complete" at the very end,
so a folder that looks finished is finished.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .checkpoint import write_json
from .config import PruneConfig
from .data import Corpus, load_corpus
from .errors import LayerpruneError
from .faults import crash_point
from .importance import REMOVAL_METRICS, NonFiniteError, ScoringContext, score_bi, score_layers, state_distances
from .importance import angular_distance, block_influence
from .models import load_model, save_model
from .speed import measure_speed
from .surgery import num_layers, original_indices, remove_layers
from .tasks import TaskData, blocks_to_batches, build_tasks, evaluate_tasks, quality_retained

log = logging.getLogger(__name__)

HISTORY = "history.json"


@dataclass
class Session:
    """Everything one run works on, built once."""

    config: PruneConfig
    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    corpus: Corpus
    importance_tasks: list
    eval_tasks: list
    teacher_task_scores: dict
    teacher_eval: dict
    final_tasks: list
    targets: object = None   # TeacherTargets, computed on the first healing


def build_session(config: PruneConfig) -> Session:
    config.validate()
    torch.manual_seed(config.seed)
    teacher, tokenizer = load_model(config.model, config.dtype, config.device)
    config.layers_to_remove(num_layers(teacher))  # depth checks before any heavy work
    corpus = load_corpus(config.data, tokenizer)
    bs = config.data.batch_size
    importance_tasks = build_tasks(config.tasks, TaskData(tokenizer, corpus.blocks["calib"], corpus.docs["calib"],
                                                          bs, config.seed))
    eval_data = TaskData(tokenizer, corpus.blocks["eval"], corpus.docs["eval"], bs, config.seed)
    eval_tasks = build_tasks(config.eval_tasks, eval_data)
    # Built now so that a task the data cannot feed fails before any work, not at the end.
    final_tasks = build_tasks(dict.fromkeys((*config.eval_tasks, *config.final_tasks)), eval_data)
    teacher_task_scores = evaluate_tasks(teacher, importance_tasks, teacher) if config.metric == "quality" else {}
    teacher_eval = evaluate_tasks(teacher, eval_tasks, teacher)
    student = copy.deepcopy(teacher)
    return Session(config, teacher, student, tokenizer, corpus, importance_tasks, eval_tasks,
                   teacher_task_scores, teacher_eval, final_tasks)


def removable(config: PruneConfig, depth: int) -> list[int]:
    """Current indices that may be removed: all but the protected first and last layers."""
    return list(range(config.protect_first, depth - config.protect_last))


def score_current(s: Session, candidates: list[int], progress: bool = True) -> tuple[list[float], dict]:
    """Importance of every current layer; with a shortlist, the removal metrics see only the
    layers that Block Influence ranks least important."""
    extra = {}
    ctx = ScoringContext(blocks_to_batches(s.corpus.blocks["calib"], s.config.data.batch_size),
                         s.importance_tasks, s.teacher, s.teacher_task_scores, candidates, progress=progress)
    if s.config.shortlist and s.config.metric in REMOVAL_METRICS and len(candidates) > s.config.shortlist:
        bi = score_bi(s.student, ctx)
        ctx.candidates = sorted(sorted(candidates, key=lambda i: bi[i])[: s.config.shortlist])
        extra["shortlist"] = ctx.candidates
    return score_layers(s.student, s.config.metric, ctx), extra


def _heal(s: Session, iteration: int, steps: int, dropped: list[int], progress: bool, pending: dict) -> dict:
    """Heal after a removal. `pending` describes the iteration in flight (its scoring result); it
    goes into every healing checkpoint, and with a "heal" state it is a healing to resume."""
    if s.config.heal.method == "none" or steps == 0:
        return {}
    from .distill import cut_positions, heal, mse_pairs
    from .targets import compute_targets

    out = Path(s.config.out)
    cuts = cut_positions(dropped)
    if s.config.heal.teacher_cache and s.targets is None:
        s.targets = compute_targets(s.teacher, s.corpus.blocks["train"], teacher_cache_dir(out),
                                    s.config.heal.teacher_topk, s.config.data.batch_size, progress,
                                    layers=[o for _, o in mse_pairs(s.student, cuts, s.config.heal)])
    resume = pending.pop("heal", None)
    if resume is None:
        pending["held_out_before"] = _kl_and_ppl(_evaluate(s))
    config = _json_form(s.config)
    log = heal(s.student, s.teacher, s.corpus, s.config.heal, steps=steps, seed=s.config.seed + iteration,
               cuts=cuts, log_dir=out / "logs", iteration=iteration, targets=s.targets, progress=progress,
               resume=resume, on_checkpoint=lambda state: checkpoint.save_heal_checkpoint(out, config, pending, state))
    return {**log, "held_out_before": pending["held_out_before"]}


def _kl_and_ppl(evaluation: dict) -> dict:
    tasks = evaluation["tasks"]
    picked = {"kl": tasks.get("kl", {}).get("kl"), "perplexity": tasks.get("perplexity", {}).get("perplexity")}
    return {key: value for key, value in picked.items() if value is not None}


def teacher_cache_dir(out: Path) -> Path:
    from accelerate import PartialState

    return out / "cache" / f"teacher-{PartialState().process_index}"


def _evaluate(s: Session) -> dict:
    scores = evaluate_tasks(s.student, s.eval_tasks, s.teacher)
    return {"tasks": scores, "quality_retained": quality_retained(scores, s.teacher_eval)}


def _record(s: Session, iteration: int, scores: list[float], drop: list[int], timings: dict, extra: dict,
            progress: bool, resume: dict | None = None) -> dict:
    """Remove, heal, evaluate: one history entry. `resume`: a healing checkpoint of this iteration."""
    originals = original_indices(s.student)
    removed = remove_layers(s.student, drop)
    pending = {"iteration": iteration, "scores": scores, "drop": drop, "timings": dict(timings), "extra": extra,
               **(resume or {})}
    t0 = time.perf_counter()
    heal_log = _heal(s, iteration, s.config.heal.steps, drop, progress, pending)
    timings["heal_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluation = _evaluate(s)
    timings["eval_s"] = time.perf_counter() - t0
    if heal_log:
        heal_log["held_out_after"] = _kl_and_ppl(evaluation)
    return {
        "iteration": iteration,
        "scores": {str(originals[i]): (None if score != score else score) for i, score in enumerate(scores)},
        "removed_current": drop,
        "removed_original": removed,
        "layers_after": num_layers(s.student),
        "eval": evaluation,
        "heal": heal_log,
        "timings": timings,
        **extra,
    }


def _log_iteration(s: Session, entry: dict, total: int) -> None:
    ev = entry["eval"]["tasks"]
    ppl = ev.get("perplexity", {}).get("perplexity")
    teacher_ppl = s.teacher_eval.get("perplexity", {}).get("perplexity")
    ppl_text = f" | held-out ppl {ppl:.2f} (teacher {teacher_ppl:.2f})" if ppl is not None else ""
    log.info("iteration %d/%d: removed layer %s (original %s) -> %d layers | quality retained %.3f%s | %.1fs",
             entry["iteration"], total, entry["removed_current"], entry["removed_original"], entry["layers_after"],
             entry["eval"]["quality_retained"], ppl_text, sum(entry["timings"].values()))


def choose_iterative(s: Session, iteration: int, progress: bool) -> tuple[list[float], list[int], dict]:
    """Score the current student's removable layers; the least important one goes."""
    candidates = removable(s.config, num_layers(s.student))
    try:
        scores, extra = score_current(s, candidates, progress)
    except NonFiniteError as err:
        raise NonFiniteError(f"iteration {iteration}: {err.problem}; the last checkpoint holds the state before it",
                             err.fix) from err
    return scores, [min((i for i in candidates if scores[i] == scores[i]), key=lambda i: scores[i])], extra


def choose_all_at_once(s: Session, count: int, progress: bool) -> tuple[list[float], list[int], dict]:
    """One-shot: the `count` least important layers of one scoring. Block: the contiguous run of
    `count` layers whose input and output states are closest."""
    config = s.config
    depth = num_layers(s.student)
    candidates = removable(config, depth)
    if config.mode == "one-shot":
        scores, extra = score_current(s, candidates, progress)
        drop = sorted(sorted((i for i in candidates if scores[i] == scores[i]), key=lambda i: scores[i])[:count])
        return scores, drop, extra
    distance = block_influence if config.metric == "bi" else (
        lambda a, b, m: angular_distance(a, b, m, last_only=config.metric == "angular_last"))
    batches = blocks_to_batches(s.corpus.blocks["calib"], config.data.batch_size)
    starts_scores = state_distances(s.student, batches, distance, span=count)
    starts = [l for l in range(len(starts_scores)) if set(range(l, l + count)) <= set(candidates)]
    start = min(starts, key=lambda l: starts_scores[l])
    scores = [float("nan")] * depth
    for l in starts:
        scores[l] = starts_scores[l]
    return scores, list(range(start, start + count)), {"block_start": start}


def run_iterations(s: Session, count: int, progress: bool = True, done: list[dict] | None = None,
                   on_entry=None, pending: dict | None = None) -> list[dict]:
    """The removal loop for the configured mode; returns one history entry per removal step.
    `done` holds the entries of a resumed run and `pending` its healing checkpoint, if it stopped
    while healing (its scoring is then kept, not redone); `on_entry(entries)` runs after each."""
    entries = list(done or [])
    last = count if s.config.mode == "iterative" else 1
    for iteration in range(len(entries) + 1, last + 1):
        resume = pending if pending is not None and pending["iteration"] == iteration else None
        if resume is not None:
            log.info("iteration %d: resuming its healing at step %d", iteration, resume["step"])
            scores, drop, extra, timings = resume["scores"], resume["drop"], resume["extra"], resume["timings"]
        else:
            t0 = time.perf_counter()
            scores, drop, extra = (choose_iterative(s, iteration, progress) if s.config.mode == "iterative"
                                   else choose_all_at_once(s, count, progress))
            timings = {"score_s": time.perf_counter() - t0}
        entry = _record(s, iteration, scores, drop, timings, extra, progress, resume)
        entries.append(entry)
        _log_iteration(s, entry, last)
        if on_entry is not None:
            on_entry(entries)
    return entries


def check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LayerpruneError(f"--out {out} is a file", "give a folder path")
    if (out / HISTORY).exists():  # written last: it alone marks a finished run
        raise LayerpruneError(f"{out} already holds a finished run", "choose another --out, or pass --overwrite")


def save_result(s: Session, out: Path, history: dict, speed: dict) -> None:
    """Model files and reports first (via a staging folder), history last: its presence means complete."""
    from .report import write_report

    stage = out / ".staging"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        save_model(s.student, s.tokenizer, stage)
        write_report(stage, history, speed, write_json)
    except OSError as err:
        shutil.rmtree(stage, ignore_errors=True)
        raise LayerpruneError(f"cannot write the result into {out} ({err.strerror or err})",
                              "free disk space or choose another --out, then rerun the same command: "
                              "it resumes from the last checkpoint") from err
    for item in stage.iterdir():
        os.replace(item, out / item.name)
        crash_point("final")
    stage.rmdir()
    write_json(out / HISTORY, history)


def final_evaluation(s: Session) -> tuple[dict, dict]:
    """The final model and the teacher on the full held-out task list (per-iteration evaluation
    runs only the cheap tasks)."""
    # The teacher never changes: reuse its per-iteration scores and run only the tasks it has not seen.
    unseen = [task for task in s.final_tasks if task.name not in s.teacher_eval]
    teacher_scores = {**s.teacher_eval, **evaluate_tasks(s.teacher, unseen, s.teacher)}
    teacher_scores = {task.name: teacher_scores[task.name] for task in s.final_tasks}
    scores = evaluate_tasks(s.student, s.final_tasks, s.teacher)
    return {"tasks": scores, "quality_retained": quality_retained(scores, teacher_scores)}, teacher_scores


def _results_part(config: dict) -> dict:
    """The options a resumed run must share with the interrupted one: all but those that change no
    removal, weight or score (how often healing is checkpointed, whether speed is measured)."""
    heal = {key: value for key, value in config["heal"].items() if key != "checkpoint_every"}
    return {**{key: value for key, value in config.items() if key != "measure_speed"}, "heal": heal}


def _json_form(config: PruneConfig) -> dict:
    return json.loads(json.dumps(config.to_dict()))


def resume_point(config: PruneConfig, out: Path, resume: bool, overwrite: bool):
    """Decide between a fresh start and a resume; refuse to mix runs. Returns the iteration
    checkpoint folder (or None), its history entries, and the healing checkpoint of the iteration
    in flight (or None)."""
    if overwrite and out.exists():
        if any(out.iterdir()) and not ((out / HISTORY).exists() or checkpoint.find_checkpoint(out) or
                                       checkpoint.find_checkpoint(out, checkpoint.HEAL_FOLDER) or
                                       (out / "logs").exists()):
            raise LayerpruneError(f"--overwrite refuses to empty {out}: it does not hold a layerprune run",
                                  "give --out a new or layerprune-made folder")
        shutil.rmtree(out)
    check_output(out)
    folder = checkpoint.find_checkpoint(out) if out.exists() else None
    heal_folder = checkpoint.find_checkpoint(out, checkpoint.HEAL_FOLDER) if out.exists() else None
    if folder is None and heal_folder is None:
        if resume:
            raise LayerpruneError(f"there is no unfinished run to resume in {out}", "run without --resume")
        return None, [], None
    states = [checkpoint.read_state(f) for f in (folder, heal_folder) if f is not None]
    if any(_results_part(state["config"]) != _results_part(_json_form(config)) for state in states):
        raise LayerpruneError(f"{out} holds an unfinished run with a different configuration",
                              "rerun with the same options to continue it, or pass --overwrite to start afresh")
    entries = states[0].get("entries", []) if folder is not None else []
    pending = states[-1]["pending"] if heal_folder is not None else None
    if pending is None or pending["iteration"] <= len(entries):  # none, or of an iteration already recorded
        return folder, entries, None
    return folder, entries, {**pending, "heal": checkpoint.read_heal_state(heal_folder)}


def prune(config: PruneConfig, progress: bool = True, resume: bool = False, overwrite: bool = False) -> dict:
    """Run a whole pruning job and write the output folder; returns the history. An unfinished run
    of the same configuration in `config.out` is continued from its last checkpoint."""
    config.validate()
    out = Path(config.out)
    folder, done, pending = resume_point(config, out, resume, overwrite)
    started = time.perf_counter()
    s = build_session(config)
    if folder is not None:
        checkpoint.restore_student(s.student, folder, done)
    out.mkdir(parents=True, exist_ok=True)
    depth = num_layers(s.teacher)
    count = config.layers_to_remove(depth)
    log.info("%s: %d layers, removing %d by %s (%s), healing: %s", config.model or "SmolLM2-135M-Instruct (default)",
             depth, count, config.metric, config.mode, config.heal.method)
    def on_entry(entries: list[dict]) -> None:
        checkpoint.save_checkpoint(out, _json_form(config), entries, s.student)
        checkpoint.clear(out, [checkpoint.HEAL_FOLDER])  # its iteration is now recorded

    entries = run_iterations(s, count, progress, done, on_entry, pending)
    final = pending if pending is not None and pending["iteration"] == count + 1 else {"iteration": count + 1}
    final_heal = _heal(s, count + 1, config.heal.final_steps, [], progress, final) if config.heal.final_steps else {}
    final_eval, teacher_final = final_evaluation(s)
    speed = {"original": measure_speed(s.teacher), "pruned": measure_speed(s.student)} if config.measure_speed else {}
    history = {
        "config": config.to_dict(),
        "model": config.model or "embedded:SmolLM2-135M-Instruct",
        "original_layers": depth,
        "final_layers": num_layers(s.student),
        "removed_original": [layer for e in entries for layer in e["removed_original"]],
        "kept_original": original_indices(s.student),
        "teacher_eval": teacher_final,
        "iterations": entries,
        "final_heal": final_heal,
        "final_eval": final_eval,
        "seconds": time.perf_counter() - started,
        "status": "complete",
    }
    save_result(s, out, history, speed)
    shutil.rmtree(out / "cache", ignore_errors=True)  # teacher targets: large, and only for this run
    checkpoint.clear(out)
    log.info("saved %d-layer model to %s (removed original layers %s) in %.0fs", history["final_layers"], out,
             history["removed_original"], history["seconds"])
    return history

