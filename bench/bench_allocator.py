"""What glibc's malloc settings cost a run: healing steps and a held-out evaluation on SmolLM2-135M,
with glibc's defaults beside `allocator.keep_freed_memory()` (what the `layerprune` command sets).

    python bench/bench_allocator.py            # 3 repeats, interleaved, each way in a fresh process

Each measurement runs in its own process (malloc settings are per process and sticky): the
default recipe's healing after layer 14 is removed (one warm-up step, then `--steps` timed) and
the evaluation tasks on `--blocks` held-out blocks. Prints medians of seconds, kernel CPU seconds
and page faults per healing step and per evaluation, and the process's peak RSS, both ways from
the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(keep: bool, steps: int, blocks: int) -> dict:
    """One process's figures (the child side)."""
    import copy

    from layerprune.allocator import keep_freed_memory

    kept = keep_freed_memory() if keep else False
    from layerprune.config import DataConfig, HealConfig
    from layerprune.data import load_corpus
    from layerprune.heal import heal
    from layerprune.heal_job import plan
    from layerprune.inputs import scores_and_rows
    from layerprune.models import load_model
    from layerprune.surgery import remove_layers
    from layerprune.tasks import TaskData, build_tasks

    teacher, tokenizer = load_model(None, "float32", "cpu")
    corpus = load_corpus(DataConfig(), tokenizer)
    student = copy.deepcopy(teacher)
    remove_layers(student, [14])

    def healed(count: int) -> None:
        job = plan(student, HealConfig(steps=count, guard=False), count, iteration=1, seed=0, dropped=[14])
        heal(student, teacher, corpus.train.take(HealConfig(steps=count).blocks_per_removal(256))[0], job,
             progress=False)

    def timed(work) -> dict:
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        work()
        after = resource.getrusage(resource.RUSAGE_SELF)
        return {"s": time.perf_counter() - started, "sys": after.ru_stime - before.ru_stime,
                "faults": after.ru_minflt - before.ru_minflt}

    healed(1)   # warm-up: the first step's allocations come from the kernel either way
    step = {k: v / steps for k, v in timed(lambda: healed(steps)).items()}
    tasks = build_tasks(("perplexity", "token_accuracy", "kl"),
                        TaskData(tokenizer, corpus.blocks["eval"][:blocks], [], DataConfig().batch_size, 0))
    evaluation = timed(lambda: scores_and_rows(student, tasks, teacher))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"kept": kept, "step": step, "eval": evaluation, "peak_gb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed healing steps per process")
    parser.add_argument("--blocks", type=int, default=32, help="held-out blocks evaluated per process")
    parser.add_argument("--child", choices=["default", "keep"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child == "keep", args.steps, args.blocks)))
        return
    runs: dict[str, list[dict]] = {"default": [], "keep": []}
    for _ in range(args.repeats):
        for way in runs:
            out = subprocess.run([sys.executable, __file__, "--child", way, "--steps", str(args.steps), "--blocks",
                                  str(args.blocks)], check=True, capture_output=True, text=True).stdout
            runs[way].append(json.loads(out.strip().splitlines()[-1]))
            print(way, runs[way][-1], flush=True)

    def median(way: str, part: str, key: str) -> float:
        return statistics.median(run[part][key] for run in runs[way])

    print(f"\nSmolLM2-135M, layer 14 removed; medians of {args.repeats} processes each way, interleaved\n")
    print("| figure | glibc defaults | keep_freed_memory | ratio |")
    print("| --- | --- | --- | --- |")
    for part, label in (("step", "healing step"), ("eval", f"evaluation of {args.blocks} blocks")):
        for key, unit in (("s", "s"), ("sys", "kernel CPU s"), ("faults", "page faults")):
            a, b = median("default", part, key), median("keep", part, key)
            print(f"| {label}, {unit} | {a:,.2f} | {b:,.2f} | {b / a if a else float('nan'):.2f} |")
    a, b = (statistics.median(run["peak_gb"] for run in runs[way]) for way in runs)
    print(f"| peak RSS, GB | {a:.2f} | {b:.2f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
