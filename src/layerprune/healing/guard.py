"""The healing guard: a healing never leaves the student worse than the cut it started from.

Healing's loss is a proxy (KL/100 plus hidden-state MSE); what a user cares about is how close the
student's output distribution stays to the original's. On a model whose hidden states have another
scale than the one a recipe was chosen on, the proxy can fall while the output drifts, or rise
outright. So every healing is watched on validation blocks (training-split text past everything
healing reads, never the held-out text): KL to the original is measured before healing, at every
checkpoint step and at the end, and the best state seen is kept, the unhealed cut included.

An attempt fails when it ends worse than the cut, or its training loss rises; a check far above the
start ends it early. A failed attempt is rolled back to the best state and retried at a quarter of
its learning rate, up to `--heal-guard-retries` times. Whatever happens, the healing ends on the
best state seen, so on validation text it is never worse than the cut.

The guard's state (the checks so far and the best trained parameters) goes into every healing
checkpoint, so a resumed run takes the same decisions as one never interrupted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..tasks import TaskData, build_tasks, evaluate_tasks


# Each retry's learning rate, relative to the attempt before it.
RETRY_LR_FACTOR = 0.25
# A check this many times the starting KL ends the attempt at once: it is diverging.
ABORT_FACTOR = 1.5
# The training loss "rises" when the mean of an attempt's last quarter of steps exceeds the mean of
# its first quarter by this factor. Healing SmolLM2 on fresh text, a loss that did not move had
# quarter means 6% apart (and its validation KL fell), so only a rise well beyond that counts.
RISE_FACTOR = 1.25


def kl_task(blocks: torch.Tensor, batch_size: int):
    """The held-out `kl` task on the validation blocks: the project's one KL evaluation, which
    also splits its batches across processes under `accelerate launch`."""
    return build_tasks(["kl"], TaskData(None, blocks, [], batch_size))[0]


def as_kl_task(blocks_or_task, batch_size: int):
    """The `kl_task` of validation blocks [n, seq_len], or the task itself when given one."""
    return kl_task(blocks_or_task, batch_size) if isinstance(blocks_or_task, torch.Tensor) else blocks_or_task


def validation_kl(student, teacher, blocks_or_task, batch_size: int = 4) -> float:
    """Mean per-token KL(original || student) over validation blocks [n, seq_len] (or their
    `kl_task`), in eval mode."""
    task = as_kl_task(blocks_or_task, batch_size)
    training = student.training
    student.eval()
    try:
        return evaluate_tasks(student, [task], teacher)["kl"]["kl"]
    finally:
        student.train(training)


def loss_rises(rows: list[dict]) -> bool:
    """Whether an attempt's training loss rose: its last quarter of steps against its first, within
    the phase it ended in (a local step's loss, an MSE alone, does not compare with a global one's)."""
    rows = [row for row in rows if row.get("phase") == rows[-1].get("phase")] if rows else rows
    quarter = len(rows) // 4
    if quarter < 2:
        return False
    first = sum(row["loss"] for row in rows[:quarter]) / quarter
    last = sum(row["loss"] for row in rows[-quarter:]) / quarter
    return last > first * RISE_FACTOR


def trained_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trained(model, state: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.copy_(state[name])


@dataclass
class GuardLog:
    """What the guard saw and kept, as history.json records it. `best` is where the kept state
    came from: attempt and step, step 0 being the unhealed cut."""

    kl_before: float
    checks: list[dict] = field(default_factory=list)   # {"attempt", "step", "lr", "kl"}
    best: dict = field(default_factory=dict)            # {"attempt", "step", "lr", "kl"}
    retries: int = 0
    lr_won: float | None = None
    outcome: str = ""   # healed | rolled back | unhealed
    kl_after: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def next_lr(self) -> float:
        """Where the next healing starts: the learning rate that won, else the lowest one tried."""
        return self.lr_won if self.lr_won is not None else min(check["lr"] for check in self.checks)

    def sentence(self) -> str:
        """One line for the log and the model card."""
        tried = sorted({check["lr"] for check in self.checks}, reverse=True)
        where = f"step {self.best['step']} of attempt {self.best['attempt'] + 1}"
        lrs = ", ".join(f"{lr:.3g}" for lr in tried)
        if self.outcome == "unhealed":
            return (f"healing could not improve on the cut (validation KL {self.kl_before:.4f}; lr {lrs} tried): "
                    "the unhealed cut is kept")
        retried = f" after {self.retries} retr{'y' if self.retries == 1 else 'ies'} (lr {lrs})" if self.retries else ""
        rolled = f", rolled back to {where}" if self.outcome == "rolled back" else ""
        return (f"validation KL {self.kl_before:.4f} -> {self.kl_after:.4f} at lr {self.lr_won:.3g}"
                f"{retried}{rolled}")


class Guard:
    """The guard of one healing: measure, remember the best, decide whether an attempt failed."""

    def __init__(self, teacher, blocks_or_task, batch_size: int, retries: int):
        """`blocks_or_task`: the validation blocks, or their `kl_task` (one task for every healing of
        a run keeps the teacher's moments: the teacher runs on them once, moments.py)."""
        self.teacher, self.task, self.retries = teacher, as_kl_task(blocks_or_task, batch_size), retries
        self.log: GuardLog | None = None
        self.best_state: dict[str, torch.Tensor] = {}

    def measure(self, model) -> float:
        return validation_kl(model, self.teacher, self.task)

    def start(self, model, lr: float) -> None:
        """The unhealed cut: the first best state."""
        kl = self.measure(model)
        self.log = GuardLog(kl, best={"attempt": 0, "step": 0, "lr": lr, "kl": kl})
        self.best_state = trained_state(model)

    def check(self, model, attempt: int, step: int, lr: float) -> bool:
        """Measure at a checkpoint step; False when the attempt is diverging and should end now."""
        kl = self.measure(model)
        point = {"attempt": attempt, "step": step, "lr": lr, "kl": kl}
        self.log.checks.append(point)
        if kl < self.log.best["kl"]:
            self.log.best, self.best_state = point, trained_state(model)
        return kl <= ABORT_FACTOR * self.log.kl_before

    def failure(self, rows: list[dict]) -> str | None:
        """Why the attempt whose rows these are failed (it ended worse than the cut, or its loss
        rose), or None."""
        last = self.log.checks[-1]["kl"]
        if last > self.log.kl_before:
            return f"validation KL {last:.4f} is above the cut's {self.log.kl_before:.4f}"
        if loss_rises(rows):
            return "its training loss rose"
        return None

    def finish(self, model, retries: int) -> GuardLog:
        """Keep the best state seen (load it unless the model holds it) and say what happened."""
        log = self.log
        last = log.checks[-1] if log.checks else log.best
        if last != log.best:
            load_trained(model, self.best_state)
        log.retries = retries
        log.kl_after = log.best["kl"]
        if log.best["step"] == 0:
            log.outcome, log.lr_won = "unhealed", None
        else:
            log.outcome = "healed" if last == log.best else "rolled back"
            log.lr_won = log.best["lr"]
        return log

    def state(self) -> dict:
        """For the healing checkpoint."""
        return {"log": asdict(self.log), "best": self.best_state}

    def restore(self, state: dict) -> None:
        self.log, self.best_state = GuardLog(**state["log"]), state.get("best", {})   # --fsdp: from the shards
