"""The layer-importance metrics registry (bi, angular, angular_last, nll, quality, reverse) and
the choice of what to remove (least important layers, or the most redundant block).

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

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from accelerate.utils import reduce
from tqdm.auto import tqdm

from .activations import layer_states, run_from, states_up_to
from .config import REMOVAL_METRICS
from .errors import LayerpruneError, NonFiniteError
from .faults import crash_point
from .patch import capture_mlp_outputs, patched_state, paths
from .surgery import layer_view, num_layers
from .tasks import Batch, Task, collect_stats, my_share, nll_stats, perplexity_summary, quality_retained
from .tasks.engine import add_stats, forward_output


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


# Causal attention makes the state at position t exactly the last-token state of the text up to t,
# so one block holds several of Gromov et al.'s last-token samples: its last real token and every
# LAST_TOKEN_STRIDE-th before it, down to LAST_TOKEN_MIN tokens of context. With one sample per
# block, the default 8 calibration blocks chose a block at -6 on SmolLM2 that kept 0.102 of the
# original (37 blocks: 0.556; docs/results.md).
LAST_TOKEN_STRIDE, LAST_TOKEN_MIN = 32, 64


def last_token_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of the last-token samples of each row of `mask` [B, T]."""
    rows, positions = [], []
    for row, length in enumerate(mask.long().sum(-1).tolist()):
        ends = list(range(length - 1, LAST_TOKEN_MIN - 2, -LAST_TOKEN_STRIDE)) or [length - 1]
        rows += [row] * len(ends)
        positions += ends
    return torch.tensor(rows, device=mask.device), torch.tensor(positions, device=mask.device)


def angular_distance(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor, last_only: bool) -> torch.Tensor:
    """Gromov et al.: arccos(cos(h_in, h_out)) / pi, at the last-token samples (each row's last
    real token and the prefix ends before it, `last_token_positions`) or averaged over all."""
    angle = torch.arccos(cosine(h_in, h_out).clamp(-1, 1)) / math.pi
    if not last_only:
        return _masked_mean(angle, mask)
    rows, positions = last_token_positions(mask)
    return angle[rows, positions].mean()


# ---------------------------------------------------------------- orchestration

# A screened scoring's first stage reads this fraction (1/N) of the calibration batches.
SCREEN_FRACTION = 4


@dataclass
class ScoringContext:
    """What a metric may look at: calibration batches, importance tasks, the teacher and its scores."""

    batches: list[Batch]
    tasks: list[Task] = field(default_factory=list)
    teacher: object = None
    teacher_scores: dict | None = None
    candidates: Sequence[int] | None = None   # current indices worth scoring; None = all
    patches: dict | None = None               # candidate i -> its linear patch T (patch.py); None = plain cuts
    reuse_prefix: bool = True
    progress: bool = True
    screen: int | None = None   # the removal metrics: only this many candidates go past the first stage
    # the removal metrics score patched candidates: candidates -> their patches (patch.candidate_patches)
    fit_patches: Callable[[list[int]], dict] | None = None


@torch.no_grad()
def state_distances(model, batches: list[Batch], distance: Callable, span: int = 1) -> list[float]:
    """Mean over batches of distance(states[l], states[l+span], mask) for each start l."""
    device = next(model.parameters()).device
    depth = num_layers(model)
    totals = torch.zeros(depth - span + 1)
    for batch, counts in my_share(batches, model):
        batch = batch.to(device)
        states = states_up_to(model, depth - 1, batch.input_ids, batch.attention_mask)   # no LM head
        for start in range(depth - span + 1):
            totals[start] += counts * distance(states[start], states[start + span], batch.attention_mask).item()
    totals = reduce(totals, reduction="sum")   # each process ran its share of the batches
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


def score_reverse(model, ctx: ScoringContext) -> list[float]:
    """Reverse order ("Reassessing Layer Pruning in LLMs", arXiv 2411.15558): the deeper a layer,
    the less important; the final layer is no candidate (NaN: unscored). No model pass at all."""
    depth = num_layers(model)
    return [float(depth - i) for i in range(depth - 1)] + [math.nan]


