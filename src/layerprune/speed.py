"""Prefill and decode throughput of the original and the pruned model, side by side.

Machines are noisy: one timing of each, taken minutes apart, can show a 7%
depth cut as 1.23x faster. So the two models run interleaved (original,
pruned, original, ...) for `repeats` rounds after a warm-up, and the report
gives the median of each with its spread (min-max over the rounds), and the
median of the per-round ratios, which cancels drift shared by both.
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from .models import max_positions


def _seconds(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _workloads(model, prompt_tokens: int, new_tokens: int) -> dict:
    """name -> (function, tokens it processes)."""
    device = next(model.parameters()).device
    prompt_tokens = min(prompt_tokens, (max_positions(model) or prompt_tokens) - new_tokens)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    short = prompt[:, :16]

    def decode():
        model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)

    return {"prefill": (lambda: model(input_ids=prompt, use_cache=False), prompt_tokens),
            "decode": (decode, new_tokens)}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@torch.no_grad()
def compare_speed(original, pruned, repeats: int = 5, prompt_tokens: int = 256, new_tokens: int = 32,
                  progress: bool = False) -> dict:
    """{workload: {original, pruned: tokens/s median/min/max; ratio: pruned/original per round,
    median/min/max; repeats}}. `progress`: a bar per workload, a tick per round."""
    models = {"original": original, "pruned": pruned}
    work = {name: _workloads(model, prompt_tokens, new_tokens) for name, model in models.items()}
    result = {}
    for workload in ("prefill", "decode"):
        for name in models:  # warm-up: first calls pay for allocation and kernel selection
            work[name][workload][0]()
        rates: dict[str, list[float]] = {name: [] for name in models}
        for _ in tqdm(range(repeats), desc=f"speed: {workload}", unit="round", disable=not progress, leave=False):
            for name in models:
                fn, tokens = work[name][workload]
                rates[name].append(tokens / _seconds(fn))
        ratios = [p / o for o, p in zip(rates["original"], rates["pruned"])]
        result[workload] = {**{name: _spread(r) for name, r in rates.items()}, "ratio": _spread(ratios),
                            "repeats": repeats}
    return result


@torch.no_grad()
def prefill_speedup(model, keep: int, repeats: int = 3, prompt_tokens: int = 256) -> float:
    """Median over interleaved rounds of the prefill speed of `model` running only its first
    `keep` layers, over the whole model's: what a model pruned to `keep` layers gains here
    (which layers are kept changes the time of none but odd architectures)."""
    from .surgery import layer_view

    fn, _ = _workloads(model, prompt_tokens, 0)["prefill"]
    fn()   # warm-up
    ratios = []
    for _ in range(repeats):
        whole = _seconds(fn)
        with layer_view(model, range(keep)):
            if not ratios:
                fn()   # the shallower model's warm-up
            ratios.append(whole / _seconds(fn))
    return statistics.median(ratios)
