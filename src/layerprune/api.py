"""Public one-shot functions beside the pruning loop: rank the layers once, evaluate a model,
write a finished run's model as GGUF."""

from __future__ import annotations

import logging
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
from .tasks import TaskData, blocks_to_batches, build_tasks, check_task_name, evaluate_tasks, quality_retained

log = logging.getLogger(__name__)


def score(config: ScoreConfig | None = None, progress: bool = True) -> list[dict]:
    """Importance of every layer of a model, once, with original indices: [{layer, current, score}]."""
    config = config or ScoreConfig()
    config.validate()
    check_metric(config.metric)
    for name in config.tasks:
        check_task_name(name, for_importance=True)
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


def evaluate(config: EvalConfig | None = None) -> dict:
    """Scores of a model on held-out tasks; with a teacher, the teacher's scores and quality
    retained (the mean of score / the teacher's score over these tasks)."""
    config = config or EvalConfig()
    config.validate()
    for name in config.tasks:
        check_task_name(name)
    if "kl" in config.tasks and config.teacher is None:
        raise LayerpruneError("task kl compares with a teacher", "pass --teacher (the original model)")
    net, tokenizer = load_model(config.model, config.dtype, config.device)
    ref = None
    if config.teacher is not None:
        ref, ref_tokenizer = load_model(config.teacher, config.dtype, config.device)
        check_same_vocabulary(net, ref, tokenizer, ref_tokenizer)
    check_context(net, config.data.seq_len)
    corpus = load_corpus(config.data, tokenizer)
    tasks = build_tasks(config.tasks, TaskData(tokenizer, corpus.blocks["eval"], corpus.docs["eval"],
                                               config.data.batch_size, config.seed))
    result = {"model": model_name(config.model), "tasks": evaluate_tasks(net, tasks, ref)}
    if ref is not None:
        result["teacher"] = config.teacher
        result["teacher_tasks"] = evaluate_tasks(ref, tasks, ref)
        result["quality_retained"] = quality_retained(result["tasks"], result["teacher_tasks"])
        result["quality_retained_tasks"] = list(config.tasks)
    return result


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
