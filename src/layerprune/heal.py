"""Healing: distil the pruned student towards the ORIGINAL teacher, on Accelerate.

Lifecycle of one healing: `plan()` turns a removal into a `HealJob` (where
the cuts are, which layers train, which layer outputs the MSE term matches),
computed once and handed to the teacher-target cache and to `heal()`; `heal`
picks its loss step once (cached targets with a frozen prefix, or the
straightforward teacher + whole-student pass), trains, checkpoints through
the job's callback, and returns a `HealLog`.

Only a chosen set of parameters trains (the neighbours of the removed layer by
default, as in the paper); the rest is frozen, so a healing step costs a
backward pass through the top of the network only. The loop goes through
`accelerate.Accelerator`, so `accelerate launch` runs it with DDP on several
processes unchanged. `split_batches=True` makes `batch_size` the global
micro-batch: N processes each take 1/N of the same batch, so the result does
not depend on the number of processes.
"""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .activations import capture, injected, prefix_state
from .config import HealConfig
from .data import Blocks
from .errors import LayerpruneError, NonFiniteError
from .faults import crash_point, poisoned
from .losses import LossWeights, joint_loss, kl_loss, topk_kl_loss
from .models import check_same_vocabulary
from .surgery import find_layers, num_layers, original_indices
from .targets import TeacherTargets

log = logging.getLogger(__name__)

# Blocks held at once to shuffle a healing's text: consecutive blocks of one document are spread
# over many steps, and memory does not grow with the healing budget.
SHUFFLE_BLOCKS = 1024


@dataclass(frozen=True)
class HealJob:
    """One healing, decided before it starts. `pairs`: (student layer, teacher layer) whose
    OUTPUTS the MSE term matches, in current and original indices; `layers`: current indices
    that train; `resume`: a state saved by `on_checkpoint`, to continue from its step."""

    config: HealConfig
    steps: int
    iteration: int
    seed: int
    cuts: list[int]
    pairs: list[tuple[int, int]]
    layers: list[int]
    prefix_cache: bool = False
    resume: dict | None = None
    on_checkpoint: Callable[[dict], None] | None = None


@dataclass
class HealLog:
    """What a healing did, as recorded in history.json. The held-out figures before and after
    are the pipeline's evaluations around it."""

    steps: int
    trained_layers_current: list[int]
    mse_pairs: list[tuple[int, int]]
    rows: list[dict] = field(default_factory=list)
    resumed_at_step: int | None = None
    held_out_before: dict = field(default_factory=dict)
    held_out_after: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)   # which training text: stream positions, blocks, caches used

    def to_json(self) -> dict:
        data = asdict(self)
        if self.resumed_at_step is None:
            del data["resumed_at_step"]
        data["mse_pairs"] = [list(pair) for pair in self.mse_pairs]
        data["first_loss"] = self.rows[0]["loss"] if self.rows else None
        data["last_loss"] = self.rows[-1]["loss"] if self.rows else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> "HealLog":
        fields = {k: v for k, v in data.items() if k not in ("first_loss", "last_loss")}
        return cls(**{**fields, "mse_pairs": [tuple(p) for p in fields["mse_pairs"]]})


def cut_positions(dropped: list[int]) -> list[int]:
    """Where each removed layer was, in the indexing after the removal (the index of the layer
    that now follows the cut)."""
    return [d - j for j, d in enumerate(sorted(dropped))]


def trainable_layers(depth: int, cuts: list[int], config: HealConfig) -> list[int]:
    """Current indices of the layers that train: the neighbours of each cut (radius r: r layers
    below it and r above), or all layers."""
    if config.trainable in ("all", "lora") or not cuts:
        return list(range(depth))
    chosen = set()
    for cut in cuts:
        chosen.update(range(max(0, cut - config.radius), min(depth, cut + config.radius)))
    return sorted(chosen) or [min(cuts[0], depth - 1)]


