"""The nested sections of a run's configuration: the text it reads (`data:`), how it heals
(`heal:`) and how it scores the benchmark suites (`bench:`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LayerpruneError
from ..options import flag_of
from .fields import (DEFAULT_HEAL_STEPS, HEAL_METHODS, MSE_SCALES, TRAIN_DATA, TRAINABLE, non_negative, one_of, opt,
                     positive)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where text comes from and how much of it each use reads.

    `source=None` is the embedded English Wikipedia sample. Documents are split
    by a hash of their identity, so calibration, training and held-out text
    never overlap and the split does not depend on file order. Budgets are in
    tokens, rounded down to whole blocks of `seq_len`; the `*_blocks` options
    are the same budgets in blocks and, when given, take precedence.
    """

    source: str | None = opt(None, "text source: a .txt/.jsonl/.jsonl.gz/.parquet file, a folder or glob of such "
                                   "shards, embedded:wiki (default), embedded:news, or a HF dataset id (streamed) "
                                   "where the network allows", flag="--data")
    text_field: str = opt("text", "the text field of .jsonl/.parquet/HF data")
    seq_len: int = opt(256, "tokens per block")
    # 32 blocks, not 8: on SmolLM2 the 8-block choice fell on near-ties that differed between seeds and devices
    # and took early layers at -4/-6; 32 blocks chose the same layers on every seed and kept 0.751 against
    # 0.681-0.702 at -6 on validation text (docs/heal-sweep.md, 2026-12-04 GPU sweep).
    calib_tokens: int = opt(8192, "calibration tokens, used to score layers")
    eval_tokens: int = opt(16384, "held-out tokens, used only for evaluation (and, in compare, on --unseen-data)")
    patch_tokens: int = opt(16384, "training tokens the linear patch of each cut is fitted on (with --patch)")
    val_tokens: int = opt(2048, "validation tokens, cut from the training split past all the text healing reads: "
                                "the healing guard measures KL to the original on them")
    calib_blocks: int | None = opt(None, "the calibration budget in blocks (instead of --calib-tokens)")
    eval_blocks: int | None = opt(None, "the held-out budget in blocks (instead of --eval-tokens)")
    patch_blocks: int | None = opt(None, "the patch-fitting budget in blocks (instead of --patch-tokens)")
    batch_size: int = opt(4, "blocks per forward pass when scoring and evaluating")

    def blocks(self, use: str) -> int:
        """Blocks of `seq_len` tokens for one use: calib, eval or patch."""
        alias = {"calib": self.calib_blocks, "eval": self.eval_blocks, "patch": self.patch_blocks,
                 "val": None}[use]
        return alias if alias is not None else getattr(self, f"{use}_tokens") // self.seq_len

    def validate(self) -> None:
        positive(self, ("seq_len", "calib_tokens", "eval_tokens", "patch_tokens", "val_tokens", "batch_size"))
        for name in ("calib_blocks", "eval_blocks", "patch_blocks"):
            if getattr(self, name) is not None:
                positive(self, (name,))
        if self.seq_len < 8:
            raise LayerpruneError(f"seq_len {self.seq_len} is too short to measure anything",
                                  "use --seq-len 8 or more (256 is the default)")
        for use in ("calib", "eval", "patch", "val"):
            if self.blocks(use) < 1:
                raise LayerpruneError(f"--{use}-tokens {getattr(self, use + '_tokens')} is less than one block of "
                                      f"{self.seq_len} tokens", f"raise --{use}-tokens or lower --seq-len")


