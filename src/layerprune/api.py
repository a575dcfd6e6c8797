"""Public one-shot functions beside the pruning loop: rank the layers once, evaluate a model."""

from __future__ import annotations

from .config import DataConfig, PruneConfig
from .data import load_corpus
from .distill import check_compatible
from .errors import LayerpruneError
from .importance import ScoringContext, score_layers
from .models import load_model
from .surgery import original_indices
from .tasks import TaskData, blocks_to_batches, build_tasks, check_task_name, evaluate_tasks, quality_retained


def score(model: str | None = None, metric: str = "bi", data=None, tasks=("perplexity", "token_accuracy"),
          dtype: str = "float32", device: str = "auto", progress: bool = True) -> list[dict]:
    """Importance of every layer of a model, once, with original indices: [{layer, current, score}]."""
    config = PruneConfig(out="", model=model, metric=metric, remove=1, tasks=tuple(tasks), dtype=dtype,
                         device=device, data=data or DataConfig())
    config.validate()
    net, tokenizer = load_model(model, dtype, device)
    corpus = load_corpus(config.data, tokenizer)
    task_objs = build_tasks(config.tasks, TaskData(tokenizer, corpus.blocks["calib"], corpus.docs["calib"],
                                                   config.data.batch_size))
    reference = evaluate_tasks(net, task_objs, net) if metric == "quality" else None
    ctx = ScoringContext(blocks_to_batches(corpus.blocks["calib"], config.data.batch_size), task_objs, net,
                         reference, progress=progress)
    values = score_layers(net, metric, ctx)
    return [{"layer": o, "current": i, "score": v} for i, (o, v) in enumerate(zip(original_indices(net), values))]


def evaluate(model: str | None = None, teacher: str | None = None, tasks=("perplexity", "token_accuracy"),
             data: DataConfig | None = None, dtype: str = "float32", device: str = "auto", seed: int = 0) -> dict:
    """Scores of `model` on held-out tasks; with a teacher, the teacher's scores and quality retained."""
    data = data or DataConfig()
    data.validate()
    for name in tasks:
        check_task_name(name)
    needs_teacher = [name for name in tasks if name == "kl"]
    if needs_teacher and teacher is None:
        raise LayerpruneError("task kl compares with a teacher", "pass --teacher (the original model)")
    net, tokenizer = load_model(model, dtype, device)
    ref = None
    if teacher is not None:
        ref, ref_tokenizer = load_model(teacher, dtype, device)
        check_compatible(net, ref, tokenizer, ref_tokenizer)
    corpus = load_corpus(data, tokenizer)
    task_objs = build_tasks(tasks, TaskData(tokenizer, corpus.blocks["eval"], corpus.docs["eval"], data.batch_size,
                                            seed))
    result = {"model": model or "embedded:SmolLM2-135M-Instruct", "tasks": evaluate_tasks(net, task_objs, ref)}
    if ref is not None:
        result["teacher"] = teacher
        result["teacher_tasks"] = evaluate_tasks(ref, task_objs, ref)
        result["quality_retained"] = quality_retained(result["tasks"], result["teacher_tasks"])
    return result
