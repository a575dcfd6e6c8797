"""What the healing's fused KL through the LM head (losses.head_kl_loss) costs per slice size: one
micro-batch's forward and backward at SmolLM2's shapes (2 x 256 tokens, hidden 576, vocabulary
49,152), every slice size in the same run, interleaved; medians of the repeats after a warm-up.

    python bench/bench_head_kl.py
    python bench/bench_head_kl.py --vocab 262144 --hidden 640 --sizes 16,32     # Gemma-3's head

Prints each size's seconds beside the evaluation's 16 MiB slices (tasks.stats.ELEMENTS_PER_SLICE).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from layerprune.healing import losses
from layerprune.tasks.stats import ELEMENTS_PER_SLICE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="tokens of one micro-batch")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--sizes", default="16,24,32,48", help="MiB of float32 logits per slice")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    base = ELEMENTS_PER_SLICE * 4 >> 20
    sizes = sorted({base, *(int(size) for size in args.sizes.split(","))})
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    h = torch.randn(1, args.tokens, args.hidden, requires_grad=True)
    teacher_h = h.detach() + 0.1 * torch.randn_like(h)
    mask = torch.ones(1, args.tokens)
    seconds: dict[int, list[float]] = {size: [] for size in sizes}
    for repeat in range(args.repeats + 1):   # the first round warms up
        for size in sizes:
            losses.HEAD_KL_ELEMENTS = size << 18
            started = time.perf_counter()
            losses.head_kl_loss(h, teacher_h, head, head, mask).backward()
            if repeat:
                seconds[size].append(time.perf_counter() - started)
    print(f"\n{args.tokens} tokens, hidden {args.hidden}, vocabulary {args.vocab}: forward + backward, "
          f"medians of {args.repeats}\n")
    print(f"| MiB a slice | tokens a slice | s | against {base} MiB |")
    print("| --- | --- | --- | --- |")
    medians = {size: statistics.median(values) for size, values in seconds.items()}
    for size, median in medians.items():
        print(f"| {size} | {(size << 18) // args.vocab} | {median:.3f} | {median / medians[base]:.2f} |")


if __name__ == "__main__":
    main()
