"""`compare`: the paper's method and its baselines on the same model, data and budgets.

One preparation (prepare.py: the teacher, corpus, tasks and teacher scores,
and the healing resources: one teacher-target cache, one validation text with
the original's moments on it, one Accelerator) serves every variant: each
variant is a `PruneRun` on it, starting from a fresh copy of the teacher.
Iterative methods run once to the deepest cut and are read off after each
removal; one-shot and block methods choose differently for each count, so
they run once per count. Quality retained is the same measure as in `prune`:
the mean over --eval-tasks relative to the original.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import outdir
from .checkpoint import check_output, results_part
from .compare_bench import Benchmarks, benchmarks_for, check_suites, per_count
from .compare_copy import GENERATION, Generation, check_generation, generation_for
from .compare_table import figures_from_json, over_seeds, write_comparison
from .config import CompareConfig, PruneConfig, Recipe
from .data import EVERY_SPLIT, held_blocks
from .depth import Depth
from .equal_compute import (SUFFIX, at_equal_seconds, at_scale, build_seconds, fixed_seconds, scale_suffix,
                            with_steps)
from .errors import LayerpruneError
from .healing import Resources
from .inputs import RunInputs, evaluate_student, scores_and_rows
from .models import model_name, transformers_bars
from .io import write_json
from .options import result_free, to_dict
from .prepare import check, prepare
from .processes import is_main_process
from .run import PruneRun
from .sources import source_name
from .tasks import SEEDLESS_TASKS, TaskData, build_tasks, quality_retained
from .tasks.interval import bootstrap_interval

log = logging.getLogger(__name__)

# name -> (metric, mode, patch); "layerprune" is the paper's method (quality metric, iterative) with the
# comparison's --patch; ReplaceMe is Gromov's block choice with a least-squares patch, as published.
METHODS = {
    "shortgpt": ("bi", "one-shot", "none"),
    "iterative-bi": ("bi", "iterative", "none"),
    "angular-block": ("angular_last", "block", "none"),
    "sleb-nll": ("nll", "iterative", "none"),
    "replaceme": ("angular_last", "block", "lstsq"),
    "last-layers": ("reverse", "one-shot", "none"),
    "last-layers-ft": ("reverse", "one-shot", "none"),
    "layerprune": ("quality", "iterative", None),
}
# Methods whose paper heals its own way: last-layers-ft trains the LM head and the last three layers
# (arXiv 2411.15558; here with our distillation loss). They run healed only.
PUBLISHED_HEALING = {"last-layers-ft": {"trainable": "last", "local_steps": 0}}


def variants(config: CompareConfig) -> list[tuple[str, str]]:
    """(method, healing) pairs the comparison runs."""
    return [(method, heal) for method in config.methods for heal in config.healing
            if not (heal == "none" and method in PUBLISHED_HEALING)]


def scaled_variants(config: CompareConfig) -> list[tuple[str, str, float]]:
    """(method, healing, budget scale): every healed variant (of --scaled-methods, where given) at
    each of --heal-scales."""
    scaled = config.scaled_methods or config.methods
    return [(method, heal, scale) for method, heal in variants(config)
            for scale in (config.heal_scales if heal == "distill" and method in scaled else (1.0,))]


def depends_on_seed(config: CompareConfig, heal: str) -> bool:
    """Whether a variant's figures change with the seed: healing's data order does, and so do tasks
    that draw their items. Without healing, on tasks that draw nothing, every seed gives the same
    figures (the splits, the patch text and the scoring do not depend on it), so it runs once."""
    return heal != "none" or not set((*config.tasks, *config.eval_tasks)) <= set(SEEDLESS_TASKS)


def variant_config(config: CompareConfig, method: str, heal: str, count: int) -> PruneConfig:
    """The prune configuration of one variant: the comparison's recipe with this method's metric
    and mode. A comparison resumes by whole variants (Finished): no healing checkpoints."""
    metric, mode, patch = METHODS[method]
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(Recipe)}
    published = {"patch": patch, "patch_target": "layer"} if patch else {}
    if metric != "quality":   # SLEB scores every layer on all the text, as published; shortlist and screen are ours
        published.update(shortlist=None, screen=None)
    healing = dataclasses.replace(config.heal, method=heal, checkpoint_every=0, **PUBLISHED_HEALING.get(method, {}))
    return PruneConfig(**{**shared, "heal": healing, **published},
                       metric=metric, mode=mode, remove=count, final_tasks=(), measure_speed=False)


@dataclass(frozen=True)
class Domain:
    """Held-out tasks on a second text, with the teacher's scores on them."""

    name: str
    tasks: list
    teacher_scores: dict
    teacher_rows: dict | None = None

    def retained(self, student, teacher) -> tuple[float, list[float] | None]:
        """Quality retained on this text, and its 95% interval over its held-out blocks."""
        scores, rows = scores_and_rows(student, self.tasks, teacher)
        interval = bootstrap_interval(rows, self.teacher_rows, self.tasks) if rows and self.teacher_rows else None
        return quality_retained(scores, self.teacher_scores), interval


