"""The generation columns of a comparison (`compare --final-tasks bench,copy_generate`).

The benchmarks are multiple choice, read off log-likelihoods; a chat model's users read what it
generates, and a model can keep the one and lose the other. So every variant is also asked to
copy the same held-out paragraphs after each count it reaches (copy_generate, the paper's
copying task: greedy decoding, longest common subsequence), the original once. compare.json
keeps every model's per-item scores, so a merged table computes the paired intervals and the
differences between variants from them without generating again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .compare_bench import per_item, reference_variant
from .errors import LayerpruneError
from .plots import plot_quality
from .tasks import TaskData
from .tasks.copying import COPY_TOKENS, Copying, copying_items
from .tasks.retention import paired_ratio, paired_ratio_difference

log = logging.getLogger(__name__)

GENERATION = ("copy_generate", "copy_generate:plain")
KEYS = ("copy_retention",)
PER_COUNT = ("copy_items", *KEYS, *(f"{k}_interval" for k in KEYS), *(f"{k}_spread" for k in KEYS))


@dataclass(frozen=True)
class Generation:
    """The copying items and the original's per-item scores, shared by every variant."""

    name: str
    copying: Copying
    original: list[float]

    def measure(self, student, who: str) -> dict:
        started = time.perf_counter()
        scores = self.copying.scores(student)
        ratio, interval = paired_ratio(scores, self.original)
        log.info("%s of %s: retention %.3f [%.3f, %.3f] (%.0fs)", self.name, who, ratio, *interval,
                 time.perf_counter() - started)
        return {"copy_items": scores, "copy_retention": ratio, "copy_retention_interval": interval}

    def describe(self) -> dict:
        return {"task": self.name, "items": len(self.original), "original": self.original}


def check_generation(names) -> None:
    if len([name for name in names if name in GENERATION]) > 1:
        raise LayerpruneError("compare's --final-tasks takes one copying task", "name copy_generate or "
                              "copy_generate:plain, not both")


def generation_for(config, inputs) -> Generation | None:
    """copy_generate on the comparison's held-out documents, with the items its --seed draws (the
    same for every seed of --seeds, so seeds pool on the same items), and the original's scores."""
    names = [name for name in config.final_tasks if name in GENERATION]
    if not names:
        return None
    data = TaskData(inputs.tokenizer, inputs.corpus.blocks["eval"], inputs.corpus.docs["eval"],
                    config.data.batch_size, config.seed)
    copying = copying_items(data, names[0].partition(":")[2])
    started = time.perf_counter()
    log.info("%s on the original: %d held-out paragraphs", names[0], len(copying.items))
    original = copying.scores(inputs.teacher)
    log.info("%s on the original done: mean score %.3f (%.0fs)", names[0], sum(original) / len(original),
             time.perf_counter() - started)
    return Generation(names[0], copying, original)


def generation_section(summary: dict, column_cells) -> list[str]:
    """compare.md's generation section (empty without a copying task among --final-tasks)."""
    copy = summary.get("copy")
    measured = {name: r for name, r in summary["results"].items() if "copy_retention" in r} if copy else {}
    if not measured:
        return []
    counts, original = summary["counts"], copy["original"]
    columns = {n: column_cells(measured, "copy_retention", n) for n in counts}
    head = " | ".join(f"-{n}" for n in counts)
    lines = ["", f"## Generation retention ({copy['task']})", "",
             f"Greedy copies of the same {copy['items']} held-out paragraphs of {COPY_TOKENS} tokens"
             + (" (a plain prompt)" if copy["task"].endswith(":plain") else
                " (through the chat template where the tokenizer has one)") +
             ", scored by longest common subsequence; retention = the model's mean score over the original's "
             f"({sum(original) / len(original):.3f}), with its 95% paired bootstrap interval over items. Bold: the "
             "best in its column; ~: level with it.", "", f"| method | {head} |", "| --- |" + " --- |" * len(counts)]
    lines += [f"| {name} | " + " | ".join(columns[n].get(name, "-") for n in counts) + " |" for name in measured]
    reference = reference_variant(measured)
    lines += ["", f"Paired difference in generation retention from {reference} (the other minus it), 95% interval "
              "over items:", "", f"| method | {head} |", "| --- |" + " --- |" * len(counts)]
    for name, r in measured.items():
        if name == reference:
            continue
        cells = []
        for n in counts:
            mine, theirs = per_item(r, "copy_items", n), per_item(measured[reference], "copy_items", n)
            if mine is None or theirs is None:
                cells.append("-")
                continue
            value, (low, high) = paired_ratio_difference(mine, theirs, original)
            cells.append(f"{value:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, "", "![generation retention against layers removed](compare_copy.png)"]


def plot_generation(summary: dict, out: Path) -> None:
    curves = {name: [(0, 1.0), *sorted(r["copy_retention"].items())]
              for name, r in summary["results"].items() if "copy_retention" in r}
    if summary.get("copy") and curves:
        plot_quality(curves, out / "compare_copy.png", f"generation retention ({summary['copy']['task']}, "
                     "held-out paragraphs)", "copying score retained (original = 1)")
