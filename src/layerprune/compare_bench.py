"""The benchmark columns of a comparison (`compare --final-tasks bench`).

Every variant is scored on the suite's items after each count it reaches, the original once
(from the cache when it is there). compare.json keeps each variant's per-item results per
count, so a merged table (bench/merge_compare.py) computes its intervals and differences from
them without running anything again. The section it writes: the suite's retention per count
(the best bold, `~` where a variant's interval reaches the best one's, as for quality
retained), then per count a table with a column per task family, chance-corrected retention,
and each variant's paired difference from the reference variant (layerprune with healing where
it ran, else the first), and last the rank agreement between the two currencies: does quality
retained, the next-token measure that chooses our layers, order the models as the benchmarks do?
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .plots import plot_quality
from .tasks.retention import difference, retention
from .tasks.suite import SUITES, ItemResults, SuiteRequest, request_for, run_suite
from .tasks.suite_cache import original_results
from .errors import LayerpruneError

KEYS = ("bench_retention", "bench_chance_corrected")
PER_COUNT = ("bench_items", *KEYS, *(f"{k}_interval" for k in KEYS), *(f"{k}_spread" for k in KEYS))
TABLE_NOTE = ("zero-shot lm-eval tasks on validation items (MMLU: test), acc_norm for HellaSwag, ARC-c and "
              "OpenBookQA and acc for the others; retention = the ratio of mean scores (the field's convention), "
              "with its 95% paired bootstrap interval over items")


def check_suites(names, also=()) -> None:
    unknown = [name for name in names if name not in SUITES and name not in also]
    if unknown:
        raise LayerpruneError(f"compare's --final-tasks takes the benchmark suites and copying only, not "
                              f"{', '.join(unknown)}", f"use {', '.join((*SUITES, *also))} (held-out quality is "
                                                       "always measured)")


@dataclass(frozen=True)
class Benchmarks:
    """The suite request and the original's per-item results, shared by every variant."""

    request: SuiteRequest
    original: ItemResults
    tokenizer: object

    def measure(self, student, progress: bool, who: str) -> dict:
        items = run_suite(student, self.tokenizer, self.request, progress, who=who)
        figures = retention(items, self.original)["suite"]
        measured = {"bench_items": items.to_json(), "bench_retention": figures["ratio_of_means"],
                    "bench_retention_interval": figures["ratio_of_means_interval"]}
        if "chance_corrected" in figures:
            measured.update(bench_chance_corrected=figures["chance_corrected"],
                            bench_chance_corrected_interval=figures["chance_corrected_interval"])
        return measured

    def describe(self) -> dict:
        return {"request": self.request.describe(), "original": self.original.to_json()}


def benchmarks_for(config, teacher, tokenizer, progress: bool) -> Benchmarks | None:
    suites = [name for name in config.final_tasks if name in SUITES]
    if not suites:
        return None
    request = request_for(suites, config.bench.items or None, config.bench.calibration,
                          side=config.bench.side)
    return Benchmarks(request, original_results(teacher, tokenizer, request, None, config.bench.cache, progress),
                      tokenizer)


def per_count(measured: dict[int, dict]) -> dict:
    """{count: figures} of one variant -> {key: {count: value}}, as compare.json keeps them."""
    out: dict = {}
    for count, figures in measured.items():
        for key, value in figures.items():
            out.setdefault(key, {})[count] = value
    return out


def per_item(result: dict, key: str, count: int):
    """A variant's per-item results kept under `key` at one count (a several-seed variant: its
    first seed's), or None."""
    seeds = result.get("per_seed", {})
    runs = [result] if key in result else [seeds[seed] for seed in sorted(seeds, key=int) if key in seeds[seed]]
    return runs[0][key].get(count) if runs else None


def bench_items_at(result: dict, count: int) -> ItemResults | None:
    found = per_item(result, "bench_items", count)
    return None if found is None else ItemResults.from_json(found)


def reference_variant(results: dict) -> str:
    healed = [name for name, r in results.items() if r["method"] == "layerprune" and r["heal"] == "distill"]
    return healed[0] if healed else next(iter(results))


def _span(value: float, interval) -> str:
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _families(original: ItemResults) -> dict[str, list[str]]:
    found = {task.name: task.family or task.name for name in SUITES for task in SUITES[name]}
    families: dict[str, list[str]] = {}
    for task in original.tasks:
        families.setdefault(found.get(task, task), []).append(task)
    return families


