"""Per-iteration healing table of finished runs: held-out KL to the original before and after every
healing, what the guard did on validation text, and quality retained beside the same removals
without healing.

    layerprune prune --remove 4 --eval-before-heal --out runs/smollm2-4
    layerprune prune --remove 4 --heal none --out runs/smollm2-4-noheal
    python bench/heal_table.py runs/smollm2-4 --unhealed runs/smollm2-4-noheal

(Without `--eval-before-heal` a run does not measure its cuts on held-out text before healing them,
and the held-out column shows "-"; the guard's validation column is there either way.)

Every figure comes from the runs' history.json; nothing is measured here. A row without healing is
shown only where the unhealed run removed the same original layers, since otherwise the two are not
the same cut.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def records(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text(encoding="utf-8"))["iterations"]


def removed_so_far(rows: list[dict]) -> list[list[int]]:
    """The original layers gone after each iteration."""
    gone, out = [], []
    for row in rows:
        gone = gone + row["removed_original"]
        out.append(sorted(gone))
    return out


def table(run: Path, unhealed: Path | None) -> str:
    healed = records(run)
    plain = records(unhealed) if unhealed is not None else []
    plain_by_cut = {tuple(cut): row for cut, row in zip(removed_so_far(plain), plain)}
    lines = ["| removed | layers (original) | held-out KL before -> after healing | validation KL before -> kept "
             "(guard) | retries, lr kept | quality retained, healed | the same layers, never healed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for count, (cut, row) in enumerate(zip(removed_so_far(healed), healed), start=1):
        heal = row.get("heal") or {}
        held = (f"{heal['held_out_before']['kl']:.4f} -> {heal['held_out_after']['kl']:.4f}"
                if "kl" in heal.get("held_out_before", {}) else "-")
        guard = heal.get("guard")
        val = f"{guard['kl_before']:.4f} -> {guard['kl_after']:.4f} ({guard['outcome']})" if guard else "-"
        lr = guard["lr_won"] if guard else None
        tries = f"{guard['retries']}, {lr:.3g}" if guard and lr is not None else (
            f"{guard['retries']}, none" if guard else "-")
        other = plain_by_cut.get(tuple(cut))
        without = f"{other['eval']['quality_retained']:.3f}" if other else "(other layers)"
        lines.append(f"| -{count} | {row['removed_original']} | {held} | {val} | {tries} | "
                     f"{row['eval']['quality_retained']:.3f} | {without} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run folder (healed)")
    parser.add_argument("--unhealed", type=Path, help="the same removals with --heal none")
    args = parser.parse_args()
    print(table(args.run, args.unhealed))


if __name__ == "__main__":
    main()
