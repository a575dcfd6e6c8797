"""A recipe sweep for the healing defaults, judged on text the reported figures never use.

Each variant changes one thing from the current default recipe and runs `layerprune prune
--remove N` on the embedded defaults (same data, budget and seed). It is judged on validation
blocks cut from the training split past everything the runs heal on (the training stream's
blocks from `--skip` on): quality retained (perplexity, token accuracy, KL to the original) there
chooses. The held-out figure each run reports is printed beside it, for reading only: choosing
by it would tune on the numbers the README reports.

    python bench/sweep_heal.py --out runs/sweep                  # all variants, 2 removals
    python bench/sweep_heal.py --out runs/sweep --variants default,lr-1e-3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from layerprune import DataConfig, HealConfig, PruneConfig, prune
from layerprune.data import StreamPosition, load_corpus
from layerprune.models import load_model
from layerprune.tasks import TaskData, build_tasks, evaluate_tasks, quality_retained

TASKS = ("perplexity", "token_accuracy", "kl")
# name -> (top-level overrides, heal overrides): one change from the default each.
VARIANTS = {
    "default": ({}, {}),
    "lr-1e-3": ({}, {"lr": 1e-3}),
    "lr-2e-4": ({}, {"lr": 2e-4}),
    "relative-mse": ({}, {"mse_scale": "relative", "w_kl": 1.0}),
    "relative-mse-kl-led": ({}, {"mse_scale": "relative", "w_kl": 1.0, "w_mse": 0.1, "w_final": 0.1}),
    "trainable-all": ({}, {"trainable": "all"}),
    "patch-lstsq": ({"patch": "lstsq"}, {}),
}


def variant_config(name: str, out: Path, remove: int) -> PruneConfig:
    top, heal = VARIANTS[name]
    base = PruneConfig(out=str(out / name), remove=remove, measure_speed=False, gguf=False, final_tasks=TASKS)
    return dataclasses.replace(base, heal=dataclasses.replace(base.heal, **heal), **top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--remove", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--skip", type=int, default=400, help="training-stream blocks before the validation ones")
    parser.add_argument("--blocks", type=int, default=32, help="validation blocks")
    args = parser.parse_args()

    teacher, tokenizer = load_model(None, device="cpu")
    data = DataConfig()
    stream = load_corpus(data, tokenizer).train
    healed = args.remove * HealConfig().blocks_per_removal(data.seq_len)
    if args.skip < healed:
        raise SystemExit(f"--skip {args.skip} is inside the {healed} blocks the runs heal on")
    validation = stream.take(args.blocks, stream.advance(StreamPosition(), args.skip))[0]
    tasks = build_tasks(TASKS, TaskData(tokenizer, validation, [], data.batch_size, 0))
    reference = evaluate_tasks(teacher, tasks, teacher)
    rows = {}
    results = args.out / "sweep.json"
    if results.is_file():
        rows = json.loads(results.read_text())
    for name in args.variants.split(","):
        if name in rows:
            continue
        started = time.perf_counter()
        history = prune(variant_config(name, args.out, args.remove), progress=False, overwrite=True)
        student, _ = load_model(str(args.out / name), device="cpu")
        scores = evaluate_tasks(student, tasks, teacher)
        rows[name] = {"validation": quality_retained(scores, reference),
                      "validation_kl": scores["kl"]["kl"], "held_out": history.final_eval.quality_retained,
                      "removed": history.removed_original, "seconds": time.perf_counter() - started}
        args.out.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(rows, indent=2))
        print(name, rows[name], flush=True)
    print(f"\n{args.remove} layers removed; validation: {args.blocks} x {data.seq_len} training-split tokens from "
          f"block {args.skip} of the stream (chooses); held-out: the run's own report (read only)\n")
    print("| variant | removed | validation quality retained | validation KL | held-out quality retained | s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in sorted(rows.items(), key=lambda kv: -kv[1]["validation"]):
        print(f"| {name} | {row['removed']} | {row['validation']:.3f} | {row['validation_kl']:.3f} | "
              f"{row['held_out']:.3f} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
