"""Healing: distil the pruned student towards the ORIGINAL teacher, on Accelerate.

Lifecycle of one healing: `job.plan()` turns a removal into a `HealJob`
(where the cuts are, which layers train, which layer outputs the MSE term
matches), computed once and handed to the teacher-target cache and to
`heal()`; `heal` picks its loss step once (cached targets with a frozen
prefix, or the straightforward teacher + whole-student pass), trains,
checkpoints through the job's callback, and returns a whole `HealLog`.

Only a chosen set of parameters trains (the neighbours of the removed layer by
default, as in the paper); the rest is frozen, so a healing step costs a
backward pass through the top of the network only. The loop goes through
`accelerate.Accelerator`, so `accelerate launch` runs it with DDP on several
processes unchanged. `split_batches=True` makes `batch_size` the global
micro-batch: N processes each take 1/N of the same batch, so the result does
not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..config import HealConfig
from ..data import Blocks
from ..errors import LayerpruneError, NonFiniteError
from ..faults import crash_point, poisoned
from .guard import ABORT_FACTOR, RETRY_LR_FACTOR, Guard, load_trained, trained_state
from .job import HealJob, HealLog
from .step import local_step, loss_step
from ..models import check_same_vocabulary
from ..shard import (is_sharded, load_optimizer_state, load_shards, merge_adapters, optimizer_state,
                     prepare_training)
from ..student import own
from ..surgery import find_layers
from .targets import TeacherTargets

log = logging.getLogger(__name__)

# Blocks held at once to shuffle a healing's text: consecutive blocks of one document are spread
# over many steps, and memory does not grow with the healing budget.
SHUFFLE_BLOCKS = 1024


def trained_modules(student, layers: list[int], config: HealConfig) -> list[torch.nn.Module]:
    """What a healing changes: the chosen layers (with LoRA, every layer: its adapters are merged
    into them), and with --trainable last the LM head (with tied embeddings, the input embedding too)."""
    blocks = find_layers(student).layers
    modules = [blocks[index] for index in layers]
    if config.trainable == "last":
        modules.append(student.get_output_embeddings())
    return modules


def set_trainable(student, layers: list[int], config: HealConfig):
    """Freeze everything, then open the chosen layers (or attach LoRA adapters to them)."""
    student.requires_grad_(False)
    if config.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        blocks = find_layers(student).layers
        names = sorted({name.rsplit(".", 1)[-1] for name, m in blocks.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=names, lora_dropout=0.0)
        return get_peft_model(student, lora)
    for module in trained_modules(student, layers, config):
        own(module)   # trained in place: no longer the teacher's weights
        module.requires_grad_(True)
    return student


class TrainingRows(torch.utils.data.IterableDataset):
    """(row, block) of a healing's text, pass after pass without end (the loop draws exactly
    steps x accumulation micro-batches), shuffled within SHUFFLE_BLOCKS; the order is fixed by
    the seed, so a resumed healing replays it."""

    def __init__(self, text: Blocks | torch.Tensor, seed: int):
        self.text, self.seed = Blocks.of(text), seed

    def __iter__(self):
        for epoch in itertools.count():
            rng = random.Random(self.seed * 1_000_003 + epoch)
            buffer = []
            for row, block in enumerate(self.text.read()):
                buffer.append((row, block))
                if len(buffer) >= SHUFFLE_BLOCKS:
                    yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            yield from buffer


def accelerator_for(config: HealConfig, device: torch.device):
    """The Accelerator a run heals through, made once per run: `accelerate launch` gives it its
    processes. sync_with_dataloader=False: an optimizer step is always exactly `grad_accum`
    micro-batches, also across the loader's epoch ends, so a step boundary is a clean point to
    checkpoint and resume."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, GradientAccumulationPlugin

    # accelerate keeps one mixed precision per process and refuses another ("restart your
    # runtime"); here the precision is a run's, so a second run in one process (a notebook, a
    # sweep) drops the old one. The processes and device (its PartialState) stay.
    if AcceleratorState._shared_state.get("_mixed_precision", config.mixed_precision) != config.mixed_precision:
        AcceleratorState._reset_state()
    accumulation = GradientAccumulationPlugin(num_steps=config.grad_accum, sync_with_dataloader=False)
    # a local step leaves the trained layers above the cut's mapped state without gradients
    unused = [DistributedDataParallelKwargs(find_unused_parameters=True)] if config.local_steps else []
    return Accelerator(gradient_accumulation_plugin=accumulation, mixed_precision=config.mixed_precision,
                       cpu=device.type == "cpu", dataloader_config=DataLoaderConfiguration(split_batches=True),
                       kwargs_handlers=unused)


