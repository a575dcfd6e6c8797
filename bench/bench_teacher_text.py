"""What writing the original's own healing text costs (--train-data teacher), by generation
batch: tokens a second with the embedded SmolLM2, prompts from the embedded training stream
through its chat template, each continued to 256 tokens in all, the batches one after the other.

    python bench/bench_teacher_text.py --batches 16,64     # alone: about 2 minutes

Prints each batch's seconds, tokens and tokens a second from the same run.
"""

from __future__ import annotations

import argparse
import itertools
import time


def main() -> None:
    from layerprune.data import TrainStream
    from layerprune.models import load_model
    from layerprune.healing.teacher_text import prompt_ids, sample_continuations

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="16,64", help="comma-separated prompts per generation batch")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    sizes = [int(size) for size in args.batches.split(",")]
    teacher, tokenizer = load_model(None, "float32", "cpu")
    stream = TrainStream(None, "text", tokenizer, args.seq_len)
    blocks = [block for block, _ in itertools.islice(stream.blocks(), max(sizes))]
    print("| prompts a batch | s | tokens | tokens/s |")
    print("| --- | --- | --- | --- |")
    for size in sizes:
        prompts = [prompt_ids(tokenizer, block) for block in blocks[:size]]
        started = time.perf_counter()
        texts = sample_continuations(teacher, tokenizer, prompts, args.seq_len, seed=0)
        seconds = time.perf_counter() - started
        tokens = sum(len(text) for text in texts)
        print(f"| {size} | {seconds:.1f} | {tokens} | {tokens / seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
