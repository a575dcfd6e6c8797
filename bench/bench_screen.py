"""Screened scoring (--screen K) against scoring every shortlisted candidate on all the
calibration text: the same choice? what does it save?

One scoring round of the default recipe (quality on 32 calibration blocks, the 12 layers Block
Influence ranks lowest, patched candidates) on a model state: the original (default) or a pruned
folder (`--student`, e.g. the main job's output: a later round). Every candidate's statistics are
collected batch by batch, so one pass gives both the full scores and what any first stage would
have seen: for each K, over every choice of first-stage batches of the screen's size (not only
the first ones the run uses), how often the full winner survives the first stage. Then the
screened round itself runs, timed beside the full one.

    python bench/bench_screen.py                                  # SmolLM2, round 1 (alone: ~6 min)
    python bench/bench_screen.py --student runs/smollm2-28        # a later round
    python bench/bench_screen.py --model embedded:gemma3-270m --per-batch-as-full   # Gemma-3-270M
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="the original (default: the embedded SmolLM2)")
    parser.add_argument("--student", default=None, help="a pruned folder of that model: score its next round")
    parser.add_argument("--screens", default="2,3,4,6", help="the K whose first stages are simulated")
    parser.add_argument("--run", type=int, default=4, help="the K whose screened round is also run and timed")
    parser.add_argument("--per-batch-as-full", action="store_true",
                        help="time the per-batch round as the full one instead of running it again (Gemma: 8 min)")
    args = parser.parse_args()

    from layerprune.config import DataConfig, PruneConfig
    from layerprune.data import load_corpus
    from layerprune.importance import SCREEN_FRACTION, ScoringContext, candidate_stats, score_bi, score_quality
    from layerprune.models import load_model
    from layerprune.patch import PatchFit, candidate_patches
    from layerprune.surgery import num_layers
    from layerprune.tasks import TaskData, build_tasks, evaluate_tasks, quality_retained

    torch.manual_seed(0)
    defaults = PruneConfig(out="-")
    teacher, tokenizer = load_model(args.model, "float32", "auto")
    student = load_model(args.student, "float32", "auto")[0] if args.student else teacher
    corpus = load_corpus(DataConfig(), tokenizer, patch_pool=True)
    data = TaskData(tokenizer, corpus.blocks["calib"], [], defaults.data.batch_size)
    tasks = build_tasks(list(defaults.tasks), data)
    batches = data.block_batches
    reference = evaluate_tasks(teacher, tasks, teacher)
    ctx = ScoringContext(batches, tasks, teacher, reference, progress=False)
    bi = score_bi(student, ctx)
    shortlist = sorted(sorted(range(num_layers(student)), key=bi.__getitem__)[:defaults.shortlist])
    started = time.perf_counter()
    patches = candidate_patches(student, shortlist, PatchFit(corpus.patch_blocks, defaults.patch, progress=False))
    patch_s = time.perf_counter() - started

    def summary(stats):
        return quality_retained({t.name: t.summary(stats[t.name]) for t in tasks}, reference)

    # Every candidate's statistics per batch: one full round, batch by batch.
    started = time.perf_counter()
    per_batch = [candidate_stats(student, tasks, shortlist, teacher, progress=False, patches=patches,
                                 part=slice(b, b + 1)) for b in range(len(batches))]
    full_s = time.perf_counter() - started

    def scores(which: tuple[int, ...]) -> dict[int, float]:
        def total(pick):
            out: dict = {}
            for b in which:
                for name, sums in pick(per_batch[b]).items():
                    for key, value in sums.items():
                        out.setdefault(name, {})[key] = out.get(name, {}).get(key, 0.0) + value
            return out
        base = summary(total(lambda part: part[0]))
        return {i: base - summary(total(lambda part, i=i: part[1][i])) for i in shortlist}

    full = scores(tuple(range(len(batches))))
    winner = min(shortlist, key=full.__getitem__)
    first = max(1, len(batches) // SCREEN_FRACTION)
    stages = list(itertools.combinations(range(len(batches)), first))
    survival = {}
    for k in (int(x) for x in args.screens.split(",")):
        kept = 0
        for stage in stages:
            early = scores(stage)
            kept += winner in sorted(shortlist, key=early.__getitem__)[:k]
        survival[k] = f"{kept}/{len(stages)}"
    first_rank = sorted(shortlist, key=scores(tuple(range(first))).__getitem__).index(winner) + 1

    # The two rounds as the run scores them, timed side by side.
    base_ctx = dataclasses.replace(ctx, candidates=shortlist, patches=patches)
    if args.per_batch_as_full:
        plain, plain_s = [full.get(i, math.nan) for i in range(num_layers(student))], full_s
    else:
        started = time.perf_counter()
        plain = score_quality(student, base_ctx)
        plain_s = time.perf_counter() - started
    started = time.perf_counter()
    screened = score_quality(student, dataclasses.replace(base_ctx, screen=args.run))
    screened_s = time.perf_counter() - started
    chosen = {name: min(shortlist, key=lambda i, s=s: s[i] if s[i] == s[i] else math.inf)
              for name, s in (("full", plain), ("screened", screened))}
    result = {
        "model": args.model or "embedded default", "student": args.student, "layers": num_layers(student),
        "calibration blocks": len(corpus.blocks["calib"]), "first stage batches": first, "shortlist": shortlist,
        "full scores (lowest first)": {i: round(full[i], 5) for i in sorted(shortlist, key=full.__getitem__)},
        "full winner": winner, "its rank on the run's first stage": first_rank,
        "winner survives the first stage, over every choice of its batches": survival,
        "chosen": chosen, "same choice": chosen["full"] == chosen["screened"],
        "candidates scored alike by both rounds (the survivors)": sum(abs(screened[i] - plain[i]) < 1e-9
                                                                        for i in shortlist),
        "seconds": {"patch fit": round(patch_s, 1), "per-batch round": round(full_s, 1),
                    "full round": round(plain_s, 1), f"screened round (K={args.run})": round(screened_s, 1),
                    "ratio": round(screened_s / plain_s, 3)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
