"""The healing guard: a healing never leaves the student worse on validation text than its cut."""

import copy
import dataclasses

import pytest
import torch

from layerprune.config import HealConfig
from layerprune.healing.guard import RETRY_LR_FACTOR, Guard, loss_rises, validation_kl
from layerprune.healing.loop import heal
from layerprune.healing.job import plan
from layerprune.surgery import remove_layers

from common import teacher_with_massive_channels, tiny_model


def blocks(seed, n, length=32):
    return torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(seed))


TRAIN, VALIDATION, HELD_OUT = blocks(0, 64), blocks(1, 8), blocks(2, 8)


def plain_teacher():
    torch.manual_seed(0)
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model


def healed(teacher, config, guard=None, drop=2, **job):
    student = copy.deepcopy(teacher)
    remove_layers(student, [drop])
    planned = dataclasses.replace(plan(student, config, config.steps, 1, 0, [drop]), **job)
    return student, heal(student, teacher, TRAIN, planned, progress=False, guard=guard)


def guard_of(teacher, retries=2):
    return Guard(teacher, VALIDATION, 4, retries)


def held_out_kl(student, teacher):
    return validation_kl(student, teacher, HELD_OUT, 4)


def cut_only(teacher, drop=2):
    student = copy.deepcopy(teacher)
    remove_layers(student, [drop])
    return student


BUDGET = dict(steps=30, batch_size=2, grad_accum=2)
OLD_DEFAULTS = HealConfig(**BUDGET, mse_scale="raw", w_kl=0.01, guard=False)


def test_planted_massive_activations_old_defaults_worsen_new_defaults_improve():
    """Removing layer 4 below the planted channels: the paper's raw recipe at lr 5e-4 more than
    doubles KL to the original on held-out blocks; the defaults lower it. On this tiny model the
    per-channel loss alone still overshoots at lr 5e-4 (it did on every planted model tried); the
    guard's retry at a lower lr is what heals it, and that is what the test pins."""
    teacher = teacher_with_massive_channels()
    before = held_out_kl(cut_only(teacher, drop=4), teacher)
    old, _ = healed(teacher, OLD_DEFAULTS, drop=4)
    assert held_out_kl(old, teacher) > 2 * before
    new, log = healed(teacher, HealConfig(**BUDGET), guard_of(teacher), drop=4)
    assert held_out_kl(new, teacher) < 0.8 * before          # on blocks the guard never saw
    assert log.guard.kl_after < log.guard.kl_before and log.guard.retries >= 1


def test_a_healing_forced_to_diverge_is_rolled_back_and_recorded():
    teacher = plain_teacher()
    config = HealConfig(**BUDGET, lr=1.0, checkpoint_every=10)
    student, log = healed(teacher, config, guard_of(teacher))
    guard = log.guard
    assert guard.retries == 2 and guard.outcome == "unhealed" and guard.lr_won is None
    assert sorted({c["lr"] for c in guard.checks}, reverse=True) == [1.0, RETRY_LR_FACTOR, RETRY_LR_FACTOR ** 2]
    assert {row["attempt"] for row in log.rows} == {0, 1, 2}
    assert guard.kl_after == guard.kl_before
    # the unhealed cut, bit for bit
    for key, value in cut_only(teacher).state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
    # each diverging attempt ended at its first check, not after all 30 steps
    assert all(c["step"] == 10 for c in guard.checks)


def test_a_sound_healing_is_kept_at_the_lr_given():
    teacher = plain_teacher()
    before = held_out_kl(cut_only(teacher), teacher)
    student, log = healed(teacher, HealConfig(**BUDGET, lr=7e-4), guard_of(teacher))
    guard = log.guard
    assert guard.retries == 0 and guard.outcome in ("healed", "rolled back")
    assert guard.lr_won == 7e-4 and all(c["lr"] == 7e-4 for c in guard.checks)   # --heal-lr is honoured
    assert guard.kl_after < 0.7 * guard.kl_before
    assert held_out_kl(student, teacher) < before
    assert [c["step"] for c in guard.checks] == [10, 20, 30]


def test_the_kept_state_is_the_best_check():
    """Whatever the attempts did, the student ends on the state of the lowest check."""
    teacher = plain_teacher()
    student, log = healed(teacher, HealConfig(**BUDGET, lr=3e-2, checkpoint_every=5), guard_of(teacher))
    best = min([log.guard.kl_before, *(c["kl"] for c in log.guard.checks)])
    assert log.guard.kl_after == best
    assert validation_kl(student, teacher, VALIDATION, 4) == pytest.approx(best, rel=1e-6)


def test_a_guarded_healing_resumes_bit_identical_across_retries():
    teacher = plain_teacher()
    config = HealConfig(steps=6, batch_size=2, grad_accum=1, lr=1.0, warmup_steps=1, checkpoint_every=2)
    saved = []
    whole, whole_log = healed(teacher, config, guard_of(teacher, retries=1),
                              on_checkpoint=lambda state: saved.append(copy.deepcopy(state)))
    assert {state["attempt"] for state in saved} == {0, 1}
    for state in saved:
        resumed, log = healed(teacher, config, guard_of(teacher, retries=1), resume=state)
        assert log.rows == whole_log.rows and log.guard == whole_log.guard
        for key, value in whole.state_dict().items():
            assert torch.equal(value, resumed.state_dict()[key]), key


def test_rising_loss_is_told_from_noise():
    rows = [{"loss": x} for x in (1.0, 1.1, 0.9, 1.0, 0.8, 0.9, 0.7, 0.8)]
    assert not loss_rises(rows)
    assert loss_rises([{"loss": x} for x in (0.5, 0.4, 0.6, 0.7, 0.9, 1.0, 1.3, 1.6)])
    assert not loss_rises([{"loss": x} for x in (0.080, 0.078, 0.080, 0.088, 0.085, 0.092, 0.091, 0.083)])
    assert not loss_rises([{"loss": x} for x in (0.1, 5.0, 9.0)])   # too few steps to tell


def test_a_local_phase_is_not_a_rise():
    """Local steps' loss (an MSE alone) is below the global steps' KL + MSE: compared within a phase."""
    local = [{"loss": x, "phase": "local"} for x in (0.30, 0.25, 0.22, 0.20, 0.19, 0.18, 0.17, 0.16)]
    global_ = [{"loss": x, "phase": "global"} for x in (0.9, 0.85, 0.8, 0.8, 0.75, 0.7, 0.7, 0.68)]
    assert not loss_rises(local + global_)
    assert loss_rises(local + [{**row, "loss": 3 * row["loss"] * (i + 1)} for i, row in enumerate(global_)])