@dataclass
class _Training:
    """What every attempt of one healing trains with (prepared by the Accelerator)."""

    accelerator: object
    model: torch.nn.Module
    optimizer: object
    params: list
    loader: object
    terms_of: Callable
    local_of: Callable | None
    guard: Guard | None


def heal(student, teacher, text: Blocks | torch.Tensor, job: HealJob, targets: TeacherTargets | None = None,
         progress: bool = True, guard: Guard | None = None, accelerator=None) -> HealLog:
    """Train `student` in place for `job.steps` optimizer steps on the training `text`.

    With a `guard`, the healing is watched on validation text and retried at a lower learning
    rate when it makes the model worse (guard.py); it ends on the best state seen. Every
    `checkpoint_every` steps and after the last, `job.on_checkpoint(state)` receives what
    `resume=state` needs to continue from that step exactly as if never interrupted.
    `accelerator`: the run's (accelerator_for); without one, this healing makes its own."""
    from accelerate.utils import set_seed

    config = job.config
    check_same_vocabulary(student, teacher)
    set_seed(job.seed)
    device = next(student.parameters()).device
    accelerator = accelerator or accelerator_for(config, device)
    if config.batch_size % accelerator.num_processes:
        raise LayerpruneError(f"heal batch size {config.batch_size} does not split over "
                              f"{accelerator.num_processes} processes", "use a multiple of the process count")
    if targets is not None:
        targets.extend(teacher, [o for _, o in job.pairs], progress)
    model = set_trainable(student, job.layers, config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.start_lr, weight_decay=config.weight_decay)
    loader = torch.utils.data.DataLoader(TrainingRows(text, job.seed), batch_size=config.batch_size)
    model, optimizer, loader = prepare_training(accelerator, model, optimizer, loader, config.trainable == "lora")
    # the student's forward goes through the prepared model: DDP synchronises gradients only for
    # a forward pass made through its wrapper
    terms_of = loss_step(job, model, student, teacher, targets)
    local_of = local_step(job, model, student, teacher, targets) if job.local_steps else None
    training = _Training(accelerator, model, optimizer, params, loader, terms_of, local_of, guard)
    inner = accelerator.unwrap_model(model)
    resume, rows, first = job.resume, [], 0
    if resume is not None:
        rows, first = list(resume["rows"]), resume.get("attempt", 0)
        if guard is not None:
            guard.restore(resume["guard"])
    elif guard is not None:
        guard.start(inner, job.start_lr)
    attempts = guard.retries + 1 if guard is not None else 1
    with flushed_denormals():
        for attempt in range(first, attempts):
            lr = job.start_lr * RETRY_LR_FACTOR ** attempt
            current = _Attempt(job, training, attempt, lr)
            if resume is not None and attempt == first:
                current.restore(resume, inner)
            rows = current.run(rows, progress)
            why = guard.failure([r for r in rows if r["attempt"] == attempt]) if guard is not None else None
            if why is None:
                break
            if attempt + 1 < attempts:
                load_trained(inner, guard.best_state)
                log.info("healing iteration %d at lr %.3g failed (%s): retrying from the best state at lr %.3g",
                         job.iteration, lr, why, lr * RETRY_LR_FACTOR)
    model.eval()
    guard_log = guard.finish(inner, attempt) if guard is not None else None
    if config.gradient_checkpointing:
        inner.gradient_checkpointing_disable()
    if config.trainable == "lora":
        if is_sharded(inner):
            merge_adapters(inner)
        else:
            from peft.tuners.lora import LoraLayer

            for module in inner.modules():   # merging writes the adapted weights in place
                if isinstance(module, LoraLayer):
                    own(module)
            inner.merge_and_unload()
    student.requires_grad_(False)
    accelerator.free_memory()   # the next healing prepares its own model, optimizer and loader
    return HealLog(job.steps, job.layers, job.pairs, rows, resume["step"] if resume is not None else None,
                   held_out_before=job.held_out_before, text=job.text,
                   guard=guard_log, lr_probe=job.lr_probe)