def unseen_domain(config: CompareConfig, teacher, tokenizer) -> Domain | None:
    """The eval tasks on `unseen_data`, every document of it: none of it is trained or scored on,
    so all of it is held out (a small corpus still fills the held-out budget)."""
    if config.unseen_data is None:
        return None
    blocks, docs = held_blocks(config.unseen_data, EVERY_SPLIT, tokenizer, config.data, config.data.blocks("eval"))
    tasks = build_tasks(config.eval_tasks, TaskData(tokenizer, blocks, docs, config.data.batch_size, config.seed))
    return Domain(config.unseen_data, tasks, *scores_and_rows(teacher, tasks, teacher))


def variant_name(config: CompareConfig, method: str, heal: str) -> str:
    """"layerprune + lstsq patch + healing": a patch the method does not itself define is named."""
    patch = f" + {config.patch} patch" if METHODS[method][2] is None and config.patch != "none" else ""
    if patch and config.patch_target == "teacher":
        patch += " (to the teacher)"
    if config.patch_fit != "lstsq" and variant_config(config, method, "none", 1).patch != "none":
        patch += f" ({config.patch_fit} fit)"
    healed = "healing (LM head and last 3 layers)" if method in PUBLISHED_HEALING else "healing"
    return f"{method}{patch} + {healed if heal == 'distill' else 'no healing'}"


@dataclass(frozen=True)
class Measures:
    """What every variant is measured on besides held-out text: the unseen domain, the benchmark
    suites and copying (any may be None)."""

    domain: Domain | None
    bench: Benchmarks | None
    copy: Generation | None = None


