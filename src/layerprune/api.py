"""Public one-shot functions beside the pruning loop: rank the layers once, evaluate a model,
write a finished run's model as GGUF."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from . import outdir
from .checkpoint import HISTORY, read_history
from .config import EvalConfig, ExportConfig, ScoreConfig
from .data import load_corpus
from .errors import LayerpruneError
from .io import file_entry, write_json
from .gguf_export import CONVERT_HINT, GGUF_NAME, ExportSummary, source_of, write_gguf
from .importance import ScoringContext, check_metric, score_layers
from .models import check_context, check_same_vocabulary, load_model, model_name
from .report import set_card_section
from .surgery import original_indices
from .tasks.retention import retention, task_score
from .tasks.suite import SUITES, data_root, request_for, run_suite
from .tasks.suite_cache import original_results
from .tasks import TaskData, blocks_to_batches, build_tasks, check_task_name, evaluate_tasks, quality_retained

log = logging.getLogger(__name__)


def score(config: ScoreConfig | None = None, progress: bool = True) -> list[dict]:
    """Importance of every layer of a model, once, with original indices: [{layer, current, score}]."""
    config = config or ScoreConfig()
    config.validate()
    check_metric(config.metric)
    for name in config.tasks:
        check_task_name(name, for_importance=True)
        if name in SUITES:
            raise LayerpruneError(f"`layerprune score` does not score layers on the suite {name!r}",
                                  f"use it in `prune --tasks ...,{name}` (candidates scored on its calibration share)")
    net, tokenizer = load_model(config.model, config.dtype, config.device)
    check_context(net, config.data.seq_len)
    corpus = load_corpus(config.data, tokenizer)
    bs = config.data.batch_size
    tasks = build_tasks(config.tasks, TaskData(tokenizer, corpus.blocks["calib"], corpus.docs["calib"], bs,
                                               config.seed))
    reference = evaluate_tasks(net, tasks, net) if config.metric == "quality" else None
    ctx = ScoringContext(blocks_to_batches(corpus.blocks["calib"], bs), tasks, net, reference, progress=progress)
    values = score_layers(net, config.metric, ctx)
    return [{"layer": o, "current": i, "score": v} for i, (o, v) in enumerate(zip(original_indices(net), values))]


def teacher_of(config: EvalConfig) -> str | None:
    """--teacher, else the original a layerprune run folder's history.json names."""
    if config.teacher is not None or config.model is None or not (Path(config.model) / HISTORY).is_file():
        return config.teacher
    original = read_history(Path(config.model)).model
    log.info("the original, from %s: %s", Path(config.model) / HISTORY, original)
    return None if original == model_name(None) else original


def evaluate(config: EvalConfig | None = None, progress: bool = True) -> dict:
    """Scores of a model on held-out tasks; with a teacher, the teacher's scores and quality
    retained (the mean of score / the teacher's score over these tasks), and for the benchmark
    suites, retention with paired intervals (per-item results kept in the result)."""
    config = config or EvalConfig()
    config.validate()
    for name in config.tasks:
        check_task_name(name)
    suites = [name for name in config.tasks if name in SUITES]
    other = [name for name in config.tasks if name not in SUITES]
    if suites:
        data_root()   # the data package missing: said before any model is loaded
    teacher = teacher_of(config)
    from_run = config.model is not None and (Path(config.model) / HISTORY).is_file()
    if "kl" in config.tasks and teacher is None and not from_run:
        raise LayerpruneError("task kl compares with a teacher", "pass --teacher (the original model)")
    net, tokenizer = load_model(config.model, config.dtype, config.device)
    ref = None
    if teacher is not None or from_run:
        ref, ref_tokenizer = load_model(teacher, config.dtype, config.device)
        check_same_vocabulary(net, ref, tokenizer, ref_tokenizer)
    result = {"model": model_name(config.model), "tasks": {}}
    if other:
        check_context(net, config.data.seq_len)
        corpus = load_corpus(config.data, tokenizer)
        tasks = build_tasks(other, TaskData(tokenizer, corpus.blocks[config.split], corpus.docs[config.split],
                                            config.data.batch_size, config.seed))
        result["split"] = config.split
        result["tasks"] = evaluate_tasks(net, tasks, ref)
        if ref is not None:
            result["teacher_tasks"] = evaluate_tasks(ref, tasks, ref)
            result["quality_retained"] = quality_retained(result["tasks"], result["teacher_tasks"])
            result["quality_retained_tasks"] = other
    if ref is not None:
        result["teacher"] = model_name(teacher)
    if suites:
        result["bench"] = evaluate_suites(config, suites, (net, tokenizer), None if ref is None else
                                          (ref, ref_tokenizer, model_name(teacher)), progress)
    return result


def evaluate_suites(config: EvalConfig, suites: list[str], model, original, progress: bool) -> dict:
    """The suites on the model, and against the original (its results cached) when there is one."""
    started = time.perf_counter()
    request = request_for(suites, config.bench.items or None, config.bench.calibration, side=config.bench.side)
    out = {"request": request.describe(), "split": "validation (MMLU: test)"}
    if original is not None:
        ref, ref_tokenizer, name = original
        kept = original_results(ref, ref_tokenizer, request, name, config.bench.cache, progress)
        out["original_seconds"] = time.perf_counter() - started
    items = run_suite(*model, request, progress)
    out["seconds"] = time.perf_counter() - started
    out["items"] = items.to_json()
    if original is not None:
        out["original_items"] = kept.to_json()
        out["retention"] = retention(items, kept)
    else:
        out["scores"] = {name: task_score(items, name) for name in items.tasks}
    return out


def export_gguf(run_dir: str | Path, config: ExportConfig | None = None, progress: bool = True) -> ExportSummary:
    """A finished run's model as GGUF, from the GGUF file the run started from. Written into the
    run folder (the default), it also gets a section in the model card."""
    config, run = config or ExportConfig(), Path(run_dir)
    config.validate()
    if not (run / HISTORY).is_file():
        raise LayerpruneError(f"{run} holds no finished layerprune run (no {HISTORY})",
                              "give the --out folder of a run that has finished")
    history = read_history(run)
    source = Path(config.source) if config.source else source_of(history.model)
    if source is None:
        raise LayerpruneError(f"the run's model {history.model} is not a GGUF file, so there is no GGUF to follow",
                              f"{CONVERT_HINT}, or pass --source if it was converted from one")
    output = Path(config.output) if config.output else run / GGUF_NAME
    if output.resolve().parent != run.resolve():
        summary = write_gguf(source, run, history.kept_original, output, config.gguf_type, progress)
    else:   # into the run folder: claimed like a run, and history.json lists the new files
        with outdir.claimed(run, None):
            summary = write_gguf(source, run, history.kept_original, output, config.gguf_type, progress)
            set_card_section(run, summary.card())
            if history.files is not None:
                history.files.update({name: file_entry(run / name) for name in (output.name, "README.md")})
                write_json(run / HISTORY, history.to_json())
    log.info(summary.log_line())
    return summary