def family_table(summary: dict, count: int) -> list[str]:
    """One count's table: a column per task family, chance-corrected, and the difference from
    the reference variant, each with its paired interval."""
    original = ItemResults.from_json(summary["bench"]["original"])
    families = _families(original)
    found = {name: bench_items_at(r, count) for name, r in summary["results"].items()}
    kept = {name: items for name, items in found.items() if items is not None}
    if not kept:
        return []
    reference = reference_variant({name: summary["results"][name] for name in kept})
    lines = [f"| -{count} | " + " | ".join(families) + f" | chance-corrected | difference from {reference} |",
             "| --- |" + " --- |" * (len(families) + 2)]
    for name, items in kept.items():
        cells = []
        for tasks in families.values():
            part = retention(ItemResults({t: items.tasks[t] for t in tasks}),
                             ItemResults({t: original.tasks[t] for t in tasks}))["suite"]
            cells.append(_span(part["ratio_of_means"], part["ratio_of_means_interval"]))
        suite = retention(items, original)["suite"]
        corrected = _span(suite["chance_corrected"], suite["chance_corrected_interval"]) \
            if "chance_corrected" in suite else "-"
        if name == reference:
            delta = "-"
        else:
            diff = difference(items, kept[reference], original)["suite"]
            delta = _span(diff["difference"], diff["interval"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {corrected} | {delta} |")
    return lines


def bench_section(summary: dict, column_cells) -> list[str]:
    """compare.md's benchmark section (empty without --final-tasks)."""
    if not summary.get("bench"):
        return []
    counts, results = summary["counts"], summary["results"]
    measured = {name: r for name, r in results.items() if "bench_retention" in r}
    if not measured:
        return []
    original = ItemResults.from_json(summary["bench"]["original"])
    left = retention(original, original)["suite"]["left_out"]
    columns = {n: column_cells(measured, "bench_retention", n) for n in counts}
    calibration = summary["bench"]["request"].get("side") == "calibration"
    lines = ["", f"## Benchmark retention ({', '.join(summary['bench']['request']['tasks'])})", "",
             *(["**On the calibration share** (--bench-side calibration): items reserved for choosing a recipe; "
                "figures to choose with, never to report.", ""] if calibration else []),
             f"{TABLE_NOTE}. Chance-corrected retention: (score - chance) / (original - chance), chance the best "
             "constant answer's score" + (f"; left out of it, the original not above chance beyond its interval: "
                                          f"{', '.join(left)}" if left else "") +
             f". {summary['bench']['request']['items'] or 'all'} items a task, "
             f"{summary['bench']['request']['calibration']:g} of each task reserved for calibration.", "",
             "| method | " + " | ".join(f"-{n}" for n in counts) + " |", "| --- |" + " --- |" * len(counts)]
    for name in measured:
        lines.append(f"| {name} | " + " | ".join(columns[n].get(name, "-") for n in counts) + " |")
    for n in counts:
        lines += ["", *family_table(summary, n)]
    lines += ["", *agreement_lines(rank_agreement(summary))]
    lines += ["", "![benchmark retention against layers removed](compare_bench.png)"]
    return lines


def rank_agreement(summary: dict) -> dict:
    """Spearman's rho between quality retained and benchmark retention (and its chance-corrected
    form) over the variants, within each count and pooled over counts, with its permutation
    p-value (exact up to 8 models, 50,000 pairings beyond): a table has a handful of variants.
    Pooled, the count orders both measures by itself, so within a count is the question that
    matters. scipy comes with the eval extra, as the benchmark figures do."""
    from scipy.stats import PermutationMethod, pearsonr, rankdata   # Spearman's rho: Pearson's r of ranks

    pairs: dict[str, dict] = {}
    for name, r in summary["results"].items():
        for count, value in r.get("bench_retention", {}).items():
            quality = r["quality_retained"].get(count)
            if quality is not None:
                corrected = r.get("bench_chance_corrected", {}).get(count)
                pairs.setdefault(str(count), {})[name] = (quality, value, corrected)
    groups = {f"-{count}": list(by_name.values()) for count, by_name in sorted(pairs.items(), key=lambda c: int(c[0]))}
    if len(groups) > 1:
        groups["pooled"] = [pair for by_name in pairs.values() for pair in by_name.values()]
    agreement = {}
    for group, rows in groups.items():
        figures = {"n": len(rows)}
        for key, column in (("bench_retention", 1), ("bench_chance_corrected", 2)):
            xs = [row[0] for row in rows if row[column] is not None]
            ys = [row[column] for row in rows if row[column] is not None]
            if len(xs) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
                test = pearsonr(rankdata(xs), rankdata(ys), method=PermutationMethod(n_resamples=50000, rng=0))
                figures[key] = {"rho": float(test.statistic), "p": float(test.pvalue), "n": len(xs)}
        agreement[group] = figures
    return agreement


def agreement_lines(agreement: dict) -> list[str]:
    rows = [(group, figures) for group, figures in agreement.items() if "bench_retention" in figures]
    if not rows:
        return []
    lines = ["Rank agreement between quality retained (held-out text) and benchmark retention: Spearman's rho over "
             "the variants, with its exact permutation p-value (two-sided); pooled mixes the counts, which order "
             "both measures by themselves.", "",
             "| models | n | rho (retention) | p | rho (chance-corrected) | p |",
             "| --- | --- | --- | --- | --- | --- |"]
    for group, figures in rows:
        cells = []
        for key in KEYS:
            test = figures.get(key)
            cells += [f"{test['rho']:+.2f}", f"{test['p']:.2f}"] if test else ["-", "-"]
        lines.append(f"| {group} | {figures['bench_retention']['n']} | " + " | ".join(cells) + " |")
    return lines


def plot_bench(summary: dict, out: Path) -> None:
    if not summary.get("bench"):
        return
    curves = {name: [(0, 1.0), *sorted(r["bench_retention"].items())]
              for name, r in summary["results"].items() if "bench_retention" in r}
    if curves:
        plot_quality(curves, out / "compare_bench.png", "benchmark retention (ratio of mean scores, "
                     f"{', '.join(summary['bench']['request']['tasks'])}; validation items)",
                     "benchmark accuracy retained (original = 1)")
