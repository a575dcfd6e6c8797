"""Any lm-evaluation-harness task, through lm-eval's own Python API, on the model in memory.

`lm_eval:NAME` runs a task lm-eval knows; `lm_eval:NAME@DIR` also indexes the
task YAML files in DIR, which is how tasks run offline (a local `dataset_path:
json` with `data_files`). The score is the task's accuracy-like metric
(acc_norm, acc, exact_match, f1, in that order of preference); evaluation only.
"""

from __future__ import annotations

import logging

from ..errors import LayerpruneError
from .base import Task

PREFERRED = ("acc_norm", "acc", "exact_match", "f1", "mcc")
LIMIT = 64


def _task_manager(include: str | None):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise LayerpruneError("lm_eval tasks need the lm-eval package", "run `pip install lm-eval`") from err
    return TaskManager(include_path=include) if include else TaskManager()


def pick_score(metrics: dict) -> tuple[str, float]:
    """The preferred metric of one task's lm-eval results ('acc,none': 0.5, ...)."""
    values = {key.split(",")[0]: value for key, value in metrics.items()
              if "," in key and "stderr" not in key and isinstance(value, (int, float))}
    for name in PREFERRED:
        if name in values:
            return name, float(values[name])
    if values:
        return next(iter(values.items()))
    raise LayerpruneError("the lm-eval task returned no numeric metric", "use a task with acc or exact_match")


def build_lm_eval(ctx, arg: str) -> Task:
    name, _, include = arg.partition("@")
    manager = _task_manager(include or None)
    if name not in manager.all_tasks:
        raise LayerpruneError(f"lm-eval task {name!r} is not available here (offline, only local task files work)",
                              "write its YAML with a local dataset and pass lm_eval:NAME@FOLDER")

    def run(model, teacher=None) -> dict[str, float]:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        device = str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=ctx.tokenizer, batch_size=ctx.batch_size, device=device)
        results = simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=LIMIT, random_seed=ctx.seed,
                                  numpy_random_seed=ctx.seed, torch_random_seed=ctx.seed, log_samples=False)
        metric, value = pick_score(results["results"][name])
        return {"score": value, metric: value}

    return Task(f"lm_eval:{arg}", [], None, None, run=run)
