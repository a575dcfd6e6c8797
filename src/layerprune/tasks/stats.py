"""Per-task statistics: additive sums from one batch's logits, and their summaries.

The per-token log-probabilities and KL run a cache-sized slice of positions at a time.

Scoring a candidate reads a [B, T, V] logits tensor; a log-softmax over all of
it writes another tensor as large, and boolean-mask indexing a third. Slicing
a few dozen positions of one row at a time keeps every temporary in cache; on
SmolLM2 (49k vocabulary) it made a whole importance round 1.13x faster
(`python bench/bench.py --phases scoring`), and it is closer to a float64
reference than a full-tensor log-softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ELEMENTS_PER_SLICE = 1 << 22  # 16 MiB of fp32 logits


def slices(length: int, vocab: int, elements: int = ELEMENTS_PER_SLICE):
    step = max(1, elements // vocab)
    for start in range(0, length, step):
        yield slice(start, min(start + step, length))


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] fp32: log p(input_ids[:, t+1] | prefix up to t), for every position but the last."""
    batch, length, vocab = logits.shape
    out = torch.empty(batch, length - 1, dtype=torch.float32, device=logits.device)
    for b in range(batch):
        for s in slices(length - 1, vocab):
            part = logits[b, s].float()
            labels = input_ids[b, s.start + 1:s.stop + 1, None]
            out[b, s] = part.gather(-1, labels)[:, 0] - torch.logsumexp(part, -1)
    return out


def token_kl(logits: torch.Tensor, teacher_logits) -> torch.Tensor:
    """[B, T] fp32: KL(teacher || student) over the whole vocabulary at every position, from the
    teacher's logits or from its moments through the shared head (moments.Moments)."""
    if not isinstance(teacher_logits, torch.Tensor):
        return teacher_logits.kl(logits)
    batch, length, vocab = logits.shape
    out = torch.empty(batch, length, dtype=torch.float32, device=logits.device)
    for b in range(batch):
        for s in slices(length, vocab):
            student = F.log_softmax(logits[b, s].float(), -1)
            teacher = F.log_softmax(teacher_logits[b, s].float(), -1)
            out[b, s] = (teacher.exp() * (teacher - student)).sum(-1)
    return out


def nll_stats(logits, batch, teacher_logits=None) -> dict[str, float]:
    scored = batch.target_mask[:, :-1].bool()
    nll = -next_token_logprobs(logits, batch.input_ids)[scored]
    return {"nll_sum": nll.sum().item(), "tokens": float(scored.sum().item())}


def perplexity_summary(s: dict[str, float]) -> dict[str, float]:
    """score = 1 / perplexity, so retained = ppl_teacher / ppl_model."""
    nll = s["nll_sum"] / max(s["tokens"], 1.0)
    return {"score": math.exp(-nll), "perplexity": math.exp(nll), "nll": nll}


def kl_stats(logits, batch, teacher_logits) -> dict[str, float]:
    mask = batch.attention_mask.bool()
    return {"kl_sum": token_kl(logits, teacher_logits)[mask].sum().item(), "tokens": float(mask.sum().item())}


def kl_summary(s: dict[str, float]) -> dict[str, float]:
    """score = exp(-mean per-token KL(teacher || model)): 1.0 for the teacher itself."""
    kl = s["kl_sum"] / max(s["tokens"], 1.0)
    return {"score": math.exp(-kl), "kl": kl}


def accuracy_stats(logits, batch, teacher_logits=None) -> dict[str, float]:
    """Next tokens predicted exactly (argmax), at the positions the batch scores."""
    scored = batch.target_mask[:, :-1].bool()
    hits = logits[:, :-1].argmax(-1) == batch.input_ids[:, 1:]
    return {"correct": hits[scored].sum().item(), "tokens": float(scored.sum().item())}


def accuracy_summary(s: dict[str, float]) -> dict[str, float]:
    return {"score": s["correct"] / max(s["tokens"], 1.0)}
