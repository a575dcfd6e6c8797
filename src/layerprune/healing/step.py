"""The loss of one healing micro-batch: which passes it runs, chosen once per healing.

The reference is the straightforward pass: the teacher and the whole student on every
micro-batch. Where the student's frozen bottom is still the teacher's own (no cut, patch or
healing has touched it), the teacher's pass already computes the state entering the lowest trained
layer, and the student starts there (`shares_prefix`): on SmolLM2 with the cut at layer 14 that
saves 12% of a global step (bench/bench_heal_step.py). Where the healing's text is read again,
the teacher's targets come from the cache (targets.py) and the frozen bottom of the student runs
once per block (FrozenPrefix). All give the reference's losses (tests/test_heal.py checks every
combination). A local step
(`--heal-local-steps`) runs only the trained layers below the cut's mapped state, for its MSE.

Where both LM heads are plain linear maps (`fused_head`, probed once a healing), the KL term runs
from the states entering them (losses.head_kl_loss): neither pass makes its logits for the whole
micro-batch, so no [B, T, V] tensor is held, a few dozen tokens' logits at a time instead (the
same products through the head, less memory traffic; tests/test_heal.py checks its losses and
weights against the KL on whole logits).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..activations import (capture, final_norm, forward_layers, injected, layer_outputs, logits_to_keep, prefix_state,
                          states_up_to)
from .losses import LossWeights, head_kl_loss, joint_loss, kl_loss, mse_loss, topk_kl_loss
from ..processes import averaged_over_processes
from ..shard import is_sharded
from ..surgery import find_layers, num_layers
from .targets import TeacherTargets
from ..heads import head, plain_head

if TYPE_CHECKING:
    from .job import HealJob

log = logging.getLogger(__name__)


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


def shares_prefix(student, teacher, start: int) -> bool:
    """Whether everything the student runs before layer `start` is the teacher's own, bit for bit
    (the same names, values and layer types): then the teacher's pass computes the state entering
    the student's layer `start` exactly as the student's own prefix would. Checked on the tensors,
    not on the run's bookkeeping, so a cut, a folded patch or an earlier healing below `start`
    simply turns the sharing off. A sharded model keeps its own pass."""
    if start == 0 or is_sharded(student) or is_sharded(teacher):
        return False
    types = getattr(student.config, "layer_types", None), getattr(teacher.config, "layer_types", None)
    if types[0] is not None and (types[1] is None or list(types[0][:start]) != list(types[1][:start])):
        return False
    above = [*find_layers(student).layers[start:], final_norm(student)]
    skip = {id(t) for module in above if module is not None for t in (*module.parameters(), *module.buffers())}
    theirs = {**dict(teacher.named_parameters()), **dict(teacher.named_buffers())}
    for name, tensor in (*student.named_parameters(), *student.named_buffers()):
        if id(tensor) in skip:
            continue
        other = theirs.get(name)
        same = other is not None and (other.shape, other.dtype) == (tensor.shape, tensor.dtype)
        if not same or not torch.equal(other, tensor):
            return False
    return True


def fused_head(student, teacher) -> bool:
    """Whether the KL term can run from the states entering the two LM heads (losses.head_kl_loss):
    each model's logits are its head's plain linear map of its final norm's output (no capping or
    scaling), checked on a few tokens, and neither model is sharded. Then neither pass computes
    its logits for the whole batch (`logits_to_keep`)."""
    return plain_head(student) and plain_head(teacher)


def loss_step(job: "HealJob", model, student, teacher, targets: TeacherTargets | None):
    """The function `(ids, rows) -> loss terms` this healing uses, chosen once. With `targets`
    the teacher is not run; with `job.prefix_cache` the frozen bottom of the student runs once
    per block; with neither, every micro-batch runs the teacher, and the student from the
    teacher's state where `shares_prefix`, else whole (the reference)."""
    temperature, weights = job.config.temperature, LossWeights.of(job.config)
    pairs = job.pairs
    fused = targets is None and fused_head(student, teacher)
    s_keep, t_keep = (logits_to_keep(student), logits_to_keep(teacher)) if fused else ({}, {})

    heads = (head(student), head(teacher)) if fused else None

    def online_kl(t_logits, t_final, mask):
        """The KL term against the teacher's pass, a function of the student's (logits, final state)."""
        if fused:
            return lambda s_logits, s_final: head_kl_loss(s_final, t_final, *heads, mask, temperature)
        return lambda s_logits, s_final: kl_loss(s_logits, t_logits, mask, temperature)

    def straightforward(ids, rows):
        mask = torch.ones_like(ids)
        with torch.no_grad(), capture(teacher, final=True) as t_rec:
            t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False, **t_keep).logits
        with capture(student, final=True) as s_rec:
            s_logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **s_keep).logits
        kl = online_kl(t_logits, t_rec["final"], mask)(s_logits, s_rec["final"])
        return joint_loss(kl, [s_rec["states"][k + 1] for k, _ in pairs], [t_rec["states"][o + 1] for _, o in pairs],
                          s_rec["final"], t_rec["final"], mask, weights, averaged_over_processes)

    start, shared, prefix = _prefix(job, student, teacher, targets)
    if shared:
        log.info("healing iteration %d: below layer %d the student is still the original: it starts from the "
                 "teacher's state there", job.iteration, start)
    if targets is None and not shared and not job.prefix_cache:
        return straightforward
    depth = num_layers(student)

    def teacher_side(ids, rows, mask):
        """(KL of student logits, target states of the pairs, target final state, the state
        entering the student's layer `start` where the teacher's pass gives it, else None)."""
        if targets is not None:
            t = targets.take(rows, [o for _, o in pairs], ids.device)
            return (lambda s, _: topk_kl_loss(s, t["values"], t["indices"], t["lse"], mask, temperature),
                    t["layers"], t["final"], None)
        with torch.no_grad(), capture(teacher, final=True) as t_rec:
            t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False, **t_keep).logits
        return (online_kl(t_logits, t_rec["final"], mask), [t_rec["states"][o + 1] for _, o in pairs],
                t_rec["final"], t_rec["states"][start])

    def cached(ids, rows):
        mask = torch.ones_like(ids)
        kl_of, t_layers, t_final, given = teacher_side(ids, rows, mask)
        with torch.no_grad():
            entering = given if shared else prefix(rows, ids)
        with injected(student, start, entering, range(start, depth)), capture(student, final=True) as s_rec:
            s_logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **s_keep).logits
        return joint_loss(kl_of(s_logits, s_rec["final"]), [s_rec["states"][k - start + 1] for k, _ in pairs],
                          t_layers, s_rec["final"], t_final, mask, weights, averaged_over_processes)

    return cached


