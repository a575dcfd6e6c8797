"""A finished comparison's benchmark retention with some tasks left out, from its kept per-item
results (no model is run): how much of a lead one task carries, e.g. BoolQ, where a model that
answers every item with the majority label scores as well as one that reads the passage.

    python bench/retention_without.py docs/compare-parts/bench-2026-12-07/gemma-merged --drop boolq
"""

import argparse
import json
import sys
from pathlib import Path

from layerprune.compare_bench import bench_items_at, reference_variant
from layerprune.tasks.retention import difference, retention
from layerprune.tasks.suite import ItemResults


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a `layerprune compare` (or merged) output folder")
    parser.add_argument("--drop", required=True, help="comma-separated task names to leave out")
    args = parser.parse_args()
    summary = json.loads((args.run / "compare.json").read_text())
    dropped = set(args.drop.split(","))
    original = ItemResults.from_json(summary.get("bench", {}).get("original", {}))
    unknown = sorted(dropped - set(original.tasks))
    if not original.tasks or unknown:
        print(f"error: {args.run} has no benchmark results for {unknown or 'any task'}; known: "
              f"{', '.join(original.tasks) or 'none (run compare with --final-tasks bench)'}", file=sys.stderr)
        return 2
    original = original.without(dropped)
    reference = reference_variant(summary["results"])
    print(f"suite without {', '.join(sorted(dropped))}: {', '.join(original.tasks)}; "
          f"difference = variant minus {reference}, paired over items")
    for count in summary["counts"]:
        key = str(count)   # compare.json keys every figure by its count, as JSON's strings
        base = bench_items_at(summary["results"][reference], key)
        for name, result in summary["results"].items():
            items = bench_items_at(result, key)
            if items is None:
                continue
            items = items.without(dropped)
            suite = retention(items, original)["suite"]
            low, high = suite["ratio_of_means_interval"]
            line = f"-{count} {name}: retention {suite['ratio_of_means']:.3f} [{low:.3f}, {high:.3f}]"
            if name != reference and base is not None:
                diff = difference(items, base.without(dropped), original)["suite"]
                (low, high) = diff["interval"]
                line += f", difference {diff['difference']:+.3f} [{low:+.3f}, {high:+.3f}]"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
