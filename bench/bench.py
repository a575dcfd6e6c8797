"""Side-by-side benchmarks on SmolLM2-135M (the embedded default), 2 CPU cores or a GPU.

Each figure is printed next to its straightforward counterpart from the same run, with the
ratio; every phase runs in its own process so that its peak memory (RSS) is its own.

    python bench/bench.py                  # everything: on 2 cores scoring took 9 min,
                                           # healing 2, shortlist about 10, precision < 1
    python bench/bench.py --phases scoring # one phase (scoring, healing, shortlist, precision, patch)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from queue import Empty

import torch


def setup(calib_blocks=16, patch_blocks=32, seq_len=256):
    from layerprune.config import DataConfig
    from layerprune.data import load_corpus
    from layerprune.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(None, "float32", "auto")
    corpus = load_corpus(DataConfig(seq_len=seq_len, calib_blocks=calib_blocks, patch_blocks=patch_blocks,
                                    eval_blocks=4), tokenizer, patch_pool=True)
    return model, tokenizer, corpus


def whole_tensor_tasks(batches):
    """Perplexity and token accuracy computed the direct way (a masked copy of the logits, then a
    full log-softmax): the statistics a straightforward round would use."""
    import torch.nn.functional as F

    from layerprune.tasks import Task, perplexity_summary
    from layerprune.tasks.stats import accuracy_summary

    def scored(logits, batch):
        mask = batch.target_mask[:, :-1].bool()
        return logits[:, :-1][mask].float(), batch.input_ids[:, 1:][mask]

    def nll(logits, batch, teacher_logits=None):
        values, labels = scored(logits, batch)
        return {"nll_sum": F.cross_entropy(values, labels, reduction="sum").item(), "tokens": float(len(labels))}

    def accuracy(logits, batch, teacher_logits=None):
        values, labels = scored(logits, batch)
        return {"correct": (values.argmax(-1) == labels).sum().item(), "tokens": float(len(labels))}

    return [Task("perplexity", batches, nll, perplexity_summary),
            Task("token_accuracy", batches, accuracy, accuracy_summary)]


def phase_scoring(args) -> dict:
    """One `quality` round (perplexity + token accuracy): straightforward, then each of layerprune's
    two changes (sliced statistics, prefix reuse) added in turn."""
    from layerprune.importance import candidate_stats
    from layerprune.surgery import num_layers
    from layerprune.tasks import TaskData, build_tasks, forward_logits

    model, tokenizer, corpus = setup(calib_blocks=args.calib_blocks, seq_len=args.seq_len)
    data = TaskData(tokenizer, corpus.blocks["calib"], [], args.batch_size)
    tasks = build_tasks(["perplexity", "token_accuracy"], data)
    depth = num_layers(model)
    candidates = list(range(depth))
    rounds = {"straightforward": (whole_tensor_tasks(data.block_batches), False),
              "re-run, sliced statistics": (tasks, False),
              "layerprune: prefix reuse, sliced statistics": (tasks, True)}
    timings, stats = {}, {}
    for name, (round_tasks, reuse) in rounds.items():
        start = time.perf_counter()
        stats[name] = candidate_stats(model, round_tasks, candidates, reuse_prefix=reuse, progress=False)[1]
        timings[name] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for batch in data.block_batches:
            logits = forward_logits(model, batch)
        plain = time.perf_counter() - start
        start = time.perf_counter()
        for batch in data.block_batches:  # the decoder alone: what a "layer pass" costs without the head
            model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        decoder = time.perf_counter() - start
        start = time.perf_counter()
        for batch in data.block_batches:
            for task in tasks:
                task.stats(logits, batch, None)
        stats_s = time.perf_counter() - start
    names = list(rounds)

    def per_token(name, i, task, key):
        return stats[name][i][task][key] / stats[name][i][task]["tokens"]

    def diff(a, b):
        return max(abs(per_token(a, i, t, k) - per_token(b, i, t, k))
                   for i in candidates for t in stats[a][i] for k in stats[a][i][t])
    batches = len(data.block_batches)
    rerun, reuse = depth + depth * (depth - 1), depth + depth * (depth - 1) // 2  # layer passes per batch
    passes = {names[0]: rerun, names[1]: rerun, names[2]: reuse}
    # Every candidate (and the current model) runs the LM head and the statistics once, whatever
    # the reuse; in units of one layer pass that cost h bounds the ratio prefix reuse can reach.
    layer_s = decoder / (batches * depth)
    h = ((plain - decoder) + stats_s) / batches / layer_s
    return {
        "calibration": f"{args.calib_blocks} x {args.seq_len} tokens in batches of {args.batch_size}, "
                       f"{depth} candidates",
        "round_s": timings,
        "speedup_total": timings[names[0]] / timings[names[2]],
        "speedup_of_sliced_statistics": timings[names[0]] / timings[names[1]],
        "speedup_of_prefix_reuse": timings[names[1]] / timings[names[2]],
        # per-token stats (mean NLL, accuracy) of every candidate: prefix reuse against re-running with
        # the same statistics code, and layerprune against the straightforward round
        "max_abs_diff_prefix_reuse": diff(names[1], names[2]),
        "max_abs_diff_vs_straightforward": diff(names[0], names[2]),
        "lm_head_and_stats_in_layer_passes": h,
        "prefix_reuse_bound_given_the_head": (rerun + (depth + 1) * h) / (reuse + (depth + 1) * h),
        "layer_passes_per_s": {k: batches * passes[k] / timings[k] for k in timings},
        "plain_forward_layer_passes_per_s": batches * depth / plain,
    }


def _heal_run(model, blocks, targets, steps, topk, tmp):
    from layerprune.config import HealConfig
    from layerprune.healing.loop import heal
    from layerprune.healing.job import plan
    from layerprune.surgery import remove_layers

    student = copy.deepcopy(model)
    remove_layers(student, [17])
    config = HealConfig(steps=steps, batch_size=2, grad_accum=2, teacher_topk=topk)
    # cached targets go with the frozen-prefix cache: the pair a multi-pass healing uses
    job = dataclasses.replace(plan(student, config, steps, iteration=1, seed=0, dropped=[17]),
                              prefix_cache=targets is not None)
    start = time.perf_counter()
    log = heal(student, model, blocks, job, targets, progress=False)
    return time.perf_counter() - start, log


def phase_healing(args) -> dict:
    """Healing steps: teacher + full student every step, against cached targets + frozen prefix."""
    from layerprune.healing.targets import compute_targets

    model, _, corpus = setup(patch_blocks=args.patch_blocks)
    tokens = args.heal_steps * 2 * 2 * 256
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        # the MSE term matches the layer above the cut: original 18 (a run adds such layers lazily)
        train = corpus.patch_blocks
        targets = compute_targets(model, train, f"{tmp}/t", 256, progress=False, layers=[18])
        targets_s = time.perf_counter() - start
        straight_s, straight = _heal_run(model, train, None, args.heal_steps, 256, tmp)
        cached_s, cached = _heal_run(model, train, targets, args.heal_steps, 256, tmp)
        # The same with 2 steps: the difference is the cost of the extra steps alone, without the
        # once-per-healing work (Accelerate set-up; the frozen prefix states of every training block).
        straight_2, _ = _heal_run(model, train, None, 2, 256, tmp)
        cached_2, _ = _heal_run(model, train, targets, 2, 256, tmp)
        # exactness: the whole vocabulary in the cache, on few blocks (the cache is then large)
        small = train[:4]
        vocab = model.get_output_embeddings().weight.shape[0]
        full = compute_targets(model, small, f"{tmp}/full", vocab, progress=False)
        _, exact_cached = _heal_run(model, small, full, 2, vocab, tmp)
        _, exact_straight = _heal_run(model, small, None, 2, vocab, tmp)
    diff = max(abs(a[k] - b[k]) for a, b in zip(exact_cached.rows, exact_straight.rows)
               for k in ("loss", "kl", "mse", "final_mse"))
    topk_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(cached.rows, straight.rows))
    return {
        "steps": f"{args.heal_steps} steps x 2 x 2 blocks of 256 tokens, layers around original 17 trained",
        "tokens_per_s": {"straightforward": tokens / straight_s, "cached targets + frozen prefix": tokens / cached_s},
        "speedup": straight_s / cached_s,
        "per_step_s": {"straightforward": (straight_s - straight_2) / (args.heal_steps - 2),
                       "cached targets + frozen prefix": (cached_s - cached_2) / (args.heal_steps - 2)},
        "per_step_speedup": (straight_s - straight_2) / (cached_s - cached_2),
        "teacher_targets_once_s": targets_s,
        "teacher_targets_mib": targets.nbytes() / 2**20,
        "max_loss_diff_full_vocab": diff,
        "max_loss_diff_top256": topk_diff,
    }


def phase_shortlist(args) -> dict:
    """Full `quality` search against a BI shortlist of M layers, over several removals."""
    from layerprune.importance import ScoringContext, score_bi, score_quality
    from layerprune.surgery import remove_layers
    from layerprune.tasks import TaskData, build_tasks, evaluate_tasks

    model, tokenizer, corpus = setup(calib_blocks=args.calib_blocks)
    data = TaskData(tokenizer, corpus.blocks["calib"], [], 4)
    tasks = build_tasks(["perplexity", "token_accuracy"], data)
    reference = evaluate_tasks(model, tasks, model)
    student = copy.deepcopy(model)
    same, rows, full_s, short_s = 0, [], 0.0, 0.0
    for _ in range(args.iterations):
        ctx = ScoringContext(data.block_batches, tasks, model, reference, progress=False)
        start = time.perf_counter()
        full = score_quality(student, ctx)
        full_s += time.perf_counter() - start
        start = time.perf_counter()
        bi = score_bi(student, ctx)
        ctx.candidates = sorted(sorted(range(len(bi)), key=bi.__getitem__)[:args.shortlist])
        short = score_quality(student, ctx)
        short_s += time.perf_counter() - start
        pick_full = min(range(len(full)), key=full.__getitem__)
        pick_short = min(ctx.candidates, key=short.__getitem__)
        same += pick_full == pick_short
        rows.append({"full": pick_full, "shortlist": pick_short})
        remove_layers(student, [pick_full])
    return {"shortlist_size": args.shortlist, "iterations": args.iterations, "same_choice": same,
            "choices_current_index": rows, "round_s": {"full": full_s / args.iterations,
                                                        "shortlist": short_s / args.iterations},
            "speedup": full_s / short_s}


def phase_precision(args) -> dict:
    """Per-token NLL of a few candidate models, by the whole-tensor formula and by the sliced one,
    each against a float64 reference: where the two rounds' statistics differ, which is right."""
    import torch.nn.functional as F

    from layerprune.tasks.stats import next_token_logprobs
    from layerprune.surgery import layer_view, num_layers
    from layerprune.tasks import TaskData, forward_logits

    model, tokenizer, corpus = setup(calib_blocks=2)
    batch = TaskData(tokenizer, corpus.blocks["calib"], [], 1).block_batches[0]
    depth, labels = num_layers(model), batch.input_ids[0, 1:]
    errors = {"whole tensor": [], "sliced": []}
    with torch.no_grad():
        for drop in (None, 0, depth // 2, depth - 1):
            with layer_view(model, [k for k in range(depth) if k != drop]):
                logits = forward_logits(model, batch)
            exact = -F.log_softmax(logits[0, :-1].double(), -1).gather(-1, labels[:, None])[:, 0]
            whole = F.cross_entropy(logits[0, :-1], labels, reduction="none").double()
            sliced = -next_token_logprobs(logits, batch.input_ids)[0].double()
            errors["whole tensor"].append(abs(float(whole.mean() - exact.mean())))
            errors["sliced"].append(abs(float(sliced.mean() - exact.mean())))
    return {"models": "the full model and without its first, middle and last layer; 1 block of 256 tokens",
            "max_error_of_mean_nll_vs_float64": {name: max(e) for name, e in errors.items()}}


def phase_patch(args) -> dict:
    """One `quality` round with plain candidates against one with patched candidates (--patch lstsq),
    and the held-out quality after removing each round's choice, plain cut against patched cut."""
    from layerprune import patch
    from layerprune.importance import ScoringContext, score_quality
    from layerprune.surgery import num_layers, remove_layers
    from layerprune.tasks import TaskData, build_tasks, evaluate_tasks, quality_retained

    model, tokenizer, corpus = setup(calib_blocks=args.calib_blocks, patch_blocks=args.patch_blocks)
    tasks = build_tasks(["perplexity", "token_accuracy"], TaskData(tokenizer, corpus.blocks["calib"], [], 4))
    held_out = build_tasks(["perplexity", "token_accuracy", "kl"], TaskData(tokenizer, corpus.blocks["eval"], [], 4))
    reference, teacher_eval = evaluate_tasks(model, tasks, model), evaluate_tasks(model, held_out, model)
    candidates = list(range(num_layers(model)))
    ctx = ScoringContext(TaskData(tokenizer, corpus.blocks["calib"], [], 4).block_batches, tasks, model, reference,
                         candidates, progress=False)
    start = time.perf_counter()
    plain = score_quality(model, ctx)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    how = patch.PatchFit(corpus.patch_blocks, "lstsq", progress=False)
    patched_ctx = dataclasses.replace(ctx, patches=patch.candidate_patches(model, candidates, how))
    fit_s = time.perf_counter() - start
    patched = score_quality(model, patched_ctx)
    patched_s = time.perf_counter() - start
    picks = {"plain": min(candidates, key=plain.__getitem__), "patched": min(candidates, key=patched.__getitem__)}
    retained = {}
    for name, layer in picks.items():
        student = copy.deepcopy(model)
        if name == "plain":
            remove_layers(student, [layer])
        else:
            patch.remove_and_patch(student, [layer], how)
        retained[name] = quality_retained(evaluate_tasks(student, held_out, model), teacher_eval)
    return {"round": f"{len(candidates)} candidates, {args.calib_blocks} x 256 calibration tokens; patches fitted "
                     f"on {len(corpus.blocks['train'])} x 256 training tokens",
            "round_s": {"plain": plain_s, "patched": patched_s, "of which fitting all patches": fit_s},
            "patched_over_plain": patched_s / plain_s, "chosen_layer": picks,
            "held_out_quality_retained_after_one_removal": retained}


PHASES = {"scoring": phase_scoring, "healing": phase_healing, "shortlist": phase_shortlist,
          "precision": phase_precision, "patch": phase_patch}


def _child(name, args, queue):
    torch.set_num_threads(args.threads or torch.get_num_threads())
    result = PHASES[name](args)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--calib-blocks", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256, help="calibration block length (scoring)")
    parser.add_argument("--batch-size", type=int, default=4, help="calibration blocks per forward (scoring)")
    parser.add_argument("--patch-blocks", type=int, default=32)
    parser.add_argument("--heal-steps", type=int, default=6, help="at least 3")
    parser.add_argument("--shortlist", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.heal_steps < 3:
        parser.error("--heal-steps must be at least 3 (a step's seconds are the difference from 2 steps)")
    results = {}
    ctx = mp.get_context("spawn")
    for name in args.phases.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, args, queue))
        proc.start()
        while name not in results:   # a phase that dies puts nothing: say so instead of waiting forever
            try:
                results[name] = queue.get(timeout=5)
            except Empty:
                if not proc.is_alive():
                    sys.exit(f"error: the {name} phase failed (exit code {proc.exitcode}); its traceback is above")
        proc.join()
        print(f"== {name}")
        print(json.dumps(results[name], indent=2))
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
