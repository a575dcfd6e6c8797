"""KL to the teacher without running the teacher again: its moments through the shared LM head.

A student keeps the teacher's LM head (W, b) unless it trains it. With h_T and h_S the states
entering the head, t = W h_T + b and s = W h_S + b the logits, and e = p_T W, one token's

    KL(p_T || p_S) = sum_v p_T (log p_T - log p_S) = lse(s) - lse(t) - e . (h_S - h_T)

(log p = logits - lse, and sum_v p_T (s_v - t_v) = e . (h_S - h_T): the bias cancels). The
teacher enters only through e and h_T, two hidden-size vectors, and lse(t), one number. So on
text that is evaluated again and again (held-out blocks after every removal, the guard's
validation blocks at every check) the teacher runs once: its moments are kept (hidden x 8 bytes
a token, bounded by the budget of that text) and every later evaluation runs the student alone.
The teacher's pass was half of an evaluation's cost. Writing the dot product against h_S - h_T,
not h_S, keeps float32's rounding at the size of the difference between the two models: on
SmolLM2 the per-token KL is within 2e-5 of a float64 reference, as the teacher's-logits path is.

The identity holds only where the logits are the head's linear map of h: a head that caps or
scales the logits (Gemma 2's soft-capping, Cohere's logit scale) is found out on the teacher's
first batch, and the teacher's logits are used as before. A student whose head differs from the
teacher's (`--trainable last`), or a sharded one, uses the teacher's logits too.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .stats import slices

# Logits recomputed from the captured head input must match the model's own within this (relative
# to their scale): otherwise the head is not plain linear and the moments would not be exact.
LINEAR_TOLERANCE = 1e-4


def head(model) -> torch.nn.Module | None:
    """The model's LM head, where it has a plain one with a weight."""
    try:
        module = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return module if isinstance(getattr(module, "weight", None), torch.Tensor) else None


def same_head(model, teacher) -> bool:
    """Whether the model's LM head is the teacher's, value for value (and neither is sharded)."""
    from ..shard import is_sharded

    mine, theirs = head(model), head(teacher)
    if mine is None or theirs is None or is_sharded(model) or is_sharded(teacher):
        return False
    if mine.weight.shape != theirs.weight.shape or not torch.equal(mine.weight, theirs.weight):
        return False
    bias, their_bias = getattr(mine, "bias", None), getattr(theirs, "bias", None)
    return (bias is None) == (their_bias is None) and (bias is None or torch.equal(bias, their_bias))


@contextmanager
def head_inputs(model) -> Iterator[dict]:
    """Within the block, `record["h"]` is the input of the model's LM head in the latest forward."""
    record: dict = {}
    module = head(model)
    handle = module.register_forward_pre_hook(lambda m, args: record.__setitem__("h", args[0]))
    try:
        yield record
    finally:
        handle.remove()


@dataclass
class Moments:
    """The teacher's side of KL on one batch: `expected` = p_T W and `anchor` = h_T [B, T, H]
    (float32), `lse` = logsumexp(t) [B, T] (float64); `h`, the student's head input [B, T, H], is
    attached for one student's forward by `against`."""

    expected: torch.Tensor
    anchor: torch.Tensor
    lse: torch.Tensor
    h: torch.Tensor | None = None

    def against(self, h: torch.Tensor) -> "Moments":
        return Moments(self.expected, self.anchor, self.lse, h)

    def __getitem__(self, rows: slice) -> "Moments":
        return Moments(self.expected[rows], self.anchor[rows], self.lse[rows], None if self.h is None else self.h[rows])

    def kl(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, T] fp32: KL(teacher || student) at every position, from the student's logits."""
        batch, length, vocab = logits.shape
        lse = torch.empty(batch, length, dtype=torch.float64, device=logits.device)
        for b in range(batch):
            for s in slices(length, vocab):
                lse[b, s] = torch.logsumexp(logits[b, s].float(), -1).double()
        moved = self.h.double() - self.anchor.to(logits.device).double()
        return (lse - self.lse.to(logits.device) - (self.expected.to(logits.device).double() * moved).sum(-1)).float()


