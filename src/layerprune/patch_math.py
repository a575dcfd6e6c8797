"""The patch's arithmetic (patch.py says what it patches): the Gram sums of one cut and their
ridge solve, closed form, and ReplaceMe's cosine fit, which keeps the tokens' rows instead.
Tensors in, tensors out: nothing here touches a model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from accelerate.utils import reduce

log = logging.getLogger(__name__)

RIDGE = 1e-4          # relative to the mean diagonal of M^T M
RIDGE_FLOOR = 1e-12   # absolute, so that an all-zero M still solves to T = I
# --patch-fit normalised: a token's weight is 1 / (its target's mean square + this), so a token
# whose target is (almost) zero does not take over the fit
TOKEN_FLOOR = 1e-6


@dataclass
class Gram:
    """Float64 sums over training tokens for the patch of one cut: G = M^T M, C = M^T (L - O + M)
    (their diagonals only, for a diagonal patch)."""

    mm: torch.Tensor
    mr: torch.Tensor
    tokens: int = 0

    normalised: bool = False   # each token weighted by 1 / its target's mean square (--patch-fit normalised)

    def add(self, m: torch.Tensor, r: torch.Tensor) -> None:
        m, r = m.reshape(-1, m.shape[-1]).double(), r.reshape(-1, r.shape[-1]).double()
        wm = m / (r.pow(2).mean(-1, keepdim=True) + TOKEN_FLOOR) if self.normalised else m
        if self.mm.dim() == 1:
            self.mm += (wm * m).sum(0)
            self.mr += (wm * r).sum(0)
        else:
            self.mm += wm.T @ m
            self.mr += wm.T @ r
        self.tokens += len(m)

    def add_over_processes(self) -> None:
        """Each process summed its share of the blocks: the totals are the sums of those."""
        self.mm, self.mr = reduce(self.mm, reduction="sum"), reduce(self.mr, reduction="sum")
        self.tokens = int(reduce(torch.tensor(float(self.tokens), device=self.mm.device), reduction="sum"))


def solve(gram: Gram) -> torch.Tensor:
    """T from the Gram sums; a vector for a diagonal patch. Ridge towards the identity."""
    diagonal = gram.mm.dim() == 1
    scale = (gram.mm if diagonal else gram.mm.diagonal()).mean().item()
    alpha = RIDGE * max(scale, 0.0) + RIDGE_FLOOR
    for _ in range(6):  # an ill-conditioned system: raise the ridge until the solution is finite
        if diagonal:
            t = (gram.mr + alpha) / (gram.mm + alpha)
        else:
            eye = torch.eye(len(gram.mm), dtype=torch.float64, device=gram.mm.device)
            t = torch.linalg.solve(gram.mm + alpha * eye, gram.mr + alpha * eye)
        if torch.isfinite(t).all():
            return t
        alpha *= 1000.0
    return torch.ones_like(gram.mr) if diagonal else torch.eye(len(gram.mm), dtype=torch.float64)


@dataclass
class Samples:
    """The training tokens' rows of M and of L - O + M themselves, for the fit that has no closed
    form (--patch-fit cosine): tokens x hidden x 8 bytes, bounded by --patch-tokens."""

    diagonal: bool
    ms: list = field(default_factory=list)
    rs: list = field(default_factory=list)

    def add(self, m: torch.Tensor, r: torch.Tensor) -> None:
        self.ms.append(m.reshape(-1, m.shape[-1]).float().cpu())
        self.rs.append(r.reshape(-1, r.shape[-1]).float().cpu())

    def gram(self) -> Gram:
        hidden = self.ms[0].shape[-1]
        size = (hidden,) if self.diagonal else (hidden, hidden)
        gram = Gram(torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64))
        for m, r in zip(self.ms, self.rs):
            gram.add(m, r)
        return gram


# ReplaceMe's cosine fit (arXiv 2505.02819, its public code): Adam from the identity, minibatches
# of 1,024 tokens, 10 passes over them, on the mean cosine distance between M T and L - O + M.
COSINE_LR, COSINE_EPOCHS, COSINE_BATCH = 1e-4, 10, 1024


def cosine_distance(m: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 1 - torch.nn.functional.cosine_similarity(m * t if t.dim() == 1 else m @ t, r, dim=-1).mean()


def cosine_fit(m: torch.Tensor, r: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """ReplaceMe's schedule as published: Adam from the identity on the mean cosine distance."""
    hidden = m.shape[-1]
    t = (torch.ones(hidden) if diagonal else torch.eye(hidden)).requires_grad_(True)
    optimizer = torch.optim.Adam([t], lr=COSINE_LR)
    order = torch.Generator().manual_seed(0)
    for _ in range(COSINE_EPOCHS):
        for rows in torch.randperm(len(m), generator=order).split(COSINE_BATCH):
            optimizer.zero_grad()
            cosine_distance(m[rows], r[rows], t).backward()
            optimizer.step()
    return t.detach()


def solve_cosine(samples: Samples, fitted: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """T minimising the mean cosine distance, and how it was found: "cosine", or "lstsq" where
    the fit did not converge: it ended no closer than the identity, or than the least-squares T
    (which it exists to beat on its own measure), or not finite. The least-squares T is kept then,
    and the log says so: never NaN weights. On SmolLM2 the published schedule ended at a cosine
    distance of 0.46 where least squares reached 0.25, and that patch kept less than no patch at
    all (`python bench/bench_patch_fit.py --cuts 12-15,13-18`, docs/heal-sweep.md). `fitted`: the
    schedule's T when the caller already ran it."""
    m, r = torch.cat(samples.ms), torch.cat(samples.rs)
    t = cosine_fit(m, r, samples.diagonal) if fitted is None else fitted
    lstsq = solve(samples.gram())
    identity = torch.ones_like(t) if samples.diagonal else torch.eye(len(t))
    before, after, least = (float(cosine_distance(m, r, x)) for x in (identity, t, lstsq.float()))
    if torch.isfinite(t).all() and after < min(before, least):
        return t.double(), "cosine"
    log.info("the cosine patch fit did not converge (cosine distance: identity %.4g, the fit %.4g, least squares "
             "%.4g): the least-squares patch is kept", before, after, least)
    return lstsq, "lstsq"
