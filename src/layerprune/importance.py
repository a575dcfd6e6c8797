"""The layer-importance metrics registry: bi, angular, angular_last, nll, quality.

Each metric returns one score per current layer, higher = more important.
The hidden-state metrics (bi, angular*) are pure functions of the states
entering and leaving each layer, from one forward pass. The removal metrics
(nll, quality) measure each candidate model "current minus layer i" directly.
They reuse prefixes: the state entering layer i is the same for the current
model and every candidate that removes a layer at or after i, so candidate i
runs only layers i+1.. from the cached state: L(L+1)/2 layer passes a round
instead of L^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .activations import layer_states, run_from
from .errors import LayerpruneError
from .faults import crash_point
from .surgery import layer_view, num_layers
from .tasks import Batch, Task, _to, add_stats, forward_logits, group_by_batches, nll_stats, perplexity_summary, quality_retained

class NonFiniteError(LayerpruneError):
    pass


# ---------------------------------------------------------------- pure math


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def cosine(h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine similarity of two [B, T, D] states, in fp32."""
    return F.cosine_similarity(h_a.float(), h_b.float(), dim=-1, eps=1e-8)


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ShortGPT's BI: mean over real tokens of 1 - cos(h_in, h_out)."""
    return _masked_mean(1 - cosine(h_in, h_out), mask)


def angular_distance(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor, last_only: bool) -> torch.Tensor:
    """Gromov et al.: arccos(cos(h_in, h_out)) / pi, at the last real token or averaged over all."""
    angle = torch.arccos(cosine(h_in, h_out).clamp(-1, 1)) / math.pi
    if not last_only:
        return _masked_mean(angle, mask)
    last = mask.long().cumsum(-1).argmax(-1)  # index of the last real token per row
    return angle[torch.arange(len(angle)), last].mean()


# ---------------------------------------------------------------- orchestration


@dataclass
class ScoringContext:
    """What a metric may look at: calibration batches, importance tasks, the teacher and its scores."""

    batches: list[Batch]
    tasks: list[Task] = field(default_factory=list)
    teacher: object = None
    teacher_scores: dict | None = None
    candidates: Sequence[int] | None = None   # current indices worth scoring; None = all
    reuse_prefix: bool = True
    progress: bool = True


@torch.no_grad()
def state_distances(model, batches: list[Batch], distance: Callable, span: int = 1) -> list[float]:
    """Mean over batches of distance(states[l], states[l+span], mask) for each start l."""
    device = next(model.parameters()).device
    depth = num_layers(model)
    totals = torch.zeros(depth - span + 1)
    for batch in batches:
        batch = _to(batch, device)
        states, _ = layer_states(model, batch.input_ids, batch.attention_mask)
        for l in range(depth - span + 1):
            totals[l] += distance(states[l], states[l + span], batch.attention_mask).item()
    if not torch.isfinite(totals).all():
        raise NonFiniteError("hidden states are not finite while scoring layers",
                             "the model is broken; check its weights, or use float32")
    return (totals / len(batches)).tolist()


def score_bi(model, ctx: ScoringContext) -> list[float]:
    return state_distances(model, ctx.batches, block_influence)


def score_angular(model, ctx: ScoringContext) -> list[float]:
    return state_distances(model, ctx.batches, lambda a, b, m: angular_distance(a, b, m, last_only=False))


def score_angular_last(model, ctx: ScoringContext) -> list[float]:
    return state_distances(model, ctx.batches, lambda a, b, m: angular_distance(a, b, m, last_only=True))


@torch.no_grad()
def candidate_stats(model, tasks: list[Task], candidates: Sequence[int], teacher=None,
                    reuse_prefix: bool = True, progress: bool = True) -> tuple[dict, dict]:
    """Task stats of the current model and of each candidate "current minus layer i".

    Returns (current_stats[task], stats[i][task]). Batches are the outer loop so
    only one batch's states are held at a time."""
    device = next(model.parameters()).device
    depth = num_layers(model)
    current: dict = {task.name: {} for task in tasks}
    per_candidate: dict = {i: {task.name: {} for task in tasks} for i in candidates}
    total = sum(len(batches) for batches, _ in group_by_batches(tasks)) * len(candidates)
    with tqdm(total=total, desc="scoring layers", unit="cand", disable=not progress, leave=False) as bar:
        for batches, group in group_by_batches(tasks):
            needs_teacher = any(task.needs_teacher for task in group)
            for batch in batches:
                batch = _to(batch, device)
                teacher_logits = forward_logits(teacher, batch) if needs_teacher else None
                states, logits = layer_states(model, batch.input_ids, batch.attention_mask)
                for task in group:
                    add_stats(current[task.name], task.stats(logits, batch, teacher_logits))
                for i in candidates:
                    if reuse_prefix:
                        logits = run_from(model, i, states[i], range(i + 1, depth), batch.input_ids,
                                          batch.attention_mask)
                    else:
                        with layer_view(model, [k for k in range(depth) if k != i]):
                            logits = forward_logits(model, batch)
                    for task in group:
                        add_stats(per_candidate[i][task.name], task.stats(logits, batch, teacher_logits))
                    bar.update(1)
                    crash_point("scoring")
    return current, per_candidate


def _removal_scores(model, ctx: ScoringContext, tasks: list[Task], value: Callable[[dict], float]) -> list[float]:
    """importance_i = value(current) - value(current minus i); unscored layers get NaN."""
    depth = num_layers(model)
    candidates = list(range(depth)) if ctx.candidates is None else list(ctx.candidates)
    current, per_candidate = candidate_stats(model, tasks, candidates, ctx.teacher, ctx.reuse_prefix, ctx.progress)
    base = value({t.name: t.summary(current[t.name]) for t in tasks})
    if not math.isfinite(base):
        raise NonFiniteError(f"the current model's outputs are not finite ({base}) while scoring layers",
                             "the model is broken; check its weights, or use float32")
    scores = [float("nan")] * depth
    for i in candidates:
        scores[i] = base - value({t.name: t.summary(per_candidate[i][t.name]) for t in tasks})
    return scores


def score_nll(model, ctx: ScoringContext) -> list[float]:
    """SLEB-style: the rise in calibration NLL when the layer is removed."""
    task = Task("perplexity", ctx.batches, nll_stats, perplexity_summary)
    return _removal_scores(model, ctx, [task], lambda s: -s["perplexity"]["nll"])


def score_quality(model, ctx: ScoringContext) -> list[float]:
    """The paper's measure: quality retained (relative to the teacher) lost by removing the layer."""
    if not ctx.tasks or ctx.teacher_scores is None:
        raise ValueError("the quality metric needs tasks and the teacher's scores on them")
    return _removal_scores(model, ctx, ctx.tasks, lambda s: quality_retained(s, ctx.teacher_scores))


METRICS: dict[str, Callable[[object, ScoringContext], list[float]]] = {
    "bi": score_bi,
    "angular": score_angular,
    "angular_last": score_angular_last,
    "nll": score_nll,
    "quality": score_quality,
}
# Metrics that run the model once per candidate; a shortlist narrows their candidates.
REMOVAL_METRICS = ("nll", "quality")


def score_layers(model, metric: str, ctx: ScoringContext) -> list[float]:
    return METRICS[metric](model, ctx)
