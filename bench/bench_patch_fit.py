"""The patch alone, by each fit: SmolLM2-135M with the same layers removed one after another,
each cut patched by least squares, by normalised least squares, by ReplaceMe's cosine fit, or not
at all, judged on validation text cut from the training split (never the held-out text).

    python bench/bench_patch_fit.py                  # -2, -4, -6; four fits, six cuts each
    python bench/bench_patch_fit.py --cuts 12-15,13-18     # ReplaceMe's way: one block cut at once

The removal order is fixed, so every fit is judged on the same cuts: by default the layers
SLEB-style NLL removed on this model (compare run of 2026-12-04; that method patches nothing, so
the order favours no fit). Quality retained (perplexity, token accuracy, KL to the original) with
its 95% interval over the validation blocks.
"""

from __future__ import annotations

import argparse
import copy

import torch

# the original layers SLEB-style NLL removed from SmolLM2-135M-Instruct, in order (no patch, no healing)
SLEB_ORDER = "14,5,17,16,18,13"
FITS = ("none", "lstsq", "normalised", "cosine")
TASKS = ("perplexity", "token_accuracy", "kl")


def main() -> None:
    from layerprune.config import DataConfig
    from layerprune.data import StreamPosition, load_corpus
    from layerprune.inputs import scores_and_rows
    from layerprune.models import load_model
    from layerprune.patch import PatchFit, remove_and_patch
    from layerprune.surgery import original_indices
    from layerprune.tasks import TaskData, build_tasks, quality_retained
    from layerprune.tasks.interval import bootstrap_interval

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", default=SLEB_ORDER, help="original layers removed, in order")
    parser.add_argument("--counts", default="2,4,6")
    parser.add_argument("--fits", default=",".join(FITS))
    parser.add_argument("--skip", type=int, default=600, help="training-stream blocks before the validation ones")
    parser.add_argument("--blocks", type=int, default=64, help="validation blocks")
    parser.add_argument("--cuts", help="instead: original layers A-B removed at once, one patch each (12-15,13-18)")
    args = parser.parse_args()
    order = [int(layer) for layer in args.order.split(",")]
    counts = {int(count) for count in args.counts.split(",")}
    teacher, tokenizer = load_model(None, "float32", "cpu")
    data = DataConfig()
    corpus = load_corpus(data, tokenizer, patch_pool=True)
    validation = corpus.train.take(args.blocks, corpus.train.advance(StreamPosition(), args.skip))[0]
    tasks = build_tasks(TASKS, TaskData(tokenizer, validation, [], data.batch_size, 0))
    reference, reference_rows = scores_and_rows(teacher, tasks, teacher)
    if args.cuts:
        return block_cuts(teacher, corpus, tasks, reference, reference_rows, args.cuts, data.batch_size)
    table: dict[str, dict[int, str]] = {}
    for fit in args.fits.split(","):
        student = copy.deepcopy(teacher)
        how = PatchFit(corpus.patch_blocks, "none" if fit == "none" else "lstsq", data.batch_size, False,
                       fit="lstsq" if fit == "none" else fit)
        for removed, layer in enumerate(order, start=1):
            remove_and_patch(student, [original_indices(student).index(layer)], how)
            if removed in counts:
                scores, rows = scores_and_rows(student, tasks, teacher)
                interval = bootstrap_interval(rows, reference_rows, tasks)
                table.setdefault(fit, {})[removed] = (f"{quality_retained(scores, reference):.3f} "
                                                      f"[{interval[0]:.3f}, {interval[1]:.3f}]")
                print(f"{fit} -{removed}: {table[fit][removed]}", flush=True)
    print(f"\nlayers removed in order {order}; validation: {args.blocks} x {data.seq_len} training-split tokens "
          f"from block {args.skip}; patch fitted on {corpus.patch_blocks.numel()} training tokens\n")
    print("| fit | " + " | ".join(f"-{count}" for count in sorted(counts)) + " |")
    print("| --- |" + " --- |" * len(counts))
    for fit, cells in table.items():
        print(f"| {fit} | " + " | ".join(cells[count] for count in sorted(counts)) + " |")


def block_cuts(teacher, corpus, tasks, reference, reference_rows, cuts: str, batch_size: int) -> None:
    """Each block cut from the original at once (ReplaceMe's way), patched by least squares, by the
    cosine fit's published schedule, and by what `--patch-fit cosine` keeps (the schedule's T, or
    least squares where that ended no closer in angle): the fits' own measure beside quality."""
    from layerprune.inputs import scores_and_rows
    from layerprune.patch import PatchFit, fit, fold
    from layerprune.patch_math import cosine_distance, cosine_fit, solve, solve_cosine
    from layerprune.surgery import remove_layers
    from layerprune.tasks import quality_retained
    from layerprune.tasks.interval import bootstrap_interval

    print("| block | patch | cosine distance | validation quality retained |\n| --- | --- | --- | --- |")
    for block in cuts.split(","):
        first, last = (int(x) for x in block.split("-"))
        how = PatchFit(corpus.patch_blocks, "lstsq", batch_size, False, fit="cosine")
        samples = fit(teacher, [(first, last)], how)[(first, last)]
        m, r = torch.cat(samples.ms), torch.cat(samples.rs)
        published = cosine_fit(m, r, samples.diagonal)
        kept = solve_cosine(samples, published)
        patches = {"none": None, "lstsq": solve(samples.gram()), "cosine, published schedule": published,
                   f"--patch-fit cosine (keeps {kept[1]})": kept[0]}
        for name, t in patches.items():
            student = copy.deepcopy(teacher)
            if t is not None:
                fold(student, first - 1, t.double())
            remove_layers(student, list(range(first, last + 1)))
            scores, rows = scores_and_rows(student, tasks, teacher)
            low, high = bootstrap_interval(rows, reference_rows, tasks)
            angle = f"{float(cosine_distance(m, r, t.float())):.4f}" if t is not None else "-"
            print(f"| {block} | {name} | {angle} | {quality_retained(scores, reference):.3f} [{low:.3f}, {high:.3f}] |",
                  flush=True)


if __name__ == "__main__":
    main()
