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

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .activations import capture, injected, prefix_state
from .config import HealConfig
from .errors import LayerpruneError, NonFiniteError
from .faults import crash_point, poisoned
from .losses import LossWeights, joint_loss, kl_loss, topk_kl_loss
from .models import check_same_vocabulary
from .surgery import find_layers, num_layers, original_indices
from .targets import TeacherTargets

log = logging.getLogger(__name__)


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
    healing. Only drawn blocks cost anything (a short healing on a large training set touches
    few), and each block runs alone, so its state does not depend on the order of drawing (a
    resumed healing computes the same bits)."""

    def __init__(self, student, start: int, blocks: torch.Tensor):
        self.student, self.start, self.blocks, self.states = student, start, blocks, {}

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, device) -> torch.Tensor:
        rows = rows.tolist()
        missing = [row for row in rows if row not in self.states]
        if missing:
            training = self.student.training
            self.student.eval()
            for row in missing:
                ids = self.blocks[row:row + 1].to(device)
                self.states[row] = prefix_state(self.student, self.start, ids, torch.ones_like(ids))[0]
            self.student.train(training)
        return torch.stack([self.states[row] for row in rows])


def loss_step(job: HealJob, model, student, teacher, blocks: torch.Tensor, targets: TeacherTargets | None):
    """The function `(ids, rows) -> loss terms` this healing uses, chosen once. With `targets`
    the teacher is not run and the frozen bottom of the student runs once per block; without,
    every micro-batch runs the teacher and the whole student (the reference)."""
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

    if targets is None:
        return straightforward
    start = 0 if job.config.trainable == "lora" else min(job.layers)
    prefix = FrozenPrefix(student, start, blocks)
    depth = num_layers(student)

    def cached(ids, rows):
        mask = torch.ones_like(ids)
        t = targets.take(rows, [o for _, o in pairs], ids.device)
        with injected(student, start, prefix(rows, ids.device), range(start, depth)), \
                capture(student, final=True) as s_rec:
            s_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        kl = topk_kl_loss(s_logits, t["values"], t["indices"], t["lse"], mask, weights.temperature)
        return joint_loss(kl, [s_rec["states"][k - start + 1] for k, _ in pairs], t["layers"], s_rec["final"],
                          t["final"], mask, weights)

    return cached


def _cycle(loader):
    while True:
        yield from loader


def heal(student, teacher, blocks: torch.Tensor, job: HealJob, targets: TeacherTargets | None = None,
         progress: bool = True) -> HealLog:
    """Train `student` in place for `job.steps` optimizer steps on training `blocks` [N, T].

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
    terms_of = loss_step(job, model, student, teacher, blocks, targets)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, job.steps), job.steps)
    generator = torch.Generator().manual_seed(job.seed)
    loader = torch.utils.data.DataLoader(torch.arange(len(blocks)), batch_size=config.batch_size, shuffle=True,
                                         generator=generator, drop_last=len(blocks) >= config.batch_size)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    rows, batches, done = [], _cycle(loader), 0
    if job.resume is not None:
        rows, done = _restore(job.resume, accelerator.unwrap_model(model), optimizer, scheduler, batches, config)
    bar = tqdm(total=job.steps, initial=done, desc=f"healing (iteration {job.iteration})", unit="step",
               disable=not (progress and accelerator.is_main_process), leave=False)
    for step in range(done + 1, job.steps + 1):
        sums = {"loss": 0.0, "kl": 0.0, "mse": 0.0, "final_mse": 0.0}
        for _ in range(config.grad_accum):
            block_rows = next(batches)
            ids = blocks[block_rows.cpu()].to(accelerator.device)
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
            for key in sums:
                sums[key] += terms[key].detach().item() / config.grad_accum
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
