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
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import outdir
from .checkpoint import check_output
from .compare_bench import KEYS as BENCH_KEYS, PER_COUNT as BENCH_PER_COUNT, Benchmarks, bench_section, \
    benchmarks_for, check_suites, per_count, plot_bench
from .config import CompareConfig, PruneConfig, Recipe
from .data import EVERY_SPLIT, held_blocks
from .depth import Depth
from .errors import LayerpruneError
from .healing import Resources
from .inputs import RunInputs, scores_and_rows
from .io import write_json, write_text
from .models import model_name, transformers_bars
from .options import to_dict
from .prepare import check, prepare
from .plots import plot_cost, plot_quality
from .report import with_interval
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


def depends_on_seed(config: CompareConfig, heal: str) -> bool:
    """Whether a variant's figures change with the seed: healing's data order does, and so do tasks
    that draw their items. Without healing, on tasks that draw nothing, every seed gives the same
    figures (the splits, the patch text and the scoring do not depend on it), so it runs once."""
    return heal != "none" or not set((*config.tasks, *config.eval_tasks)) <= set(SEEDLESS_TASKS)


def variant_config(config: CompareConfig, method: str, heal: str, count: int) -> PruneConfig:
    """The prune configuration of one variant: the comparison's recipe with this method's metric
    and mode. A comparison is not resumable (each variant is short): no healing checkpoints."""
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
    """What every variant is measured on besides held-out text: the unseen domain and the
    benchmark suites (either may be None)."""

    domain: Domain | None
    bench: Benchmarks | None


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

    def run(count: int):
        variant = PruneRun(variant_config(config, method, heal, count), inputs, Depth(count, f"--remove {count}"),
                           resources, progress=progress).setup()
        for iteration in variant.remaining():
            variant.step(iteration)
            removed = count if mode != "iterative" else iteration
            if domain is not None and removed in counts:
                unseen[removed] = domain.retained(variant.student, inputs.teacher)
            if measures.bench is not None and removed in counts:
                bench[removed] = measures.bench.measure(variant.student, progress,
                                                        f"{variant_name(config, method, heal)} at -{removed}")
        return variant.records

    if mode == "iterative":   # one run to the deepest count, read off after each removal
        records = run(max(counts))
        upto = {n: records[:n] for n in counts}
    else:
        upto = {n: run(n) for n in counts}
    evaluations = {n: taken[-1].eval for n, taken in upto.items()}
    seconds = {n: sum(sum(record.timings.values()) for record in taken) for n, taken in upto.items()}
    removed = {n: [layer for record in taken for layer in record.removed_original] for n, taken in upto.items()}
    measured = {"removed_original": removed,
                "quality_retained": {n: e.quality_retained for n, e in evaluations.items()},
                "quality_retained_interval": {n: e.interval for n, e in evaluations.items()},
                "seconds_per_count": seconds}
    if domain is not None:
        measured["quality_retained_unseen"] = {n: q for n, (q, _) in unseen.items()}
        measured["quality_retained_unseen_interval"] = {n: interval for n, (_, interval) in unseen.items()}
    return {**measured, **per_count(bench)}


def deepest(config: CompareConfig, seed: int | None = None) -> PruneConfig:
    """The variant configuration a comparison is prepared with: its deepest cut, healed where any
    variant heals (the stream must hold those healings; the guard's blocks lie past them)."""
    heal = "distill" if "distill" in config.healing else "none"
    variant = variant_config(config, config.methods[0], heal, max(config.counts))
    return variant if seed is None else dataclasses.replace(variant, seed=seed)


def compare(config: CompareConfig, progress: bool = True) -> dict:
    """Run every method x healing variant; write compare.json, compare.md and compare.png to config.out."""
    config.validate()
    check(deepest(config), warn_ignored=False)
    check_suites(config.final_tasks)
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
    for seed in seeds:
        # A seed changes the healings' data order and the sampled task items: inputs are built per seed.
        seeded = dataclasses.replace(config, seed=seed)
        if seed != seeds[0]:
            prepared = prepared.for_seed(deepest(config, seed), out, progress, **options)
        domain = unseen_domain(seeded, teacher, tokenizer)
        for method, heal in variants(config):
            name = variant_name(config, method, heal)
            if seed != seeds[0] and not depends_on_seed(config, heal):
                log.info("%s does not depend on the seed: run on seed %d only", name, seeds[0])
                continue
            start = time.perf_counter()
            quality = run_variant(prepared.inputs, seeded, method, heal, prepared.resources, Measures(domain, bench),
                                  progress)
            by_seed.setdefault(name, {})[seed] = {**quality, "seconds": time.perf_counter() - start}
            log.info("%s, seed %d: %s (%.0fs)", name, seed,
                     {n: round(q, 3) for n, q in quality["quality_retained"].items()}, by_seed[name][seed]["seconds"])
    results = {name: {"method": method, "heal": heal, "patch": variant_config(config, method, heal, 1).patch,
                      **over_seeds(by_seed[name]), "seeds": sorted(by_seed[name])}
               for method, heal in variants(config) for name in [variant_name(config, method, heal)]}
    prepared.resources.close()
    summary = {"model": model_name(config.model), "counts": counts,
               "eval_tasks": list(config.eval_tasks), "data": source_name(config.data.source),
               "unseen_data": config.unseen_data, "teacher_eval": prepared.inputs.teacher_eval, "results": results,
               "seeds": list(seeds),
               "config": to_dict(config), **({"bench": bench.describe()} if bench is not None else {})}
    if is_main_process():
        write_comparison(out, summary)
    return summary


