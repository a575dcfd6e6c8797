"""One table and plot from `layerprune compare` runs made separately on the same inputs
(the variants of a long comparison run one after another, or on several machines).

    python bench/merge_compare.py runs/cmp-a runs/cmp-b --out docs/compare-merged
"""

import argparse
import json
import sys
from pathlib import Path

from layerprune.compare_table import merge_comparisons, write_comparison
from layerprune.errors import LayerpruneError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of `layerprune compare`")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        missing = [str(run) for run in args.runs if not (run / "compare.json").is_file()]
        if missing:
            raise LayerpruneError(f"no compare.json in {', '.join(missing)}", "pass finished compare output folders")
        summary = merge_comparisons([json.loads((run / "compare.json").read_text()) for run in args.runs])
    except LayerpruneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_comparison(args.out, summary)
    print((args.out / "compare.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
