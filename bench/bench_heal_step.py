"""What a healing step costs, local beside global: SmolLM2-135M with one layer removed, healed on
the embedded training text with the default recipe (trained layers: the cut's two neighbours on
each side), its steps all local (`--heal-local-steps`, MSE at the cut's mapped state, no LM head,
no layer above it) or all global (teacher and student through the head, KL + MSE), in float32 or
under bfloat16 autocast; and the global step as it was before the student started from the
teacher's state below its lowest trained layer (heal_loss.shares_prefix), running its own frozen
prefix, and before its KL ran from the heads' inputs a chunk of tokens at a time
(heal_loss.fused_head), on whole [B, T, V] logits.

    python bench/bench_heal_step.py               # 3 repeats of 6 steps each, interleaved; medians
    python bench/bench_heal_step.py --model embedded:gemma3-270m --layer 8 --phases global,whole-logits

Prints seconds per step of each phase from the same run and their ratio: the exchange rate a
recipe pays when it trades global steps for local ones at equal wall-clock time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time


# phase -> its row's name
PHASES = {"local": "local", "global": "global", "bf16": "global, bf16 autocast (--mixed-precision bf16)",
          "own-prefix": "global, own prefix (before 2026-12-04)",
          "whole-logits": "global, whole logits (before the fused KL)"}


def main() -> None:
    from layerprune.healing import step as heal_loss
    from layerprune.config import DataConfig, HealConfig
    from layerprune.data import load_corpus
    from layerprune.healing.loop import heal
    from layerprune.healing.job import plan
    from layerprune.models import load_model
    from layerprune.surgery import remove_layers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per timed healing")
    parser.add_argument("--layer", type=int, default=14, help="the layer removed")
    parser.add_argument("--model", help="a .gguf file, HF folder or embedded: name (default: the embedded SmolLM2)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"some of {', '.join(PHASES)}")
    args = parser.parse_args()
    phases = args.phases.split(",")
    if "global" not in phases or set(phases) - set(PHASES):
        raise SystemExit(f"--phases: some of {', '.join(PHASES)}, global among them (the ratios' base)")
    teacher, tokenizer = load_model(args.model, "float32", "cpu")
    config = HealConfig(steps=args.steps, guard=False)
    count = config.blocks_per_removal(DataConfig().seq_len)
    text = load_corpus(DataConfig(), tokenizer).train.take(count)[0]
    shares, fused = heal_loss.shares_prefix, heal_loss.fused_head
    seconds: dict[str, list[float]] = {phase: [] for phase in PHASES if phase in phases}
    for _ in range(args.repeats):
        for phase in seconds:
            student = copy.deepcopy(teacher)
            remove_layers(student, [args.layer])
            local = args.steps if phase == "local" else 0
            heal_loss.shares_prefix = (lambda *a: False) if phase == "own-prefix" else shares
            heal_loss.fused_head = (lambda *a: False) if phase == "whole-logits" else fused
            precision = "bf16" if phase == "bf16" else "no"
            job = plan(student, HealConfig(steps=args.steps, guard=False, local_steps=local, mixed_precision=precision),
                       args.steps,
                       iteration=1, seed=0, dropped=[args.layer])
            started = time.perf_counter()
            heal(student, teacher, text, job, progress=False)
            seconds[phase].append((time.perf_counter() - started) / args.steps)
            print(f"{phase}: {seconds[phase][-1]:.2f} s a step", flush=True)
    medians = {phase: statistics.median(values) for phase, values in seconds.items()}
    print(f"\n{args.steps} steps of {config.batch_size * config.grad_accum} blocks of {DataConfig().seq_len} tokens, "
          f"layer {args.layer} removed, trained layers {job.layers}, medians of {args.repeats}\n")
    print("| phase | s a step | against global |")
    print("| --- | --- | --- |")
    for phase, median in medians.items():
        print(f"| {PHASES[phase]} | {median:.2f} | {median / medians['global']:.2f} |")


if __name__ == "__main__":
    main()