def over_seeds(runs: dict[int, dict]) -> dict:
    """One variant's figures over its seeds: one seed's as they are; several seeds' as the mean
    (seconds too: what one model costs), the spread (lowest and highest seed), and an interval
    from the lowest seed's low to the highest seed's high (every seed's 95% interval over
    held-out blocks inside it), with every seed's own figures under `per_seed`."""
    if len(runs) == 1:
        return next(iter(runs.values()))
    merged: dict = {"seeds": sorted(runs), "per_seed": runs,
                    "seconds": sum(r["seconds"] for r in runs.values()) / len(runs)}
    first = next(iter(runs.values()))
    merged["seconds_per_count"] = {n: sum(r["seconds_per_count"][n] for r in runs.values()) / len(runs)
                                   for n in first["seconds_per_count"]}
    for key in ("quality_retained", "quality_retained_unseen", *BENCH_KEYS):
        if key not in first:
            continue
        values = {n: [r[key][n] for r in runs.values()] for n in first[key]}
        merged[key] = {n: sum(v) / len(v) for n, v in values.items()}
        merged[f"{key}_spread"] = {n: [min(v), max(v)] for n, v in values.items()}
        intervals = {n: [r[f"{key}_interval"][n] for r in runs.values()] for n in first[key]}
        merged[f"{key}_interval"] = {n: None if None in iv else [min(i[0] for i in iv), max(i[1] for i in iv)]
                                     for n, iv in intervals.items()}
    return merged


def write_comparison(out: Path, summary: dict) -> None:
    """compare.json, compare.md and the plots of one summary: quality retained against the layers
    removed (held-out, unseen) and against the seconds spent."""
    write_json(out / "compare.json", summary)
    write_text(out / "compare.md", comparison_markdown(summary))
    tasks = ", ".join(summary["eval_tasks"])
    for key, file, text in (("quality_retained", "compare.png", summary["data"]),
                            ("quality_retained_unseen", "compare_unseen.png", summary.get("unseen_data"))):
        curves = {name: [(0, 1.0), *sorted(r[key].items())]
                  for name, r in summary["results"].items() if key in r}
        if curves:
            plot_quality(curves, out / file, f"quality retained on held-out {text} ({tasks})")
    plot_bench(summary, out)
    costs = {name: [(r["seconds_per_count"][n], r["quality_retained"][n], n) for n in sorted(r["quality_retained"])]
             for name, r in summary["results"].items() if "seconds_per_count" in r}
    if costs:
        plot_cost(costs, out / "compare_seconds.png", f"what each minute buys: quality retained on held-out "
                                                      f"{summary['data']} against the seconds spent")


# A variant's figures per count of layers removed (JSON keys are strings, read back as ints).
PER_COUNT = ("removed_original", "quality_retained", "quality_retained_interval", "quality_retained_spread",
             "quality_retained_unseen", "quality_retained_unseen_interval", "quality_retained_unseen_spread",
             "seconds_per_count", *BENCH_PER_COUNT)
# What must agree for two comparisons' variants to stand in one table.
SAME_INPUTS = ("model", "counts", "eval_tasks", "data", "unseen_data", "teacher_eval", "bench")


def merge_comparisons(summaries: list[dict]) -> dict:
    """One table from comparisons run separately (e.g. one variant per machine, or one seed per
    session): they must share the model, data, counts, tasks and the teacher's held-out scores.
    A variant in several of them is one variant run on other seeds: its seeds are pooled as if run
    together (`over_seeds`), provided it ran with the same configuration apart from the seed.
    Each variant keeps the config it ran with."""
    first = summaries[0]
    for other in summaries[1:]:
        differ = [key for key in SAME_INPUTS if other.get(key) != first.get(key)]
        if differ:
            raise LayerpruneError(f"comparisons differ in {', '.join(differ)}",
                                  "merge only comparisons run on the same model, data, counts and tasks")
    runs: dict[str, dict[int, dict]] = {}
    described: dict[str, dict] = {}
    for summary in summaries:
        for name, result in summary["results"].items():
            config = result.get("config", summary.get("config", {}))   # a merged summary's is per variant
            seeded = _per_seed(result, summary.get("seeds") or config.get("seeds") or [config.get("seed", 0)])
            if name in runs:
                _check_same_variant(name, described[name], result, config, runs[name], seeded)
            else:
                described[name] = {**{key: result[key] for key in ("method", "heal", "patch")}, "config": config}
            runs.setdefault(name, {}).update(seeded)
    results = {name: {**described[name], **over_seeds(runs[name]), "seeds": sorted(runs[name])} for name in runs}
    seeds = sorted({seed for seeded in runs.values() for seed in seeded})
    return {**{key: first.get(key) for key in SAME_INPUTS}, "results": results, "seeds": seeds}