@dataclass(frozen=True, kw_only=True)
class HealConfig:
    """Healing by distillation from the original teacher after each removal.

    The optimiser follows the paper (PAPER.md): the neighbours of the removed
    layer trained, AdamW, cosine with 8 warm-up steps, weight decay 0.05,
    clipping 0.3. What differs, and why:
    - the budget: 30 steps per removal that fit minutes on a CPU, where the
      paper trains an epoch of its corpus; so lr 5e-4 (paper 1e-4) and two
      neighbours on each side of the cut (paper: the adjacent layers), which
      on SmolLM2 lowered held-out KL by 35% after one removal against 19%;
    - the loss: KL + per-channel MSE, each hidden channel's error against
      that channel's mean square in the teacher (paper: KL/100 + raw MSE).
      The raw form's size is the model's hidden-state scale: on Gemma-3-270M
      its MSE was 2,900 against a KL of 0.40, and it diverged; the
      per-channel form means the same on any model, and a few massive
      channels count as few channels (docs/heal-sweep.md);
    - the guard (guard.py): every healing is watched on validation text and
      keeps its best state, retrying at a lower lr when it made things worse.
    The budget is in tokens per removal (`tokens`, or `steps` of batch x
    accumulation blocks); by default each removal reads fresh text from the
    training stream (`train_data`).
    """

    method: str = opt("distill", "healing after each removal: distill (the paper's) or none", flag="--heal")
    tokens: int | None = opt(None, f"training tokens per removal (default: {DEFAULT_HEAL_STEPS} steps' worth, "
                                   "batch x grad accum x seq-len each)", flag="--heal-tokens")
    steps: int | None = opt(None, "the healing budget in optimizer steps per removal, instead of --heal-tokens",
                            flag="--heal-steps")
    epochs: int = opt(1, "passes over each removal's training tokens", flag="--heal-epochs")
    local_steps: int = opt(0, "the first N of each removal's healing steps are local: the trained layers below the "
                              "cut's mapped state learn the original's state there (MSE; no LM head, no layer above "
                              "runs), at a fraction of a global step's cost", flag="--heal-local-steps")
    train_data: str = opt("stream", "stream: each removal heals on fresh text, continuing the training stream; "
                                    "reuse: every removal heals on the same first tokens (the paper's setting); "
                                    "teacher: on text the original writes itself, continuing prompts taken from the "
                                    "training text (generated once, before the first removal); mix: every other "
                                    "block the original's, the others the stream's")
    final_steps: int = opt(0, "extra healing steps after the last removal", flag="--heal-final-steps")
    final_lr: float | None = opt(None, "learning rate of the final healing (default: a quarter of the lr the "
                                       "removals' healings ended at where they train a cut's neighbours, since the "
                                       "final one trains every layer; else the same)", flag="--heal-final-lr")
    batch_size: int = opt(2, "global micro-batch of training blocks", flag="--heal-batch-size")
    grad_accum: int = opt(2, "micro-batches per optimizer step", flag="--heal-grad-accum")
    lr: float = opt(5e-4, "AdamW learning rate (with --heal-lr-probe: the top of the probe's ladder)", flag="--heal-lr")
    lr_probe: bool = opt(False, "before the first healing, try the lr and the guard's lower rungs for a few steps "
                                "each on validation text and start at the one that healed best (needs the guard)",
                         flag="--heal-lr-probe")
    warmup_steps: int = opt(8, "linear warm-up steps before the cosine decay", flag="--heal-warmup-steps")
    weight_decay: float = opt(0.05, "AdamW weight decay", flag="--heal-weight-decay")
    max_grad_norm: float = opt(0.3, "gradient clipping norm", flag="--heal-max-grad-norm")
    w_kl: float = opt(1.0, "weight of KL(teacher || student) on logits (paper: 0.01, with raw MSE)")
    temperature: float = opt(1.0, "softmax temperature of the KL term")
    w_mse: float = opt(1.0, "weight of the MSE on mapped intermediate hidden states")
    w_final: float = opt(1.0, "weight of the MSE on the final (normed) hidden state")
    mse_scale: str = opt("channel", "raw: hidden-state MSE as in the paper (its size depends on the model); relative: "
                                "divided by the teacher state's mean square, so the weights mean the same on any "
                                "model; channel: each hidden channel's error divided by that channel's mean square, "
                                "so a few massive-activation channels do not dominate")
    mse_layers: tuple[int, ...] | None = opt(None, "comma-separated ORIGINAL layer indices whose outputs the MSE "
                                                   "term matches (default: the layer just above each cut)")
    trainable: str = opt("neighbours", "what trains: the removed layer's neighbours, all layers, lora adapters, or "
                                       "last (the last 3 layers and the LM head, arXiv 2411.15558)")
    radius: int = opt(2, "neighbours trained on each side of the cut")
    lora_r: int = opt(16, "LoRA rank (with --trainable lora)")
    lora_alpha: int = opt(32, "LoRA alpha (with --trainable lora)")
    teacher_cache: bool = opt(True, "cache the teacher's targets and the frozen prefix's states where healing "
                                    "revisits text, within the cache budgets (off: always run them online)")
    cache_memory: float | None = opt(None, "GiB of RAM the frozen-prefix cache may hold (default: a quarter of "
                                           "the memory available at the start)")
    cache_disk: float | None = opt(None, "GiB of disk the teacher-target cache may fill (default: half the free "
                                         "space of the output folder's disk)")
    teacher_topk: int = opt(256, "teacher logits kept per token in the target cache (KL over these)")
    mixed_precision: str = opt("no", "no, bf16 or fp16 autocast for healing")
    gradient_checkpointing: bool = opt(False, "trade compute for memory when healing", result=False)
    guard: bool = opt(True, "watch every healing on validation text (KL to the original before, at each "
                            "checkpoint step, at the end), keep the best state, the unhealed cut included, and retry "
                            "at a quarter of the lr when healing made it worse", flag="--heal-guard")
    guard_retries: int = opt(2, "lower-lr retries of a healing the guard finds worse than its cut",
                             flag="--heal-guard-retries")
    log_every: int = opt(5, "update the progress bar's loss every N steps", flag="--heal-log-every", result=False)
    # A crash mid-healing loses at most this many steps.
    checkpoint_every: int = opt(10, "checkpoint healing every N steps (0: only between iterations)", result=False,
                                flag="--heal-checkpoint-every")

    def blocks_per_removal(self, seq_len: int) -> int:
        """Distinct training blocks each removal heals on."""
        if self.tokens is not None:
            return -(-self.tokens // seq_len)
        steps = DEFAULT_HEAL_STEPS if self.steps is None else self.steps
        return steps * self.batch_size * self.grad_accum

    def final_blocks(self) -> int:
        """Training blocks of the extra healing after the last removal."""
        return self.final_steps * self.batch_size * self.grad_accum

    def steps_per_removal(self, seq_len: int) -> int:
        """Optimizer steps of one healing: every pass over its blocks, in whole steps."""
        if self.steps is not None and self.epochs == 1:
            return self.steps
        per_step = self.batch_size * self.grad_accum
        return -(-self.epochs * self.blocks_per_removal(seq_len) // per_step)

    def validate(self) -> None:
        one_of(self.method, HEAL_METHODS, "healing method")
        one_of(self.trainable, TRAINABLE, "trainable set")
        one_of(self.mixed_precision, ("no", "bf16", "fp16"), "mixed precision")
        one_of(self.mse_scale, MSE_SCALES, "MSE scale")
        one_of(self.train_data, TRAIN_DATA, "training data mode")
        non_negative(self, ("final_steps", "warmup_steps", "radius", "checkpoint_every", "guard_retries",
                             "local_steps"), "heal ")
        positive(self, ("batch_size", "grad_accum", "lora_r", "log_every", "teacher_topk", "epochs"), "heal ")
        if self.steps is not None and self.tokens is not None:
            raise LayerpruneError("both --heal-steps and --heal-tokens given", "give the healing budget once")
        for name in ("steps", "tokens"):
            if getattr(self, name) is not None:
                non_negative(self, (name,), "heal ")
        for name in ("cache_memory", "cache_disk"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise LayerpruneError(f"{flag_of(HealConfig, name)} must be a positive number of GiB, got "
                                      f"{getattr(self, name)}", "give e.g. 4, or --no-teacher-cache to cache nothing")
        for name in ("lr", "temperature", "final_lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise LayerpruneError(f"heal {name} must be > 0, got {getattr(self, name)}",
                                      f"pass a positive {flag_of(HealConfig, name)}")
        if min(self.w_kl, self.w_mse, self.w_final) < 0 or self.w_kl + self.w_mse + self.w_final == 0:
            raise LayerpruneError("distillation loss weights must be >= 0 and not all zero",
                                  "set --w-kl, --w-mse, --w-final accordingly")
        if self.lr_probe and not self.guard and self.method != "none":
            raise LayerpruneError("--heal-lr-probe measures each rung on the guard's validation blocks, which "
                                  "--no-heal-guard switches off", "drop --no-heal-guard, or drop --heal-lr-probe")
        if self.local_steps and self.method != "none":
            self._check_local()

    def _check_local(self) -> None:
        """The local phase trains what lies below the cut's mapped state towards the MSE term's target."""
        if self.w_mse == 0:
            raise LayerpruneError("--heal-local-steps matches the cut's mapped state, the MSE term, which --w-mse 0 "
                                  "switches off", "set --w-mse above 0 or --heal-local-steps 0")
        if self.trainable == "last":
            raise LayerpruneError("--heal-local-steps trains the layers below the cut's mapped state; --trainable "
                                  "last trains the top layers and the LM head",
                                  "use --trainable neighbours (or all, lora) or --heal-local-steps 0")


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """The benchmark suites (`bench`, `mmlu`: tasks/suite.py): how many items each task scores and
    which share of every task's items is reserved, never evaluated, for choosing recipes."""

    # 200 items a task: one `layerprune eval --tasks bench` of SmolLM2 with the original cached
    # takes about 5 minutes on two CPU cores (docs/evaluation.md has the interval widths it buys).
    items: int = opt(200, "items each benchmark task scores, the same for every model (0: the whole split, "
                          "less the calibration share)", flag="--bench-items")
    calibration: float = opt(0.2, "share of every benchmark task's items (by a hash of the item) reserved for "
                                  "choosing recipes and never evaluated", flag="--bench-calibration")
    cache: bool = opt(True, "keep the original's benchmark results in the layerprune cache folder and reuse them",
                      flag="--bench-cache")
    choice_items: int = opt(50, "items a task, from the calibration share, on which the quality metric scores "
                                "each candidate when --tasks names a suite (the paper's evaluation-based importance)",
                            flag="--bench-choice-items")
    side: str = opt("evaluation", "which items the suites score: evaluation (what is reported) or calibration "
                                  "(the reserved share: for choosing a recipe, never to report)", flag="--bench-side")

    def validate(self) -> None:
        non_negative(self, ("items",), "bench.")
        positive(self, ("choice_items",), "bench.")
        one_of(self.side, ("evaluation", "calibration"), "--bench-side")
        if self.side == "calibration" and self.calibration == 0:
            raise LayerpruneError("--bench-side calibration with --bench-calibration 0: no item is reserved",
                                  "give a share such as 0.2")
        if not 0 <= self.calibration < 1:
            raise LayerpruneError(f"--bench-calibration must be in [0, 1), got {self.calibration}",
                                  "give a share such as 0.2")