# Positions of the first row that `linear_head` recomputes: a cap or a scale shows on any token
# (8 x the vocabulary values), and a whole batch's logits recomputed would be as large as the batch's
# logits themselves (1 GB for Gemma-3's 262K vocabulary at 4 x 256 tokens).
PROBE_TOKENS = 8


def linear_head(model, logits: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether `logits` are exactly the head's linear map of `h` (no capping or scaling), on the
    first PROBE_TOKENS positions of the first row."""
    module = head(model)
    logits, h = logits.reshape(-1, logits.shape[-1])[:PROBE_TOKENS], h.reshape(-1, h.shape[-1])[:PROBE_TOKENS]
    again = F.linear(h.to(module.weight.dtype), module.weight, getattr(module, "bias", None)).float()
    scale = logits.float().abs().amax().clamp_min(1.0)
    return bool(((again - logits.float()).abs().amax() <= LINEAR_TOLERANCE * scale).item())


def plain_head(model) -> bool:
    """Whether the model's logits are its LM head's plain linear map of its final norm's output (no
    capping or scaling), checked on 8 tokens, and it is not sharded: then a caller may apply the
    head itself, to a part of the tokens at a time."""
    from ..activations import capture, final_norm
    from ..shard import is_sharded

    if is_sharded(model) or head(model) is None or final_norm(model) is None:
        return False
    device = next(model.parameters()).device
    ids = torch.arange(PROBE_TOKENS, device=device)[None] % head(model).weight.shape[0]
    with torch.no_grad(), capture(model, inputs=False, final=True) as record:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    return linear_head(model, logits, record["final"])


@torch.no_grad()
def teacher_moments(teacher, logits: torch.Tensor | None, h: torch.Tensor) -> Moments:
    """The moments of the teacher's `logits` [B, T, V], given `h` [B, T, H] entering its head;
    without `logits` (a plain linear head), each row's logits are made from `h`, one at a time."""
    module = head(teacher)
    weight = module.weight.float()
    batch, length, _ = h.shape
    expected = torch.empty(batch, length, weight.shape[1], dtype=torch.float32, device=h.device)
    lse = torch.empty(batch, length, dtype=torch.float64, device=h.device)
    for b in range(batch):   # a whole row at a time: one large product through the head, not many small ones
        row = (logits[b] if logits is not None else module(h[b])).float()
        lse[b] = torch.logsumexp(row, -1).double()
        expected[b] = torch.softmax(row, -1) @ weight
        del row
    return Moments(expected, h.float().clone(), lse)


class MomentsMemo:
    """The teacher's moments on one fixed list of batches, per batch index, made the first time an
    evaluation needs the teacher there. Once the teacher's head turns out not to be linear, `side`
    answers None and every evaluation runs the teacher as before."""

    def __init__(self):
        self.batches: dict[int, Moments] = {}
        self.teacher_id: int | None = None
        self.usable = True

    def side(self, teacher, index: int, batch) -> Moments | None:
        from . import engine

        self._for(teacher)
        if self.usable and index not in self.batches:
            with head_inputs(teacher) as record:
                out = engine.forward_output(teacher, batch, engine.head_by_rows(teacher, batch))
            self.keep(teacher, index, out, record.get("h"))
        return self.batches.get(index) if self.usable else None

    def keep(self, teacher, index: int, out, h: torch.Tensor | None) -> None:
        """Keep the moments of the teacher's own forward on batch `index` (its logits, with `h`
        entering its head; or a FinalState, where its head was probed a plain linear map and no
        batch-wide logits were made): the pass that scores the teacher against itself fills the
        memo, and no evaluation after it runs the teacher on these batches again."""
        from ..activations import FinalState

        self._for(teacher)
        if self.usable and index not in self.batches:
            if isinstance(out, FinalState):
                self.batches[index] = teacher_moments(teacher, None, out.h)
            elif self.batches or linear_head(teacher, out, h):   # checked on the first batch
                self.batches[index] = teacher_moments(teacher, out, h)
            else:
                self.usable = False

    def _for(self, teacher) -> None:
        if self.teacher_id != id(teacher):   # another teacher: start again
            self.batches, self.teacher_id, self.usable = {}, id(teacher), True