def _per_seed(result: dict, seeds: list[int]) -> dict[int, dict]:
    """{seed: that seed's figures, per-count keys as ints} of one variant read back from JSON."""
    def figures(run: dict) -> dict:
        return {**run, **{key: {int(n): q for n, q in run[key].items()} for key in PER_COUNT if key in run}}
    if "per_seed" in result:
        return {int(seed): figures(run) for seed, run in result["per_seed"].items()}
    own = {key: result[key] for key in result if key not in ("method", "heal", "patch", "config", "seeds")}
    return {result.get("seeds", seeds)[0]: figures(own)}


# A variant's configuration may differ between parts only in what names the part, or changes no figure.
PART_KEYS = ("seed", "seeds", "out", "methods", "healing", "eval_before_heal")


def _check_same_variant(name: str, described: dict, result: dict, config: dict, have: dict, seeded: dict) -> None:
    if set(have) & set(seeded):
        raise LayerpruneError(f"variant {name!r} has seed {min(set(have) & set(seeded))} in more than one comparison",
                              "merge each variant's seed once")
    differ = [key for key in ("method", "heal", "patch") if described[key] != result[key]] + \
        [key for key in sorted(set(config) | set(described["config"]))
         if key not in PART_KEYS and config.get(key) != described["config"].get(key)]
    if differ:
        raise LayerpruneError(f"variant {name!r} ran with other {', '.join(differ)} in another comparison",
                              "merge only seeds of a variant run with the same options")


def _column_cells(results: dict, key: str, count: int) -> dict[str, str]:
    """Each variant's figure at one count with its interval: the best in bold, and marked level
    (~) where its interval reaches the best one's."""
    figures = {name: r[key][count] for name, r in results.items()}
    intervals = {name: r.get(f"{key}_interval", {}).get(count) for name, r in results.items()}
    best = max(figures, key=figures.get)
    cells = {}
    for name, figure in figures.items():
        cell = with_interval(figure, intervals[name])
        level = intervals[name] and intervals[best] and intervals[name][1] >= intervals[best][0]
        cells[name] = f"**{cell}**" if name == best else cell + (" ~" if level else "")
    return cells


def comparison_markdown(summary: dict) -> str:
    counts, seeds = summary["counts"], summary.get("seeds", [0])
    unseen = summary.get("unseen_data")
    results = summary["results"]
    head = " | ".join(f"-{n}" for n in counts)
    keys = ["quality_retained"] + (["quality_retained_unseen"] if unseen else [])
    columns = {(key, n): _column_cells(results, key, n) for key in keys for n in counts}
    lines = [f"# Depth-pruning methods on {summary['model']}", "",
             f"Quality retained (mean of {', '.join(summary['eval_tasks'])} relative to the original; 1.0 = the "
             f"original) on held-out {summary['data']} text" + (f" and on {unseen}, a domain nothing is trained or "
                                                                  "scored on" if unseen else "") + ", with its 95% "
             "bootstrap interval over held-out blocks" + (
                 "; a variant run on several seeds gives the mean over them, its interval from the lowest seed's "
                 "low to the highest seed's high" if len(seeds) > 1 else "") +
             ". Bold: the best in its column; ~: level with it (its interval reaches the best one's). Seconds: "
             "what one model (one seed) took, from scoring to evaluation, for all the counts.", "",
             f"| method | {summary['data']}: {head} |" + (f" {unseen}: {head} |" if unseen else "") +
             " seconds | seeds |",
             "| --- |" + " --- |" * (len(counts) * len(keys)) + " --- | --- |"]
    for name, r in results.items():
        cells = " | ".join(columns[key, n][name] for key in keys for n in counts)
        ran = ", ".join(map(str, r.get("seeds", seeds[:1])))
        lines.append(f"| {name} | {cells} | {r['seconds']:.0f} | {ran} |")
    plots = ["![quality retained against layers removed](compare.png)",
             "![quality retained against seconds spent](compare_seconds.png)"]
    if unseen:
        plots.append(f"![quality retained on {unseen}](compare_unseen.png)")
    return "\n".join(lines) + "\n\n" + "\n".join(plots) + "\n" + "\n".join(bench_section(summary, _column_cells)) \
        + "\n"
