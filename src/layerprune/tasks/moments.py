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

from dataclasses import dataclass

import torch

from ..heads import head
from .stats import slices

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
