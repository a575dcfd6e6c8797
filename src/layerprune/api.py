"""Public one-shot functions beside the pruning loop: rank the layers once, evaluate a model."""

from __future__ import annotations

from .config import EvalConfig, ScoreConfig
from .data import load_corpus
from .errors import LayerpruneError
from .importance import ScoringContext, check_metric, score_layers
from .models import check_context, check_same_vocabulary, load_model
from .surgery import original_indices
from .tasks import TaskData, blocks_to_batches, build_tasks, check_task_name, evaluate_tasks, quality_retained


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
    result = {"model": config.model or "embedded:SmolLM2-135M-Instruct", "tasks": evaluate_tasks(net, tasks, ref)}
    if ref is not None:
        result["teacher"] = config.teacher
        result["teacher_tasks"] = evaluate_tasks(ref, tasks, ref)
        result["quality_retained"] = quality_retained(result["tasks"], result["teacher_tasks"])
        result["quality_retained_tasks"] = list(config.tasks)
    return result
