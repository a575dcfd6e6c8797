"""What a comparison leaves: compare.json, compare.md and its plots; one variant's figures over its
seeds; and one table merged from comparisons run apart (bench/merge_compare.py)."""

from __future__ import annotations

from pathlib import Path

from .compare_bench import KEYS as BENCH_KEYS, PER_COUNT as BENCH_PER_COUNT, bench_section, plot_bench
from .compare_copy import KEYS as COPY_KEYS, PER_COUNT as COPY_PER_COUNT, generation_section, plot_generation
from .equal_compute import SECONDS_KEYS, equal_seconds_lines
from .errors import LayerpruneError
from .io import write_json, write_text
from .plots import plot_cost, plot_frontier, plot_quality
from .report import with_interval


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
    for key in SECONDS_KEYS:
        if key in first:
            merged[key] = {n: sum(r[key][n] for r in runs.values()) / len(runs) for n in first[key]}
    for key in ("quality_retained", "quality_retained_unseen", *BENCH_KEYS, *COPY_KEYS):
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
    plot_generation(summary, out)
    costs = {name: [(r["seconds_per_count"][n], r["quality_retained"][n], n) for n in sorted(r["quality_retained"])]
             for name, r in summary["results"].items() if "seconds_per_count" in r}
    if costs:
        plot_cost(costs, out / "compare_seconds.png", f"what each minute buys: quality retained on held-out "
                                                      f"{summary['data']} against the seconds spent")
    plot_frontier_of(summary, out)


def plot_frontier_of(summary: dict, out: Path) -> None:
    """compare_frontier.png: benchmark retention (quality retained without benchmarks) against the
    seconds each model took to make, per count, with the frontier; where the records hold those
    seconds (comparisons from 2026-12-07 on)."""
    key = "bench_retention" if any("bench_retention" in r for r in summary["results"].values()) else "quality_retained"
    points: dict[int, dict[str, tuple[float, float]]] = {}
    for name, r in summary["results"].items():
        for count, seconds in r.get("build_seconds_per_count", {}).items():
            if count in r.get(key, {}):
                points.setdefault(int(count), {})[name] = (seconds, r[key][count])
    if points:
        what = "benchmark retention (ratio of means)" if key == "bench_retention" else "quality retained (held-out)"
        plot_frontier(points, out / "compare_frontier.png", f"{what} against the seconds to make each model",
                      what)


# A variant's figures per count of layers removed (JSON keys are strings, read back as ints).
PER_COUNT = ("removed_original", "quality_retained", "quality_retained_interval", "quality_retained_spread",
             "quality_retained_unseen", "quality_retained_unseen_interval", "quality_retained_unseen_spread",
             *SECONDS_KEYS, "target_seconds", "heal_steps", "seconds_ratio", *BENCH_PER_COUNT, *COPY_PER_COUNT)
# What must agree for two comparisons' variants to stand in one table.
SAME_INPUTS = ("model", "counts", "eval_tasks", "data", "unseen_data", "teacher_eval", "bench", "copy")


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


def figures_from_json(run: dict) -> dict:
    """One run's figures read back from JSON, its per-count keys as the ints they were."""
    return {**run, **{key: {int(n): q for n, q in run[key].items()} for key in PER_COUNT if key in run}}


def _per_seed(result: dict, seeds: list[int]) -> dict[int, dict]:
    """{seed: that seed's figures, per-count keys as ints} of one variant read back from JSON."""
    if "per_seed" in result:
        return {int(seed): figures_from_json(run) for seed, run in result["per_seed"].items()}
    own = {key: result[key] for key in result if key not in ("method", "heal", "patch", "config", "seeds")}
    return {result.get("seeds", seeds)[0]: figures_from_json(own)}


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
    (~) where its interval reaches the best one's; a variant without one there has no cell."""
    figures = {name: r[key][count] for name, r in results.items() if count in r.get(key, {})}
    intervals = {name: r.get(f"{key}_interval", {}).get(count) for name, r in results.items()}
    if not figures:
        return {}
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
        cells = " | ".join(columns[key, n].get(name, "-") for key in keys for n in counts)
        ran = ", ".join(map(str, r.get("seeds", seeds[:1])))
        lines.append(f"| {name} | {cells} | {r['seconds']:.0f} | {ran} |")
    plots = ["![quality retained against layers removed](compare.png)",
             "![quality retained against seconds spent](compare_seconds.png)"]
    if unseen:
        plots.append(f"![quality retained on {unseen}](compare_unseen.png)")
    if any("build_seconds_per_count" in r for r in results.values()):
        plots.append("![retention against the seconds to make each model, with the frontier](compare_frontier.png)")
    return "\n".join(lines) + "\n\n" + "\n".join(plots) + "\n" + "\n".join(bench_section(summary, _column_cells)) \
        + "\n".join(generation_section(summary, _column_cells)) + "\n".join(equal_seconds_lines(summary)) + "\n"
