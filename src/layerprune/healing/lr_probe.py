"""The healing learning rate, chosen before the steps are spent: a short probe on validation text.

Why: the guard rescues a healing whose learning rate does not fit the model, but only after whole
attempts are spent. A 0.5B instruction-tuned model of another family, one removal, every default:
lr 5e-4 took the validation KL from 0.045 to 0.240, 1.25e-4 to 0.072, and only the third attempt
(3.1e-5) healed; two of three attempts wasted. Which rung of that ladder fits shows within a few
steps, so the probe walks the guard's own ladder (the configured lr, then a quarter of it each rung,
as many rungs as the guard has attempts) for `PROBE_STEPS` steps each from the cut, on the start of
the healing's own training text, measures KL to the original on the guard's validation blocks,
puts the cut back, and the healing starts at the rung that lowered that KL most. It walks down
only while each rung does better than the one above, so where the configured lr fits, the probe
costs two short runs.

It runs at the first healing of a run; the lr it chose is carried to later healings as the
guard's winner is. Its record (each rung's KL, the choice, its seconds) goes into the healing's
log and into every healing checkpoint, so a resumed run does not probe again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch

from ..errors import NonFiniteError
from .guard import RETRY_LR_FACTOR, Guard
from .job import HealJob
from .loop import heal, trained_modules

log = logging.getLogger(__name__)

# Optimizer steps per rung: the 0.5B model's KL had risen fivefold by step 10 at the lr that did
# not fit; the planted-activation test model shows it within 8 (tests/test_lr_probe.py).
PROBE_STEPS = 8
# Warm-up steps of a probe: the rung's lr is reached by its third step, so what is measured is that
# lr's effect, not the warm-up's.
PROBE_WARMUP = 2


@dataclass(frozen=True)
class ProbeLog:
    """What the probe tried and chose, as history.json records it."""

    steps: int
    kl_before: float
    tried: list[dict]   # {"lr", "kl"} for each rung run, top down
    chosen: float
    seconds: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def sentence(self) -> str:
        rungs = "; ".join(f"{rung['lr']:.3g} -> {rung['kl']:.4f}" for rung in self.tried)
        return (f"lr probe ({self.steps} steps a rung, validation KL {self.kl_before:.4f} before): {rungs}; "
                f"healing starts at {self.chosen:.3g} ({self.seconds:.0f} s)")


def choose(kl_before: float, tried: list[dict]) -> float:
    """The rung with the lowest KL below the cut's; none below it: the lowest lr tried (the guard
    then decides whether anything heals)."""
    better = [rung for rung in tried if math.isfinite(rung["kl"]) and rung["kl"] < kl_before]
    if not better:
        return min(rung["lr"] for rung in tried)
    return min(better, key=lambda rung: (rung["kl"], -rung["lr"]))["lr"]


def _snapshot(modules: list[torch.nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{name: p.detach().clone() for name, p in module.named_parameters()} for module in modules]


@torch.no_grad()
def _put_back(modules: list[torch.nn.Module], saved: list[dict[str, torch.Tensor]]) -> None:
    for module, state in zip(modules, saved):
        for name, p in module.named_parameters():
            p.copy_(state[name])


def probe_lr(student, teacher, text, job: HealJob, targets, guard: Guard, accelerator, progress: bool = False
             ) -> ProbeLog:
    """Run the ladder on `student` (the cut, unhealed) and leave it as it was."""
    started = time.perf_counter()
    modules = trained_modules(student, job.layers, job.config)
    saved = _snapshot(modules)
    kl_before = guard.measure(student)
    config = dataclasses.replace(job.config, warmup_steps=min(PROBE_WARMUP, job.config.warmup_steps),
                                 checkpoint_every=0)
    tried: list[dict] = []
    for rung in range(guard.retries + 1):
        lr = job.start_lr * RETRY_LR_FACTOR ** rung
        short = dataclasses.replace(job, config=config, steps=PROBE_STEPS, lr=lr, resume=None, on_checkpoint=None,
                                    local_steps=min(job.local_steps, PROBE_STEPS // 2), label=f"lr probe at {lr:.3g}")
        try:
            heal(student, teacher, text, short, targets, progress, None, accelerator)
            kl = guard.measure(student)
        except NonFiniteError:
            kl = math.inf
        _put_back(modules, saved)
        tried.append({"lr": lr, "kl": kl})
        log.info("lr probe, iteration %d: lr %.3g -> validation KL %.4f (the cut: %.4f)", job.iteration, lr, kl,
                 kl_before)
        if len(tried) > 1 and not kl < tried[-2]["kl"]:
            break   # past the best rung: lower rungs heal more slowly still
    result = ProbeLog(PROBE_STEPS, kl_before, tried, choose(kl_before, tried), time.perf_counter() - started)
    log.info("healing iteration %d: %s", job.iteration, result.sentence())
    return result