def _prefix(job: "HealJob", student, teacher, targets: TeacherTargets | None):
    """(the lowest trained layer; whether the teacher's pass gives the state entering it, where the
    teacher runs and `shares_prefix`; else a function (rows, ids) -> that state: the frozen layers
    below it run once per block when the healing caches them, else on every micro-batch)."""
    start = 0 if job.config.trainable == "lora" else min(job.layers)
    if targets is None and shares_prefix(student, teacher, start):
        return start, True, None
    if job.prefix_cache:
        return start, False, FrozenPrefix(student, start)
    return start, False, lambda rows, ids: prefix_state(student, start, ids, torch.ones_like(ids))


def local_step(job: "HealJob", model, student, teacher, targets: TeacherTargets | None):
    """The loss of a local step, `(ids, rows) -> loss terms`: the trained layers at and below the
    cut's mapped state (the MSE pairs') learn the original's state there. Only the trained layers up
    to the highest pair run with gradients, from the frozen prefix's state; no layer above them,
    no final norm, no LM head (job.plan checks that a trained layer lies below a pair)."""
    start, shared, prefix = _prefix(job, student, teacher, targets)
    pairs = [(k, o) for k, o in job.pairs if k >= start]
    top = max(k for k, _ in pairs)
    originals = [o for _, o in pairs]
    config = job.config
    # a wrapper (DDP) or a sharded student finishes its forward through the head (its output unused)
    whole = model is not student or is_sharded(student)

    def local(ids, rows):
        mask = torch.ones_like(ids)
        with torch.no_grad():
            if shared:
                states = states_up_to(teacher, max(originals), ids, mask)
                wanted, entering = [states[o + 1] for o in originals], states[start]
            else:
                wanted = targets.take_layers(rows, originals, ids.device) if targets is not None else \
                    layer_outputs(teacher, originals, ids, mask)
                entering = prefix(rows, ids)
        with injected(student, start, entering, range(start, top + 1)), capture(student) as s_rec:
            forward_layers(model, ids, mask, whole)
        mse = sum(mse_loss(s_rec["states"][k - start + 1], t, mask, config.mse_scale, averaged_over_processes)
                  for (k, _), t in zip(pairs, wanted))
        zero = mse.new_zeros(())
        return {"loss": config.w_mse * mse, "kl": zero, "mse": mse, "final_mse": zero}

    return local