def run_variant(inputs: RunInputs, config: CompareConfig, method: str, heal: str, resources: Resources,
                measures: Measures, progress: bool) -> dict[str, dict[int, float]]:
    """Quality retained after removing each count of layers, with its 95% interval over held-out
    blocks, on held-out text and on the unseen domain, and benchmark retention (measured after
    each step that reaches a count); and the seconds of scoring, cutting, healing and evaluating
    that each count took."""
    mode = METHODS[method][1]
    counts = sorted(config.counts)
    domain = measures.domain
    unseen: dict[int, tuple[float, list[float] | None]] = {}
    bench: dict[int, dict] = {}
    copied: dict[int, dict] = {}
    finals: dict[int, tuple] = {}   # count -> (evaluation, seconds) of its final healing, where the recipe has one

    def run(count: int):
        variant = PruneRun(variant_config(config, method, heal, count), inputs, Depth(count, f"--remove {count}"),
                           resources, progress=progress).setup()
        for iteration in variant.remaining():
            variant.step(iteration)
            removed = count if mode != "iterative" else iteration
            if removed not in counts:
                continue
            model, final_heal, final_seconds = variant.final_branch()   # the model a run to this count ends with
            if final_heal is not None:
                finals[removed] = (evaluate_student(inputs, model), final_seconds)
            if domain is not None:
                unseen[removed] = domain.retained(model, inputs.teacher)
            who = f"{variant_name(config, method, heal)} at -{removed}"
            if measures.bench is not None:
                bench[removed] = measures.bench.measure(model, progress, who)
            if measures.copy is not None:
                copied[removed] = measures.copy.measure(model, who)
        return variant.records

    if mode == "iterative":   # one run to the deepest count, read off after each removal
        records = run(max(counts))
        upto = {n: records[:n] for n in counts}
    else:
        upto = {n: run(n) for n in counts}
    evaluations = {n: finals[n][0] if n in finals else taken[-1].eval for n, taken in upto.items()}
    healed_last = {n: finals[n][1] if n in finals else 0.0 for n in upto}
    seconds = {n: sum(sum(record.timings.values()) for record in taken) + healed_last[n] for n, taken in upto.items()}
    building = {n: build_seconds(taken) + healed_last[n] for n, taken in upto.items()}
    fixed = {n: fixed_seconds(taken) for n, taken in upto.items()}
    removed = {n: [layer for record in taken for layer in record.removed_original] for n, taken in upto.items()}
    measured = {"removed_original": removed,
                "quality_retained": {n: e.quality_retained for n, e in evaluations.items()},
                "quality_retained_interval": {n: e.interval for n, e in evaluations.items()},
                "seconds_per_count": seconds, "build_seconds_per_count": building, "fixed_seconds_per_count": fixed,
                "heal_steps": {n: config.heal.steps_per_removal(config.data.seq_len) if heal == "distill" else 0
                               for n in upto}}
    if domain is not None:
        measured["quality_retained_unseen"] = {n: q for n, (q, _) in unseen.items()}
        measured["quality_retained_unseen_interval"] = {n: interval for n, (_, interval) in unseen.items()}
    return {**measured, **per_count(bench), **per_count(copied)}


class Finished:
    """The variants a comparison has measured so far, written whole after each one: the same
    command run again in the same folder skips them, so a comparison stopped mid-way (a session's
    end, a kill) loses only the variant in flight. Options that change no figure may differ."""

    FILE = "variants.json"

    def __init__(self, out: Path, config: CompareConfig):
        self.path = out / self.FILE
        ignored = {k: v for k, v in result_free(CompareConfig).items() if k != "bench"}   # its items are figures
        self.options = results_part(to_dict(config), ignored)
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved.get("options") != json.loads(json.dumps(self.options)):
                raise LayerpruneError(f"{out} holds an unfinished comparison with other options",
                                      "rerun it with the same options to continue it, or choose another --out")
            self.rows = {name: figures_from_json(row) for name, row in saved["rows"].items()}
            log.info("continuing the comparison in %s: %d variant run(s) already measured", out, len(self.rows))

    def get(self, key: str, seed: int, measure: Callable[[], dict]) -> dict:
        """The row of `key` on `seed`: measured before, or measured now and saved."""
        name = f"{key}@{seed}"
        if name in self.rows:
            log.info("%s, seed %d: measured before this comparison was stopped; kept", key, seed)
        else:
            self.rows[name] = measure()
            if is_main_process():
                write_json(self.path, {"options": self.options, "rows": self.rows})
        return self.rows[name]

    def close(self) -> None:
        if is_main_process():
            self.path.unlink(missing_ok=True)


def deepest(config: CompareConfig, seed: int | None = None) -> PruneConfig:
    """The variant configuration a comparison is prepared with: its deepest cut, healed where any
    variant heals (the stream must hold those healings; the guard's blocks lie past them)."""
    heal = "distill" if "distill" in config.healing else "none"
    variant = variant_config(at_scale(config, max(config.heal_scales)), config.methods[0], heal, max(config.counts))
    return variant if seed is None else dataclasses.replace(variant, seed=seed)


def compare(config: CompareConfig, progress: bool = True) -> dict:
    """Run every method x healing variant; write compare.json, compare.md and compare.png to config.out."""
    config.validate()
    check(deepest(config), warn_ignored=False)
    check_suites(config.final_tasks, also=GENERATION)
    check_generation(config.final_tasks)
    if config.unseen_data is not None and config.unseen_data == source_name(config.data.source):
        raise LayerpruneError(f"--unseen-data {config.unseen_data} is also the training data, so it is not unseen",
                              "give --unseen-data another source than --data")
    out = Path(config.out)
    check_output(out)
    if (out / "compare.json").exists():
        raise LayerpruneError(f"{out} already holds a comparison", "choose another --out")
    with outdir.claimed(out, config.model, main=is_main_process()), transformers_bars(progress):
        return _compare(config, out, progress)