def candidate_stats(model, tasks: list[Task], candidates: Sequence[int], teacher=None,
                    reuse_prefix: bool = True, progress: bool = True, patches: dict | None = None,
                    part: slice | None = None) -> tuple[dict, dict]:
    """Task stats of the current model and of each candidate "current minus layer i", collected by
    the tasks' own loop: per batch, one pass captures the states entering every layer, and each
    candidate runs from its cached state. With `patches`, candidate i is "minus layer i, patched":
    the same pass captures the MLP output of layer i-1, so the patched state costs no layer pass.
    `part`: only these of the tasks' batches. Returns (current_stats[task], stats[i][task])."""
    patches = patches or {}
    if patches and not reuse_prefix:
        raise ValueError("patched candidates are scored from cached states only")
    depth = num_layers(model)
    batches = {id(task.batches): len(task.batches[part or slice(None)]) for task in tasks if task.run is None}
    bar = tqdm(total=sum(batches.values()) * len(candidates), desc="scoring layers", unit="cand",
               disable=not progress, leave=False)

    def outputs(batch: Batch, rows: bool):
        with capture_mlp_outputs(model, {i - 1 for i in patches}) as mlp:
            states, logits = layer_states(model, batch.input_ids, batch.attention_mask, final=rows)
        yield "current", logits
        del logits   # a variant's [B, T, V] logits are gone before the next one is made
        for i in candidates:
            if reuse_prefix:
                start = patched_state(states[i], mlp[i - 1], patches[i]) if i in patches else states[i]
                logits = run_from(model, i, start, range(i + 1, depth), batch.input_ids, batch.attention_mask,
                                  final=rows)
            else:
                with layer_view(model, [k for k in range(depth) if k != i]):
                    logits = forward_output(model, batch, rows)
            yield i, logits
            del logits
            bar.update(1)
            crash_point("scoring")

    with bar:
        totals = collect_stats(model, tasks, teacher, outputs, part)
    return totals["current"], {i: totals[i] for i in candidates}


def _added(first: dict, second: dict) -> dict:
    """{task: sums} of two disjoint sets of batches, added."""
    total = {name: dict(sums) for name, sums in first.items()}
    for name, sums in second.items():
        add_stats(total.setdefault(name, {}), sums)
    return total


def _patching(t: torch.Tensor):
    """A forward hook making a layer write M T instead of M: what `fold` does to its weights."""
    def hook(module, args, out):
        m = out[0] if isinstance(out, tuple) else out
        patched = (m.double() * t if t.dim() == 1 else m.double() @ t.to(m.device)).to(m.dtype)
        return (patched, *out[1:]) if isinstance(out, tuple) else patched
    return hook


@contextmanager
def candidate_view(model, i: int, patch: torch.Tensor | None = None) -> Iterator[None]:
    """The model as candidate i: "current minus layer i", patched where `patch` is given (layer
    i - 1 writes M T), for the tasks that run a whole model (a benchmark suite)."""
    depth = num_layers(model)
    handle = paths(model)[i - 1].writer.register_forward_hook(_patching(patch)) if patch is not None else None
    try:
        with layer_view(model, [k for k in range(depth) if k != i]):
            yield
    finally:
        if handle is not None:
            handle.remove()


def run_task_summaries(model, ctx: ScoringContext, tasks: list[Task], candidates: Sequence[int]
                       ) -> tuple[dict, dict[int, dict]]:
    """The whole-model tasks' summaries (a suite on its calibration items) of the current model
    and of each candidate: one run of each task per candidate, the costly part of such scoring."""
    patches = ctx.patches or {}
    current = {task.name: task.run(model, ctx.teacher) for task in tasks}
    per: dict[int, dict] = {}
    for i in tqdm(candidates, desc="scoring layers on the suite", unit="cand", disable=not ctx.progress, leave=False):
        with candidate_view(model, i, patches.get(i)):
            per[i] = {task.name: task.run(model, ctx.teacher) for task in tasks}
        crash_point("scoring")
    return current, per