@contextlib.contextmanager
def flushed_denormals():
    """Adam's moment estimates decay into subnormal floats, which x86 CPUs compute up to 100x
    slower; flushing them to zero while healing changes no result that matters and keeps steps
    fast. The setting is the process's, so it is put back to torch's default afterwards."""
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


class _Attempt:
    """One pass of `job.steps` optimizer steps at one learning rate: a fresh optimizer state and
    schedule, the data order from the start (a retry sees the same text), checks and checkpoints
    at every `checkpoint_every` steps and the last."""

    KEYS = ("loss", "kl", "mse", "final_mse")

    def __init__(self, job: HealJob, training: _Training, attempt: int, lr: float):
        from transformers import get_cosine_schedule_with_warmup

        self.job, self.accelerator, self.model = job, training.accelerator, training.model
        self.optimizer, self.params, self.terms_of = training.optimizer, training.params, training.terms_of
        self.local_of = training.local_of
        self.guard, self.attempt, self.lr = training.guard, attempt, lr
        inner = self.optimizer.optimizer
        inner.state.clear()
        for group in inner.param_groups:
            group["lr"] = group["initial_lr"] = lr
        schedule = get_cosine_schedule_with_warmup(inner, min(job.config.warmup_steps, job.steps), job.steps)
        self.scheduler = self.accelerator.prepare_scheduler(schedule)
        self.batches, self.done, self.ended = iter(training.loader), 0, False

    def restore(self, state: dict, inner) -> None:
        """Continue a checkpointed attempt at its step, the data order replayed."""
        _restore(state, inner, self.optimizer, self.scheduler, self.guard)
        self.done, self.ended = state["step"], state.get("ended", False)
        for _ in range(self.done * self.job.config.grad_accum):
            next(self.batches)
        log.info("healing resumed at step %d", self.done)

    def run(self, rows: list[dict], progress: bool) -> list[dict]:
        job, config, accelerator = self.job, self.job.config, self.accelerator
        if self.ended:
            return rows
        retry = f", retry {self.attempt} at lr {self.lr:.3g}" if self.attempt else ""
        bar = tqdm(total=job.steps, initial=self.done, desc=f"{job.label} (iteration {job.iteration}{retry})",
                   unit="step", disable=not (progress and accelerator.is_main_process), leave=False)
        inner = accelerator.unwrap_model(self.model)
        every = config.checkpoint_every
        self.model.train()
        seconds = {"local": [], "global": []}   # per step, for the log line that ends the attempt
        for step in range(self.done + 1, job.steps + 1):
            started = time.perf_counter()
            row = self._step(step)
            seconds[row["phase"]].append(time.perf_counter() - started)
            rows.append(row)
            bar.update(1)
            at_check = step == job.steps or (every and step % every == 0)
            if at_check and self.guard is not None:
                self.ended = not self.guard.check(inner, self.attempt, step, self.lr)
                self.model.train()
            if job.on_checkpoint is not None and at_check and every:
                if accelerator.is_main_process or is_sharded(inner):   # sharded: each process writes its shard
                    job.on_checkpoint(self._state(step, rows, inner))
                accelerator.wait_for_everyone()
            crash_point("healing")
            if step % config.log_every == 0 or step == job.steps:
                bar.set_postfix(loss=f"{row['loss']:.4f}", phase=row["phase"])
            if self.ended:
                log.info("healing iteration %d: validation KL %.4f at step %d is over %.1fx the cut's %.4f; "
                         "ending this attempt", job.iteration, self.guard.log.checks[-1]["kl"], step, ABORT_FACTOR,
                         self.guard.log.kl_before)
                break
        bar.close()
        timed = [f"{len(times)} {phase} steps, {statistics.median(times):.2f} s each"
                 for phase, times in seconds.items() if times]
        log.info("healing iteration %d: %s", job.iteration, "; ".join(timed))
        return rows

    def _step(self, step: int) -> dict:
        job, config, accelerator = self.job, self.job.config, self.accelerator
        sums = torch.zeros(len(self.KEYS), device=accelerator.device)   # read back once per step, not per term
        local = step <= job.local_steps
        terms_of = self.local_of if local else self.terms_of
        for _ in range(config.grad_accum):
            block_rows, ids = next(self.batches)
            ids = ids.to(accelerator.device)
            with accelerator.accumulate(self.model):
                terms = terms_of(ids, block_rows)
                terms["loss"] = poisoned("healing", terms["loss"])
                if not torch.isfinite(terms["loss"]):
                    raise NonFiniteError(f"non-finite healing loss ({terms['loss'].item()}) at iteration "
                                         f"{job.iteration} step {step}; the student keeps its weights from before "
                                         "this step", "lower --heal-lr, use float32, or check the data")
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            sums += torch.stack([terms[key].detach().float() for key in self.KEYS]) / config.grad_accum
        sums = accelerator.reduce(sums, reduction="mean")   # each process holds 1/N of the global batch
        return {"iteration": job.iteration, "attempt": self.attempt, "step": step,
                "phase": "local" if local else "global", "lr": self.scheduler.get_last_lr()[0],
                **dict(zip(self.KEYS, sums.tolist()))}

    def _state(self, step: int, rows: list[dict], inner) -> dict:
        """Everything a healing changes as it goes; the frozen rest of the model is not included.
        With a sharded student the tensors go under "sharded", each process holding its shard."""
        state = {"step": step, "attempt": self.attempt, "ended": self.ended, "rows": list(rows),
                 "rng": torch.get_rng_state(), "scheduler": self.scheduler.state_dict(), "lr_probe": self.job.lr_probe}
        tensors = {"trainable": trained_state(inner), "optimizer": optimizer_state(inner, self.optimizer)}
        if self.guard is not None:
            state["guard"] = self.guard.state()
        if is_sharded(inner):
            if self.guard is not None:
                tensors["best"] = state["guard"].pop("best")
            state["sharded"] = tensors
        else:
            state.update(tensors)
        return state


def _restore(state: dict, model, optimizer, scheduler, guard: Guard | None) -> None:
    mismatch = LayerpruneError("the healing checkpoint does not match the layers this healing trains",
                               "pass --overwrite to start afresh")
    if "sharded_in" in state:   # --fsdp: read each process's shards into templates of the live ones
        tensors = {"trainable": trained_state(model), "optimizer": optimizer_state(model, optimizer)}
        if guard is not None:
            tensors["best"] = trained_state(model)
        try:
            load_shards(tensors, Path(state["sharded_in"]))
        except Exception as err:   # torch.distributed.checkpoint names missing or misshapen keys its own way
            raise mismatch from err
        load_trained(model, tensors["trainable"])
        load_optimizer_state(model, optimizer, tensors["optimizer"])
        if guard is not None:
            guard.best_state = tensors["best"]
    else:
        if {name for name, p in model.named_parameters() if p.requires_grad} != state["trainable"].keys():
            raise mismatch
        load_trained(model, state["trainable"])
        load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