def _compare(config: CompareConfig, out: Path, progress: bool) -> dict:
    finished = Finished(out, config)   # before the preparation: other options are refused at once
    counts = sorted(set(config.counts))
    seeds = config.seeds or (config.seed,)
    patching = any(variant_config(config, method, "none", 1).patch != "none" for method in config.methods)
    # the inputs every seed builds: no final suite (benchmarks are measured apart), the teacher's
    # importance scores where the quality metric runs, the patch text where any variant patches
    options = dict(final_tasks=(), teacher_scores="layerprune" in config.methods, patch_pool=patching)
    prepared = prepare(deepest(config, seeds[0]), out, progress, seeds=tuple(seeds), **options)
    teacher, tokenizer = prepared.teacher, prepared.tokenizer
    by_seed: dict[str, dict[int, dict]] = {}
    bench = benchmarks_for(config, teacher, tokenizer, progress)
    copying = generation_for(config, prepared.inputs)
    for seed in seeds:
        # A seed changes the healings' data order and the sampled task items: inputs are built per seed.
        seeded = dataclasses.replace(config, seed=seed)
        if seed != seeds[0]:
            prepared = prepared.for_seed(deepest(config, seed), out, progress, **options)
        measures = Measures(unseen_domain(seeded, teacher, tokenizer), bench, copying)
        for method, heal, scale in scaled_variants(config):
            name = variant_name(config, method, heal) + scale_suffix(scale)
            if seed != seeds[0] and not depends_on_seed(config, heal):
                log.info("%s does not depend on the seed: run on seed %d only", name, seeds[0])
                continue
            def measure() -> dict:
                start = time.perf_counter()
                quality = run_variant(prepared.inputs, at_scale(seeded, scale), method, heal, prepared.resources,
                                      measures, progress)
                row = {**quality, "seconds": time.perf_counter() - start}
                log.info("%s, seed %d: %s (%.0fs)", name, seed,
                         {n: round(q, 3) for n, q in quality["quality_retained"].items()}, row["seconds"])
                return row
            by_seed.setdefault(name, {})[seed] = finished.get(name, seed, measure)
        if config.equal_seconds:
            def again(method: str, count: int, steps: int) -> dict:
                budget = with_steps(dataclasses.replace(seeded, counts=(count,)), steps)
                return finished.get(f"{method} -{count} at {steps} steps", seed, lambda: run_variant(
                    prepared.inputs, budget, method, "distill", prepared.resources, measures, progress))
            healed = [(variant_name(config, m, h), m, METHODS[m][1] == "iterative") for m, h in variants(config)
                      if h == "distill"]
            for name, row in at_equal_seconds(config, healed, by_seed, seed, again, deepest(config)).items():
                by_seed.setdefault(name, {})[seed] = row
    named = [(variant_name(config, method, heal) + scale_suffix(scale), method, heal)
             for method, heal, scale in scaled_variants(config)]
    named += [(name + SUFFIX, method, heal) for name, method, heal in named if name + SUFFIX in by_seed]
    results = {name: {"method": method, "heal": heal, "patch": variant_config(config, method, heal, 1).patch,
                      **over_seeds(by_seed[name]), "seeds": sorted(by_seed[name])} for name, method, heal in named}
    prepared.resources.close()
    summary = {"model": model_name(config.model), "counts": counts,
               "eval_tasks": list(config.eval_tasks), "data": source_name(config.data.source),
               "unseen_data": config.unseen_data, "teacher_eval": prepared.inputs.teacher_eval, "results": results,
               "seeds": list(seeds),
               "config": to_dict(config), **({"bench": bench.describe()} if bench is not None else {}),
               **({"copy": copying.describe()} if copying is not None else {})}
    if is_main_process():
        write_comparison(out, summary)
    finished.close()
    return summary
