"""`compare`: the paper's method and its baselines on the same model, data and budgets.

One teacher, one corpus, one set of teacher targets serve every variant; each
variant starts from a fresh copy of the teacher. Iterative methods run once
to the deepest cut and are read off after each removal; one-shot and block
methods choose differently for each count, so they run once per count.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

from .config import PruneConfig
from .errors import LayerpruneError
from .pipeline import Session, build_session, check_output, run_iterations, teacher_cache_dir, write_json
from .report import plot_quality

log = logging.getLogger(__name__)

# name -> (metric, mode); "layerprune" is the paper's method (quality metric, iterative).
METHODS = {
    "shortgpt": ("bi", "one-shot"),
    "iterative-bi": ("bi", "iterative"),
    "angular-block": ("angular_last", "block"),
    "sleb-nll": ("nll", "iterative"),
    "layerprune": ("quality", "iterative"),
}
HEALING = ("none", "distill")


def _variant(base: Session, method: str, heal: str, count: int) -> Session:
    metric, mode = METHODS[method]
    # A comparison is not resumable (each variant is short), so it writes no healing checkpoints.
    config = dataclasses.replace(base.config, metric=metric, mode=mode, remove=count, target_layers=None,
                                 heal=dataclasses.replace(base.config.heal, method=heal, checkpoint_every=0))
    return dataclasses.replace(base, config=config, student=copy.deepcopy(base.teacher))


def run_variant(base: Session, method: str, heal: str, counts: list[int], progress: bool) -> dict[int, float]:
    """Quality retained (held-out) after removing each count of layers."""
    _, mode = METHODS[method]
    if mode == "iterative":
        entries = run_iterations(_variant(base, method, heal, max(counts)), max(counts), progress)
        return {n: entries[n - 1]["eval"]["quality_retained"] for n in counts}
    return {n: run_iterations(_variant(base, method, heal, n), n, progress)[0]["eval"]["quality_retained"]
            for n in counts}


def compare(config: PruneConfig, counts: list[int], methods=tuple(METHODS), healing=HEALING,
            progress: bool = True) -> dict:
    """Run every method x healing variant; write compare.json, compare.md and compare.png to config.out."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LayerpruneError(f"unknown method(s) {unknown}", f"use some of {', '.join(METHODS)}")
    if not counts or min(counts) < 1:
        raise LayerpruneError("layer counts to compare must be positive", "pass e.g. --remove 2,4,6")
    out = Path(config.out)
    check_output(out)
    if (out / "compare.json").exists():
        raise LayerpruneError(f"{out} already holds a comparison", "choose another --out")
    counts = sorted(set(counts))
    base = build_session(dataclasses.replace(config, remove=max(counts), target_layers=None))
    out.mkdir(parents=True, exist_ok=True)
    if "distill" in healing and config.heal.teacher_cache:
        from .targets import compute_targets

        base.targets = compute_targets(base.teacher, base.corpus.blocks["train"], teacher_cache_dir(out),
                                       config.heal.teacher_topk, config.data.batch_size, progress)
    results: dict[str, dict] = {}
    for method in methods:
        for heal in healing:
            name = f"{method} + {'healing' if heal == 'distill' else 'no healing'}"
            start = time.perf_counter()
            results[name] = {"method": method, "heal": heal,
                             "quality_retained": run_variant(base, method, heal, counts, progress),
                             "seconds": time.perf_counter() - start}
            log.info("%s: %s (%.0fs)", name, {n: round(q, 3) for n, q in results[name]["quality_retained"].items()},
                     results[name]["seconds"])
    summary = {"model": config.model or "embedded:SmolLM2-135M-Instruct", "counts": counts,
               "eval_tasks": list(config.eval_tasks), "teacher_eval": base.teacher_eval, "results": results,
               "config": config.to_dict()}
    write_json(out / "compare.json", summary)
    (out / "compare.md").write_text(markdown(summary), encoding="utf-8")
    plot_quality({name: [(0, 1.0), *sorted(r["quality_retained"].items())] for name, r in results.items()},
                 out / "compare.png", f"quality retained on held-out text ({', '.join(config.eval_tasks)})")
    import shutil

    shutil.rmtree(out / "cache", ignore_errors=True)
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
