"""`compare`: the paper's method and its baselines on the same model, data and budgets.

One set of inputs (teacher, corpus, tasks, teacher scores) and one teacher-
target cache serve every variant, through pipeline's public seam
`run_removals`; each variant starts from a fresh copy of the teacher.
Iterative methods run once to the deepest cut and are read off after each
removal; one-shot and block methods choose differently for each count, so
they run once per count. Quality retained is the same measure as in `prune`:
the mean over --eval-tasks relative to the original.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

from .checkpoint import check_output
from .config import CompareConfig, PruneConfig, Recipe, to_dict
from .errors import LayerpruneError
from .io import write_json, write_text
from .models import load_model
from .pipeline import Loop, RunInputs, build_inputs, check_names, run_removals, teacher_cache_dir
from .report import plot_quality
from .surgery import num_layers
from .targets import TeacherTargets

log = logging.getLogger(__name__)

# name -> (metric, mode); "layerprune" is the paper's method (quality metric, iterative).
METHODS = {
    "shortgpt": ("bi", "one-shot"),
    "iterative-bi": ("bi", "iterative"),
    "angular-block": ("angular_last", "block"),
    "sleb-nll": ("nll", "iterative"),
    "layerprune": ("quality", "iterative"),
}


def variant_config(config: CompareConfig, method: str, heal: str, count: int) -> PruneConfig:
    """The prune configuration of one variant: the comparison's recipe with this method's metric
    and mode. A comparison is not resumable (each variant is short): no healing checkpoints."""
    metric, mode = METHODS[method]
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(Recipe)}
    return PruneConfig(**{**shared, "heal": dataclasses.replace(config.heal, method=heal, checkpoint_every=0)},
                       metric=metric, mode=mode, remove=count, final_tasks=(), measure_speed=False)


def run_variant(inputs: RunInputs, config: CompareConfig, method: str, heal: str,
                targets: TeacherTargets | None, progress: bool) -> dict[int, float]:
    """Quality retained (held-out) after removing each count of layers."""
    _, mode = METHODS[method]
    counts = sorted(config.counts)

    def run(count: int):
        loop = Loop(copy.deepcopy(inputs.teacher), targets=targets)
        return run_removals(inputs, variant_config(config, method, heal, count), count, loop, progress)

    if mode == "iterative":
        records = run(max(counts))
        return {n: records[n - 1].eval.quality_retained for n in counts}
    return {n: run(n)[0].eval.quality_retained for n in counts}


def compare(config: CompareConfig, progress: bool = True) -> dict:
    """Run every method x healing variant; write compare.json, compare.md and compare.png to config.out."""
    config.validate()
    check_names(config, None)
    out = Path(config.out)
    check_output(out)
    if (out / "compare.json").exists():
        raise LayerpruneError(f"{out} already holds a comparison", "choose another --out")
    counts = sorted(set(config.counts))
    teacher, tokenizer = load_model(config.model, config.dtype, config.device)
    variant_config(config, config.methods[0], config.healing[0], max(counts)).layers_to_remove(num_layers(teacher))
    inputs = build_inputs(config, teacher, tokenizer, (), teacher_scores="layerprune" in config.methods)
    out.mkdir(parents=True, exist_ok=True)
    targets = None
    if "distill" in config.healing and config.heal.teacher_cache:
        targets = TeacherTargets.open(teacher_cache_dir(out), teacher, inputs.corpus.blocks["train"],
                                      config.heal.teacher_topk, config.data.batch_size, progress)
    results: dict[str, dict] = {}
    for method in config.methods:
        for heal in config.healing:
            name = f"{method} + {'healing' if heal == 'distill' else 'no healing'}"
            start = time.perf_counter()
            results[name] = {"method": method, "heal": heal,
                             "quality_retained": run_variant(inputs, config, method, heal, targets, progress),
                             "seconds": time.perf_counter() - start}
            log.info("%s: %s (%.0fs)", name, {n: round(q, 3) for n, q in results[name]["quality_retained"].items()},
                     results[name]["seconds"])
    if targets is not None:
        targets.close()
    summary = {"model": config.model or "embedded:SmolLM2-135M-Instruct", "counts": counts,
               "eval_tasks": list(config.eval_tasks), "teacher_eval": inputs.teacher_eval, "results": results,
               "config": to_dict(config)}
    write_json(out / "compare.json", summary)
    write_text(out / "compare.md", markdown(summary))
    plot_quality({name: [(0, 1.0), *sorted(r["quality_retained"].items())] for name, r in results.items()},
                 out / "compare.png", f"quality retained on held-out text ({', '.join(config.eval_tasks)})")
    return summary


def markdown(summary: dict) -> str:
    counts = summary["counts"]
    lines = [f"# Depth-pruning methods on {summary['model']}", "",
             f"Quality retained on held-out text (mean of {', '.join(summary['eval_tasks'])} relative to the "
             "original; 1.0 = the original).", "",
             "| method | " + " | ".join(f"-{n} layers" for n in counts) + " | seconds |",
             "| --- | " + " | ".join("---" for _ in counts) + " | --- |"]
    for name, r in summary["results"].items():
        cells = " | ".join(f"{r['quality_retained'][n]:.3f}" for n in counts)
        lines.append(f"| {name} | {cells} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n\n![quality retained against layers removed](compare.png)\n"
