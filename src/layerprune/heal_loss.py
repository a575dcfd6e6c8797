"""The loss of one healing micro-batch: which passes it runs, chosen once per healing.

The reference is the straightforward pass: the teacher and the whole student on every
micro-batch. Where the healing's text is read again, the teacher's targets come from the cache
(targets.py) and the frozen bottom of the student runs once per block (FrozenPrefix); both give
the reference's losses (tests/test_heal.py checks every combination).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .activations import capture, injected, prefix_state
from .losses import joint_loss, kl_loss, topk_kl_loss
from .surgery import num_layers
from .targets import TeacherTargets

if TYPE_CHECKING:
    from .heal_job import HealJob


class FrozenPrefix:
    """The state entering layer `start` for each training block, computed the first time the block
    is drawn and then kept: the layers below `start` are frozen, so it never changes during a
    healing. Used only when a healing passes over its blocks more than once, within
    --cache-memory (targets.plan_caches). Each block runs alone, so its state does not depend on
    the order of drawing (a resumed healing computes the same bits)."""

    def __init__(self, student, start: int):
        self.student, self.start, self.states = student, start, {}

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows = rows.tolist()
        missing = [(row, block[None]) for row, block in zip(rows, ids) if row not in self.states]
        if missing:
            training = self.student.training
            self.student.eval()
            for row, block in missing:
                self.states[row] = prefix_state(self.student, self.start, block, torch.ones_like(block))[0]
            self.student.train(training)
        return torch.stack([self.states[row] for row in rows])


def loss_step(job: "HealJob", model, student, teacher, targets: TeacherTargets | None):
    """The function `(ids, rows) -> loss terms` this healing uses, chosen once. With `targets`
    the teacher is not run; with `job.prefix_cache` the frozen bottom of the student runs once
    per block; with neither, every micro-batch runs the teacher and the whole student (the
    reference)."""
    weights = job.config
    pairs = job.pairs

    def straightforward(ids, rows):
        mask = torch.ones_like(ids)
        with torch.no_grad(), capture(teacher, final=True) as t_rec:
            t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with capture(student, final=True) as s_rec:
            s_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        kl = kl_loss(s_logits, t_logits, mask, weights.temperature)
        return joint_loss(kl, [s_rec["states"][k + 1] for k, _ in pairs], [t_rec["states"][o + 1] for _, o in pairs],
                          s_rec["final"], t_rec["final"], mask, weights)

    if targets is None and not job.prefix_cache:
        return straightforward
    start = 0 if job.config.trainable == "lora" else min(job.layers)
    prefix = FrozenPrefix(student, start) if job.prefix_cache else \
        lambda rows, ids: prefix_state(student, start, ids, torch.ones_like(ids))
    depth = num_layers(student)

    def teacher_side(ids, rows, mask):
        """(KL of student logits, target states of the pairs, target final state)."""
        if targets is not None:
            t = targets.take(rows, [o for _, o in pairs], ids.device)
            return (lambda s: topk_kl_loss(s, t["values"], t["indices"], t["lse"], mask, weights.temperature),
                    t["layers"], t["final"])
        with torch.no_grad(), capture(teacher, final=True) as t_rec:
            t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return (lambda s: kl_loss(s, t_logits, mask, weights.temperature),
                [t_rec["states"][o + 1] for _, o in pairs], t_rec["final"])

    def cached(ids, rows):
        mask = torch.ones_like(ids)
        kl_of, t_layers, t_final = teacher_side(ids, rows, mask)
        with torch.no_grad():
            entering = prefix(rows, ids)
        with injected(student, start, entering, range(start, depth)), capture(student, final=True) as s_rec:
            s_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return joint_loss(kl_of(s_logits), [s_rec["states"][k - start + 1] for k, _ in pairs], t_layers,
                          s_rec["final"], t_final, mask, weights)

    return cached
