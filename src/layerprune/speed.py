"""Prefill and decode throughput, measured the same way for the original and the pruned model."""

from __future__ import annotations

import time

import torch


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first calls pay for allocation and kernel selection
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def measure_speed(model, prompt_tokens: int = 256, new_tokens: int = 32, repeats: int = 3) -> dict[str, float]:
    """Tokens per second: prefill (one forward over a prompt) and decode (greedy with a KV cache)."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    prefill = _best_seconds(lambda: model(input_ids=prompt, use_cache=False), repeats)
    short = prompt[:, :16]

    def decode():
        model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)

    decode_s = _best_seconds(decode, repeats)
    return {"prefill_tokens_per_s": prompt_tokens / prefill, "decode_tokens_per_s": new_tokens / decode_s}
