"""What a held-out evaluation costs, side by side: the original's logits per evaluation against
its moments kept through the shared LM head (src/layerprune/tasks/moments.py), at the old
default budget (8 blocks) and the new one (64 blocks), on SmolLM2-135M with one layer removed.

    python bench/bench_eval.py              # 3 repeats, medians; one repeat took 7 minutes on 2 cores

Each line gives the seconds of the first evaluation of a text (where moments are made) and of a
later one, and KL from both paths (on 2026-12-03 they agreed within 2e-6).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def timed(student, tasks, teacher) -> tuple[float, float]:
    from layerprune.tasks import evaluate_tasks

    started = time.perf_counter()
    kl = evaluate_tasks(student, tasks, teacher)["kl"]["kl"]
    return time.perf_counter() - started, kl


def main() -> None:
    from layerprune.data import held_blocks
    from layerprune.config import DataConfig
    from layerprune.models import load_model
    from layerprune.surgery import remove_layers
    from layerprune.tasks import TaskData, build_tasks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", default="8,64", help="held-out budgets in blocks of 256 tokens")
    args = parser.parse_args()
    teacher, tokenizer = load_model(None, "float32", "cpu")
    student = copy.deepcopy(teacher)
    remove_layers(student, [14])
    names = ["perplexity", "token_accuracy", "kl"]
    print("| blocks | path | first evaluation s | later evaluation s | KL |")
    print("| --- | --- | --- | --- | --- |")
    for count in (int(b) for b in args.blocks.split(",")):
        blocks, _ = held_blocks(None, "eval", tokenizer, DataConfig(), count)
        rows = {"logits": [], "moments": []}
        for _ in range(args.repeats):
            for path in rows:
                tasks = build_tasks(names, TaskData(tokenizer, blocks, [], 4))
                if path == "logits":
                    tasks[2].memo = None
                first, kl = timed(student, tasks, teacher)
                later, _ = timed(student, tasks, teacher)
                rows[path].append((first, later, kl))
        for path, runs in rows.items():
            first = statistics.median(r[0] for r in runs)
            later = statistics.median(r[1] for r in runs)
            print(f"| {count} | {path} | {first:.1f} | {later:.1f} | {runs[0][2]:.6f} |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