def mse_pairs(student, cuts: list[int], config: HealConfig) -> list[tuple[int, int]]:
    """Default: the layer just above the (highest) cut, matched with the teacher layer it came
    from; `mse_layers` names original layers instead."""
    originals = original_indices(student)
    depth = len(originals)
    if config.w_mse == 0 or depth == 0:
        return []
    if config.mse_layers is not None:
        return [(k, o) for k, o in enumerate(originals) if o in set(config.mse_layers)]
    k = min(max(cuts) if cuts else depth // 2, depth - 1)
    return [(k, originals[k])]


def plan(student, config: HealConfig, steps: int, iteration: int, seed: int, dropped: list[int]) -> HealJob:
    """The healing after removing current layers `dropped` (already removed from `student`)."""
    cuts = cut_positions(dropped)
    return HealJob(config, steps, iteration, seed, cuts, mse_pairs(student, cuts, config),
                   trainable_layers(num_layers(student), cuts, config))


def set_trainable(student, layers: list[int], config: HealConfig):
    """Freeze everything, then open the chosen layers (or attach LoRA adapters to them)."""
    student.requires_grad_(False)
    blocks = find_layers(student).layers
    if config.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        names = sorted({name.rsplit(".", 1)[-1] for name, m in blocks.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=names, lora_dropout=0.0)
        return get_peft_model(student, lora)
    for index in layers:
        blocks[index].requires_grad_(True)
    return student


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


def loss_step(job: HealJob, model, student, teacher, targets: TeacherTargets | None):
    """The function `(ids, rows) -> loss terms` this healing uses, chosen once. With `targets`
    the teacher is not run; with `job.prefix_cache` the frozen bottom of the student runs once
    per block; with neither, every micro-batch runs the teacher and the whole student (the
    reference)."""
    weights = LossWeights(job.config.w_kl, job.config.w_mse, job.config.w_final, job.config.temperature,
                          job.config.mse_scale == "relative")
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


def heal(student, teacher, text: Blocks | torch.Tensor, job: HealJob, targets: TeacherTargets | None = None,
         progress: bool = True) -> HealLog:
    """Train `student` in place for `job.steps` optimizer steps on the training `text`.

    Every `checkpoint_every` steps and after the last, `job.on_checkpoint(state)` receives what
    `resume=state` needs to continue from that step exactly as if never interrupted."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
    from transformers import get_cosine_schedule_with_warmup

    config = job.config
    check_same_vocabulary(student, teacher)
    # Adam's moment estimates decay into subnormal floats, which x86 CPUs compute up to 100x
    # slower; flushing them to zero changes no result that matters and keeps steps fast.
    torch.set_flush_denormal(True)
    set_seed(job.seed)
    device = next(student.parameters()).device
    # sync_with_dataloader=False: an optimizer step is always exactly `grad_accum` micro-batches, also
    # across the loader's epoch ends, so a step boundary is a clean point to checkpoint and resume.
    accumulation = GradientAccumulationPlugin(num_steps=config.grad_accum, sync_with_dataloader=False)
    accelerator = Accelerator(gradient_accumulation_plugin=accumulation, mixed_precision=config.mixed_precision,
                              cpu=device.type == "cpu", dataloader_config=DataLoaderConfiguration(split_batches=True))
    if config.batch_size % accelerator.num_processes:
        raise LayerpruneError(f"heal batch size {config.batch_size} does not split over "
                              f"{accelerator.num_processes} processes", "use a multiple of the process count")
    if targets is not None:
        targets.extend(teacher, [o for _, o in job.pairs], progress)
    model = set_trainable(student, job.layers, config)
    terms_of = loss_step(job, model, student, teacher, targets)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, job.steps), job.steps)
    loader = torch.utils.data.DataLoader(TrainingRows(text, job.seed), batch_size=config.batch_size)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    rows, batches, done = [], iter(loader), 0
    if job.resume is not None:
        rows, done = _restore(job.resume, accelerator.unwrap_model(model), optimizer, scheduler, batches, config)
    bar = tqdm(total=job.steps, initial=done, desc=f"healing (iteration {job.iteration})", unit="step",
               disable=not (progress and accelerator.is_main_process), leave=False)
    keys = ("loss", "kl", "mse", "final_mse")
    for step in range(done + 1, job.steps + 1):
        sums = torch.zeros(len(keys), device=accelerator.device)   # read back once per step, not per term
        for _ in range(config.grad_accum):
            block_rows, ids = next(batches)
            ids = ids.to(accelerator.device)
            with accelerator.accumulate(model):
                terms = terms_of(ids, block_rows)
                terms["loss"] = poisoned("healing", terms["loss"])
                if not torch.isfinite(terms["loss"]):
                    raise NonFiniteError(f"non-finite healing loss ({terms['loss'].item()}) at iteration "
                                         f"{job.iteration} step {step}; the student keeps its weights from before "
                                         "this step", "lower --heal-lr, use float32, or check the data")
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            sums += torch.stack([terms[key].detach().float() for key in keys]) / config.grad_accum
        sums = dict(zip(keys, sums.tolist()))
        rows.append({"iteration": job.iteration, "step": step, "lr": scheduler.get_last_lr()[0], **sums})
        bar.update(1)
        every = config.checkpoint_every
        if job.on_checkpoint is not None and every and (step % every == 0 or step == job.steps):
            if accelerator.is_main_process:
                job.on_checkpoint(_state(step, rows, accelerator.unwrap_model(model), optimizer, scheduler))
            accelerator.wait_for_everyone()
        crash_point("healing")
        if step % config.log_every == 0 or step == job.steps:
            bar.set_postfix(loss=f"{sums['loss']:.4f}")
    bar.close()
    model.eval()
    inner = accelerator.unwrap_model(model)
    if config.gradient_checkpointing:
        inner.gradient_checkpointing_disable()
    if config.trainable == "lora":
        inner.merge_and_unload()
    student.requires_grad_(False)
    accelerator.free_memory()
    return HealLog(job.steps, job.layers, job.pairs, rows, done if job.resume is not None else None)


def _state(step: int, rows: list[dict], model, optimizer, scheduler) -> dict:
    """Everything a healing changes as it goes; the frozen rest of the model is not included."""
    return {"step": step, "rows": list(rows), "rng": torch.get_rng_state(),
            "trainable": {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def _restore(state: dict, model, optimizer, scheduler, batches, config: HealConfig) -> tuple[list[dict], int]:
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if trainable.keys() != state["trainable"].keys():
        raise LayerpruneError("the healing checkpoint does not match the layers this healing trains",
                              "pass --overwrite to start afresh")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    for _ in range(state["step"] * config.grad_accum):  # replay the data order up to the step reached
        next(batches)
    log.info("healing resumed at step %d", state["step"])
    return list(state["rows"]), state["step"]
