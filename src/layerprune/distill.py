"""Healing: distil the pruned student towards the ORIGINAL teacher, on Accelerate.

Only a chosen set of parameters trains (the neighbours of the removed layer by
default, as in the paper); the rest is frozen, so a healing step costs a
backward pass through the top of the network only. The loop goes through
`accelerate.Accelerator`, so `accelerate launch` runs it with DDP on several
processes unchanged. `split_batches=True` makes `batch_size` the global
micro-batch: N processes each take 1/N of the same batch, so the result does
not depend on the number of processes.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .activations import capture, injected, prefix_state
from .config import HealConfig
from .errors import LayerpruneError
from .faults import crash_point, poisoned
from .losses import LossWeights, joint_loss, kl_loss, topk_kl_loss
from .surgery import find_layers, num_layers, original_indices
from .targets import TeacherTargets
from .tasks import Batch, TaskData, build_kl, build_perplexity, evaluate_tasks

log = logging.getLogger(__name__)


class NonFiniteLoss(LayerpruneError):
    pass


def check_compatible(student, teacher, student_tokenizer=None, teacher_tokenizer=None) -> None:
    """Distillation compares distributions token by token: the vocabularies must be the same."""
    sv, tv = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if sv != tv:
        raise LayerpruneError(f"student and teacher vocabularies differ ({sv} vs {tv} tokens)",
                              "distil from a teacher with the same tokenizer, e.g. the original model")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise LayerpruneError("student and teacher tokenizers differ",
                                  "distil from a teacher with the same tokenizer, e.g. the original model")


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
    """(student layer, teacher layer) pairs whose OUTPUTS are matched, in current and original
    indices. Default: the layer just above the (highest) cut, matched with the teacher layer it
    came from; `mse_layers` names original layers instead."""
    originals = original_indices(student)
    depth = len(originals)
    if config.w_mse == 0 or depth == 0:
        return []
    if config.mse_layers is not None:
        return [(k, o) for k, o in enumerate(originals) if o in set(config.mse_layers)]
    k = min(max(cuts) if cuts else depth // 2, depth - 1)
    return [(k, originals[k])]


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


def _cycle(loader):
    while True:
        yield from loader


def _held_out(student, teacher, eval_batches: list[Batch]) -> dict:
    if not eval_batches:
        return {}
    data = TaskData(None, torch.cat([b.input_ids for b in eval_batches]), [], len(eval_batches[0].input_ids))
    scores = evaluate_tasks(student, [build_kl(data), build_perplexity(data)], teacher)
    return {"kl": scores["kl"]["kl"], "perplexity": scores["perplexity"]["perplexity"]}


def straightforward_terms(model, student, teacher, ids, pairs, weights) -> dict:
    """The reference step: teacher forward plus a full student forward, every micro-batch."""
    mask = torch.ones_like(ids)
    with torch.no_grad(), capture(teacher, final=True) as t_rec:
        t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with capture(student, final=True) as s_rec:
        s_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    kl = kl_loss(s_logits, t_logits, mask, weights.temperature)
    return joint_loss(kl, [s_rec["states"][k + 1] for k, _ in pairs], [t_rec["states"][o + 1] for _, o in pairs],
                      s_rec["final"], t_rec["final"], mask, weights)


def cached_terms(model, student, ids, rows, prefix: FrozenPrefix, start, targets: TeacherTargets, pairs,
                 weights) -> dict:
    """The fast step: the frozen layers below `start` are replaced by their cached output, and the
    teacher by its cached targets; only the trainable top of the student runs."""
    mask = torch.ones_like(ids)
    depth = num_layers(student)
    t = targets.take(rows, [o for _, o in pairs], ids.device)
    with injected(student, start, prefix(rows, ids.device), range(start, depth)), \
            capture(student, final=True) as s_rec:
        s_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    kl = topk_kl_loss(s_logits, t["values"], t["indices"], t["lse"], mask, weights.temperature)
    return joint_loss(kl, [s_rec["states"][k - start + 1] for k, _ in pairs], t["layers"], s_rec["final"],
                      t["final"], mask, weights)


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


def heal(student, teacher, corpus, config: HealConfig, steps: int, seed: int = 0, cuts: list[int] | None = None,
         eval_batches: list[Batch] | None = None, log_dir: Path | None = None, iteration: int = 0,
         targets: TeacherTargets | None = None, progress: bool = True, resume: dict | None = None,
         on_checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Train `student` in place for `steps` optimizer steps against `teacher`; return the log.

    With `targets` (see targets.py) the teacher is not run and the frozen bottom of the student
    runs once; without, every micro-batch runs the teacher and the whole student.
    Every `config.checkpoint_every` steps and after the last, `on_checkpoint(state)` receives
    what `resume=state` needs to continue from that step exactly as if never interrupted."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
    from transformers import get_cosine_schedule_with_warmup

    check_compatible(student, teacher)
    # Adam's moment estimates decay into subnormal floats, which x86 CPUs compute up to 100x
    # slower; flushing them to zero changes no result that matters and keeps steps fast.
    torch.set_flush_denormal(True)
    set_seed(seed)
    device = next(student.parameters()).device
    # sync_with_dataloader=False: an optimizer step is always exactly `grad_accum` micro-batches, also
    # across the loader's epoch ends, so a step boundary is a clean point to checkpoint and resume.
    accumulation = GradientAccumulationPlugin(num_steps=config.grad_accum, sync_with_dataloader=False)
    accelerator = Accelerator(gradient_accumulation_plugin=accumulation, mixed_precision=config.mixed_precision,
                              cpu=device.type == "cpu",
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    if config.batch_size % accelerator.num_processes:
        raise LayerpruneError(f"heal batch size {config.batch_size} does not split over "
                              f"{accelerator.num_processes} processes", "use a multiple of the process count")
    depth = num_layers(student)
    layers = trainable_layers(depth, cuts or [], config)
    pairs = mse_pairs(student, cuts or [], config)
    weights = LossWeights(config.w_kl, config.w_mse, config.w_final, config.temperature)
    before = _held_out(student, teacher, eval_batches or [])

    blocks = corpus.blocks["train"]
    if targets is not None:
        targets.ensure_layers(teacher, [o for _, o in pairs], progress)
    start = 0 if config.trainable == "lora" else min(layers)
    prefix = FrozenPrefix(student, start, blocks) if targets is not None else None
    model = set_trainable(student, layers, config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, steps), steps)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.arange(len(blocks)), batch_size=config.batch_size, shuffle=True,
                                         generator=generator, drop_last=len(blocks) >= config.batch_size)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    rows, batches, done = [], _cycle(loader), 0
    if resume is not None:
        rows, done = _restore(resume, accelerator.unwrap_model(model), optimizer, scheduler, batches, config)
    bar = tqdm(total=steps, initial=done, desc=f"healing (iteration {iteration})", unit="step",
               disable=not (progress and accelerator.is_main_process), leave=False)
    for step in range(done + 1, steps + 1):
        sums = {"loss": 0.0, "kl": 0.0, "mse": 0.0, "final_mse": 0.0}
        for _ in range(config.grad_accum):
            block_rows = next(batches)
            ids = blocks[block_rows.cpu()].to(accelerator.device)
            with accelerator.accumulate(model):
                if targets is None:
                    terms = straightforward_terms(model, student, teacher, ids, pairs, weights)
                else:
                    terms = cached_terms(model, student, ids, block_rows, prefix, start, targets, pairs, weights)
                terms["loss"] = poisoned("healing", terms["loss"])
                if not torch.isfinite(terms["loss"]):
                    raise NonFiniteLoss(f"non-finite healing loss ({terms['loss'].item()}) at iteration {iteration} "
                                        f"step {step}; the student keeps its weights from before this step",
                                        "lower --heal-lr, use float32, or check the data")
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            for key in sums:
                sums[key] += terms[key].detach().item() / config.grad_accum
        rows.append({"iteration": iteration, "step": step, "lr": scheduler.get_last_lr()[0], **sums})
        bar.update(1)
        every = config.checkpoint_every
        if on_checkpoint is not None and every and (step % every == 0 or step == steps):
            if accelerator.is_main_process:
                on_checkpoint(_state(step, rows, accelerator.unwrap_model(model), optimizer, scheduler))
            accelerator.wait_for_everyone()
        crash_point("healing")
        if step % config.log_every == 0 or step == steps:
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
    after = _held_out(student, teacher, eval_batches or [])
    if log_dir is not None and accelerator.is_main_process:
        write_rows(log_dir / "heal.csv", rows)
    return {"steps": steps, **({"resumed_at_step": done} if resume is not None else {}),
            "trained_layers_current": layers, "mse_pairs": pairs, "held_out_before": before,
            "held_out_after": after, "first_loss": rows[0]["loss"] if rows else None,
            "last_loss": rows[-1]["loss"] if rows else None, "rows": rows}


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


def write_rows(path: Path, rows: list[dict]) -> None:
    """Add per-step rows to a CSV; TensorBoard too where it is installed. Rows of the same
    iteration already there (a resumed run heals that iteration to its end again) are replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if path.exists():
        with open(path, newline="", encoding="utf-8") as handle:
            redone = {str(row["iteration"]) for row in rows}
            kept = [row for row in csv.DictReader(handle) if row["iteration"] not in redone]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([*kept, *rows])
    os.replace(tmp, path)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    writer = SummaryWriter(str(path.parent / "tensorboard"))
    for row in rows:
        global_step = row["iteration"] * 100000 + row["step"]
        for key in ("loss", "kl", "mse", "final_mse", "lr"):
            writer.add_scalar(f"heal/{key}", row[key], global_step)
    writer.close()