def _removal_scores(model, ctx: ScoringContext, tasks: list[Task], value: Callable[[dict], float]) -> list[float]:
    """importance_i = value(current) - value(current minus i); unscored layers get NaN.

    With `ctx.screen` (k) and more candidates than k, scoring runs in two stages: every candidate
    on the first quarter of the calibration batches, then only the k least important of those on
    the rest. A survivor's score is over all the batches, exactly what scoring every candidate
    everywhere gives it; a screened-out candidate keeps its first-stage score. The choice is the
    unscreened one whenever its winner is among the first stage's k best (bench/bench_screen.py
    measures how often, and what it saves: candidates far below the cut run most of the model)."""
    depth = num_layers(model)
    candidates = list(range(depth)) if ctx.candidates is None else list(ctx.candidates)
    whole = [task for task in tasks if task.run is not None]
    tasks = [task for task in tasks if task.run is None]
    ran, ran_per = run_task_summaries(model, ctx, whole, candidates) if whole else ({}, {})

    def stats(which: Sequence[int], part: slice | None) -> tuple[dict, dict]:
        if not tasks:
            return {}, {i: {} for i in which}
        return candidate_stats(model, tasks, which, ctx.teacher, ctx.reuse_prefix, ctx.progress, ctx.patches, part)

    def scored(current: dict, per_candidate: dict) -> dict[int, float]:
        base = value({**{t.name: t.summary(current[t.name]) for t in tasks}, **ran})
        if not math.isfinite(base):
            raise NonFiniteError(f"the current model's outputs are not finite ({base}) while scoring layers",
                                 "the model is broken; check its weights, or use float32")
        return {i: base - value({**{t.name: t.summary(sums[t.name]) for t in tasks}, **ran_per.get(i, {})})
                for i, sums in per_candidate.items()}

    first = max(1, len(ctx.batches) // SCREEN_FRACTION)
    if ctx.screen and len(candidates) > ctx.screen and len(ctx.batches) > first:
        head, early = stats(candidates, slice(0, first))
        by_layer = scored(head, early)
        survivors = _lowest([by_layer.get(i, math.nan) for i in range(depth)], candidates, ctx.screen)
        tail, late = stats(survivors, slice(first, None))
        by_layer.update(scored(_added(head, tail), {i: _added(early[i], late[i]) for i in survivors}))
    else:
        by_layer = scored(*stats(candidates, None))
    return [by_layer.get(i, math.nan) for i in range(depth)]


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
    "reverse": score_reverse,
    "nll": score_nll,
    "quality": score_quality,
}


def score_layers(model, metric: str, ctx: ScoringContext) -> list[float]:
    return METRICS[metric](model, ctx)


def check_metric(name: str) -> None:
    if name not in METRICS:
        raise LayerpruneError(f"unknown metric {name!r}", f"use one of {', '.join(METRICS)}")


# ---------------------------------------------------------------- what to remove


@dataclass
class Selection:
    """One scoring's outcome: a score per current layer (NaN where not scored), the current
    indices to remove, and how the candidates were narrowed."""

    scores: list[float]
    drop: list[int]
    shortlist: list[int] | None = None
    block_start: int | None = None
    # the candidates' fitted patches, which the cut reuses (not recorded: a resumed cut refits its own)
    patches: dict | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {"scores": self.scores, "drop": self.drop, "shortlist": self.shortlist, "block_start": self.block_start}


def _lowest(scores: list[float], candidates: Sequence[int], count: int) -> list[int]:
    scored = [i for i in candidates if scores[i] == scores[i]]
    return sorted(sorted(scored, key=lambda i: scores[i])[:count])


def shortlisted(model, metric: str, ctx: ScoringContext, shortlist: int | None) -> list[int] | None:
    """The `shortlist` candidates Block Influence ranks least important, which alone a removal
    metric then scores (and alone get a candidate patch fitted); None where nothing is narrowed."""
    candidates = list(ctx.candidates if ctx.candidates is not None else range(num_layers(model)))
    if not shortlist or metric not in REMOVAL_METRICS or len(candidates) <= shortlist:
        return None
    return _lowest(score_bi(model, ctx), candidates, shortlist)


def select_layers(model, metric: str, mode: str, count: int, ctx: ScoringContext,
                  shortlist: int | None = None) -> Selection:
    """What to remove now. iterative: the least important layer; one-shot: the `count` least
    important of one scoring; block: the contiguous run of `count` candidates whose input and
    output states are closest (Gromov et al.). A removal metric scores only the `shortlist` and,
    with `ctx.fit_patches`, patched candidates (their patches come back in the selection)."""
    if mode != "block":
        narrowed = shortlisted(model, metric, ctx, shortlist)
        candidates = list(narrowed or (ctx.candidates if ctx.candidates is not None else range(num_layers(model))))
        patches = ctx.fit_patches(candidates) if ctx.fit_patches is not None and metric in REMOVAL_METRICS else None
        scores = score_layers(model, metric, dataclasses.replace(ctx, candidates=candidates, patches=patches))
        drop = _lowest(scores, candidates, 1 if mode == "iterative" else count)
        return Selection(scores, drop, shortlist=narrowed, patches=patches)
    distance = block_influence if metric == "bi" else (
        lambda a, b, m: angular_distance(a, b, m, last_only=metric == "angular_last"))
    by_start = state_distances(model, ctx.batches, distance, span=count)
    allowed = set(ctx.candidates)
    starts = [s for s in range(len(by_start)) if set(range(s, s + count)) <= allowed]
    start = min(starts, key=lambda s: by_start[s])
    scores = [float("nan")] * num_layers(model)
    for s in starts:
        scores[s] = by_start[s]
    return Selection(scores, list(range(start, start + count)), block_start=start)
