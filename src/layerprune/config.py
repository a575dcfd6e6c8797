"""The typed configuration of every command: the only place defaults live.

Each field carries its help text (and, where it differs from the field name,
its flag) in `metadata`, so the CLI generates every option from here and a
YAML file (`--config run.yaml`, nested `data:` and `heal:` sections) fills
the same fields. The precedence is defaults < YAML < flags. Configs are
frozen, so the exact object that produced a result is what a run writes to
`config.yaml` (options.py turns configs into YAML and back), and
`layerprune prune --config OUT/config.yaml --out NEW` repeats it.

Structural checks live in `validate()`; names of metrics and tasks are
checked by the modules that own those registries (importance.py, tasks/).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import LayerpruneError
from .options import flag_of

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
MODES = ("iterative", "one-shot", "block")
HEAL_METHODS = ("distill", "none")
TRAINABLE = ("neighbours", "all", "lora", "last")
COMPARE_METHODS = ("shortgpt", "iterative-bi", "angular-block", "sleb-nll", "replaceme", "last-layers",
                   "last-layers-ft", "layerprune")
PATCHES = ("none", "lstsq", "diag")
PATCH_TARGETS, PATCH_FITS = ("layer", "teacher"), ("lstsq", "normalised", "cosine")
TRAIN_DATA, MSE_SCALES = ("stream", "reuse", "teacher"), ("raw", "relative", "channel")
GGUF_TYPES = ("source", "q8_0", "f16", "f32")
# The metrics that score a layer by removing it (and so score patched candidates, on a shortlist, screened).
REMOVAL_METRICS = ("nll", "quality")
# The healing budget when neither --heal-tokens nor --heal-steps is given.
DEFAULT_HEAL_STEPS = 30


def opt(default, help: str, flag: str | None = None, **kw):
    """A config field with its help text and optional flag name."""
    metadata = {"help": help, **({"flag": flag} if flag else {})}
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=metadata)
    return field(default=default, metadata=metadata, **kw)


def _gguf_type():
    """One declaration for `prune` and `export-gguf`."""
    return opt("source", "the type of the tensors the run changed, in model.gguf: source (their type in the source "
                         "GGUF where gguf can quantise it, else Q8_0), or q8_0, f16, f32 (larger, closer to the HF "
                         "folder)")


def _positive(obj, names, prefix: str = "") -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise LayerpruneError(f"{prefix}{name} must be at least 1, got {getattr(obj, name)}",
                                  f"pass a positive {flag_of(type(obj), name)}")


def _non_negative(obj, names, prefix: str = "") -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise LayerpruneError(f"{prefix}{name} must be >= 0, got {getattr(obj, name)}",
                                  f"pass a non-negative {flag_of(type(obj), name)}")


def _one_of(value, allowed, what: str) -> None:
    if value not in allowed:
        raise LayerpruneError(f"unknown {what} {value!r}", f"use one of {', '.join(allowed)}")


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
        _positive(self, ("seq_len", "calib_tokens", "eval_tokens", "patch_tokens", "val_tokens", "batch_size"))
        for name in ("calib_blocks", "eval_blocks", "patch_blocks"):
            if getattr(self, name) is not None:
                _positive(self, (name,))
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
                                    "training text (generated once, before the first removal)")
    final_steps: int = opt(0, "extra healing steps after the last removal", flag="--heal-final-steps")
    batch_size: int = opt(2, "global micro-batch of training blocks", flag="--heal-batch-size")
    grad_accum: int = opt(2, "micro-batches per optimizer step", flag="--heal-grad-accum")
    lr: float = opt(5e-4, "AdamW learning rate", flag="--heal-lr")
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
    gradient_checkpointing: bool = opt(False, "trade compute for memory when healing")
    guard: bool = opt(True, "watch every healing on validation text (KL to the original before, at each "
                            "checkpoint step, at the end), keep the best state, the unhealed cut included, and retry "
                            "at a quarter of the lr when healing made it worse", flag="--heal-guard")
    guard_retries: int = opt(2, "lower-lr retries of a healing the guard finds worse than its cut",
                             flag="--heal-guard-retries")
    log_every: int = opt(5, "update the progress bar's loss every N steps", flag="--heal-log-every")
    # A crash mid-healing loses at most this many steps.
    checkpoint_every: int = opt(10, "checkpoint healing every N steps (0: only between iterations)",
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
        _one_of(self.method, HEAL_METHODS, "healing method")
        _one_of(self.trainable, TRAINABLE, "trainable set")
        _one_of(self.mixed_precision, ("no", "bf16", "fp16"), "mixed precision")
        _one_of(self.mse_scale, MSE_SCALES, "MSE scale")
        _one_of(self.train_data, TRAIN_DATA, "training data mode")
        _non_negative(self, ("final_steps", "warmup_steps", "radius", "checkpoint_every", "guard_retries",
                             "local_steps"), "heal ")
        _positive(self, ("batch_size", "grad_accum", "lora_r", "log_every", "teacher_topk", "epochs"), "heal ")
        if self.steps is not None and self.tokens is not None:
            raise LayerpruneError("both --heal-steps and --heal-tokens given", "give the healing budget once")
        for name in ("steps", "tokens"):
            if getattr(self, name) is not None:
                _non_negative(self, (name,), "heal ")
        for name in ("cache_memory", "cache_disk"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise LayerpruneError(f"{flag_of(HealConfig, name)} must be a positive number of GiB, got "
                                      f"{getattr(self, name)}", "give e.g. 4, or --no-teacher-cache to cache nothing")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise LayerpruneError(f"heal {name} must be > 0, got {getattr(self, name)}",
                                      f"pass a positive {flag_of(HealConfig, name)}")
        if min(self.w_kl, self.w_mse, self.w_final) < 0 or self.w_kl + self.w_mse + self.w_final == 0:
            raise LayerpruneError("distillation loss weights must be >= 0 and not all zero",
                                  "set --w-kl, --w-mse, --w-final accordingly")
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

    def validate(self) -> None:
        _non_negative(self, ("items",), "bench.")
        if not 0 <= self.calibration < 1:
            raise LayerpruneError(f"--bench-calibration must be in [0, 1), got {self.calibration}",
                                  "give a share such as 0.2")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What every command reads: a model, where it runs, and text."""

    model: str | None = opt(None, "a local HF folder, a .gguf file or a hub id "
                                  "(default: the embedded SmolLM2-135M-Instruct)")
    dtype: str = opt("float32", "float32, bfloat16 or float16")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    seed: int = opt(0, "random seed (data sampling, healing)")
    data: DataConfig = opt(DataConfig(), "")

    def validate(self) -> None:
        _one_of(self.dtype, DTYPES, "dtype")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise LayerpruneError(f"unknown device {self.device!r}", "use auto, cpu, cuda or cuda:N")
        _non_negative(self, ("seed",))
        self.data.validate()


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(ModelConfig):
    """`layerprune score`: rank the layers of a model once."""

    metric: str = opt("bi", "importance metric: bi, angular, angular_last, nll, quality")
    tasks: tuple[str, ...] = opt(("perplexity", "token_accuracy"), "tasks the quality metric measures")


@dataclass(frozen=True, kw_only=True)
class EvalConfig(ModelConfig):
    """`layerprune eval`: held-out scores of a model, against a teacher."""

    teacher: str | None = opt(None, "the original model, for kl, quality retained and benchmark retention (default: "
                                    "the original named in --model's history.json, when it is a layerprune run)")
    tasks: tuple[str, ...] = opt(("perplexity", "token_accuracy", "continuation", "copy"),
                                 "tasks: bench (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA), mmlu "
                                 "(5-shot), perplexity, token_accuracy, kl, continuation, copy, copy_generate, "
                                 "mc:FILE.jsonl, lm_eval:NAME[@DIR]")
    json: str | None = opt(None, "also write the results (per-item benchmark results included) to this JSON file")
    bench: BenchConfig = opt(BenchConfig(), "")

    def validate(self) -> None:
        super().validate()
        self.bench.validate()


@dataclass(frozen=True, kw_only=True)
class Recipe(ModelConfig):
    """How layers are chosen, evaluated and healed: shared by `prune` and `compare`."""

    out: str = opt("", "output folder; an unfinished run of the same options there is continued")
    tasks: tuple[str, ...] = opt(("perplexity", "token_accuracy"),
                                 "tasks the quality metric measures on calibration text")
    eval_tasks: tuple[str, ...] = opt(("perplexity", "token_accuracy", "kl"),
                                      "held-out tasks after each removal; quality retained is their mean")
    eval_before_heal: bool = opt(False, "also evaluate each cut on the held-out text before healing it, for the "
                                        "report's held-out KL before -> after (one more held-out evaluation per "
                                        "removal; without it the report gives the guard's validation KL)")
    protect_first: int = opt(0, "never remove the first N layers")
    protect_last: int = opt(0, "never remove the last N layers")
    # 12: on SmolLM2 the shortlist chose the same six layers at -6 as scoring all 30 (docs/heal-sweep.md),
    # and it pays for the larger calibration budget: 12 x 32 candidate-blocks a round against 30 x 8 before.
    shortlist: int | None = opt(12, "score only the N layers Block Influence ranks lowest with the expensive metric "
                                    "(0: every layer)")
    # 4: on SmolLM2's rounds 1 and 3 the full winner was among the first quarter's 4 best for every choice
    # of that quarter (28 of 28), and a round took 0.52-0.56 of the time (bench/bench_screen.py).
    screen: int | None = opt(4, "score every candidate on the first quarter of the calibration text, and only the N "
                                "least important of those on the rest (0: every candidate on all of it)")
    # lstsq by default: in the recipe sweep (docs/heal-sweep.md, validation text from the training split)
    # it was level with no patch at 2 removals and ahead at 6, with a 12% lower KL to the original there.
    patch: str = opt("lstsq", "closed-form linear patch at each cut, folded into the layer below: lstsq (a full "
                              "matrix), diag (a diagonal) or none (the paper's plain removal); the removal metrics "
                              "then score patched candidates")
    patch_target: str = opt("layer", "what the patch reproduces: layer (the removed layers' output in the current "
                                     "model, as ReplaceMe) or teacher (the original's state at that depth, which "
                                     "also absorbs what earlier cuts left)")
    patch_fit: str = opt("lstsq", "how the cut's patch is fitted: lstsq (closed form), normalised (least squares "
                                  "with each token's error relative to its target's size, so massive-activation "
                                  "tokens do not dominate; closed form) or cosine (ReplaceMe's mean cosine distance, "
                                  "by Adam from the identity)")
    heal: HealConfig = opt(HealConfig(), "")
    bench: BenchConfig = opt(BenchConfig(), "")

    def validate(self) -> None:
        super().validate()
        if not self.out:
            raise LayerpruneError("no output folder given", "pass --out FOLDER")
        if not self.tasks:
            raise LayerpruneError("no importance tasks given", "name at least one task with --tasks")
        if not self.eval_tasks:
            raise LayerpruneError("no evaluation tasks given", "name at least one task with --eval-tasks")
        _non_negative(self, ("protect_first", "protect_last"))
        _one_of(self.patch, PATCHES, "patch")
        _one_of(self.patch_target, PATCH_TARGETS, "patch target")
        _one_of(self.patch_fit, PATCH_FITS, "patch fit")
        for name in ("shortlist", "screen"):
            if getattr(self, name) is not None:
                _non_negative(self, (name,))
        self.heal.validate()
        self.bench.validate()
        steps = self.heal.steps_per_removal(self.data.seq_len)
        if self.heal.method != "none" and self.heal.local_steps > steps:
            raise LayerpruneError(f"--heal-local-steps {self.heal.local_steps} is more than the {steps} healing steps "
                                  "of a removal (the local steps are the first of them)",
                                  f"give --heal-local-steps up to {steps}, or raise --heal-steps")


@dataclass(frozen=True, kw_only=True)
class PruneConfig(Recipe):
    """One pruning run: which model, how many layers, chosen how, healed how."""

    metric: str = opt("quality", "importance metric: quality, nll, bi, angular, angular_last, reverse (the layers "
                                 "before the last)")
    mode: str = opt("iterative", "iterative (re-score after each removal), one-shot (score once, remove the "
                                 "lowest; ShortGPT) or block (the most redundant contiguous block; Gromov et al.)")
    target_layers: int | None = opt(None, "stop at this many layers")
    remove: int | None = opt(None, "remove this many layers")
    target_params: str | None = opt(None, "stop at this many parameters or fewer (e.g. 200M, 1.5B): embeddings, "
                                          "kept layers, norm and an untied LM head")
    target_speedup: float | None = opt(None, "remove the fewest layers whose prefill is this many times faster, "
                                             "measured on this device (e.g. 1.2)")
    speedup_estimate: bool = opt(False, "--target-speedup from the layer count (depth / kept), not measured")
    final_tasks: tuple[str, ...] = opt(("perplexity", "token_accuracy", "kl", "continuation", "copy",
                                        "copy_generate"),
                                       "tasks of the final report's suite (also mmlu, mc:FILE.jsonl)")
    measure_speed: bool = opt(True, "measure prefill/decode speed of original and pruned for the report",
                              flag="--speed")
    gguf: bool = opt(True, "also write model.gguf when the model came from a .gguf file (the embedded default "
                           "did); --no-gguf skips it, `layerprune export-gguf` writes it later")
    gguf_type: str = _gguf_type()
    fsdp: bool = opt(False, "shard the student and the teacher over the launched processes with PyTorch FSDP2 "
                            "(under `accelerate launch` or `torchrun`, 2 or more processes)")

    def validate(self) -> None:
        super().validate()
        _one_of(self.mode, MODES, "mode")

        _one_of(self.gguf_type, GGUF_TYPES, "--gguf-type")
        if self.mode == "block" and self.metric not in ("angular", "angular_last", "bi"):
            raise LayerpruneError(f"block mode needs a hidden-state metric, not {self.metric!r}",
                                  "use --metric angular_last (Gromov et al.) or bi with --mode block")
        targets = (self.target_layers, self.remove, self.target_params, self.target_speedup)
        if sum(target is not None for target in targets) != 1:
            raise LayerpruneError("give exactly one of --target-layers, --remove, --target-params and "
                                  "--target-speedup", "pass e.g. --target-layers N or --remove K")
        if self.target_speedup is not None and not self.target_speedup > 1:
            raise LayerpruneError(f"--target-speedup must be above 1, got {self.target_speedup}",
                                  "ask for e.g. 1.2 (20% faster prefill)")
        _positive(self, [name for name in ("target_layers", "remove") if getattr(self, name) is not None])
        if self.fsdp and self.heal.method != "none" and self.heal.train_data == "teacher":
            raise LayerpruneError("--train-data teacher generates with the whole original, which --fsdp shards",
                                  "use --train-data stream with --fsdp, or run without --fsdp")

    def ignored(self) -> list[str]:
        """The options given (away from their defaults) that this configuration never reads, each
        with what would make it count: a run logs them instead of doing without them in silence."""
        heal, data = self.heal, self.data
        rules = [   # (config, field, ignored when, what it needs)
            (self, "tasks", self.metric != "quality", "--metric quality"),
            *[(self, name, self.metric not in REMOVAL_METRICS or self.mode == "block",
               f"--metric {' or '.join(REMOVAL_METRICS)} outside --mode block") for name in ("shortlist", "screen")],
            *[(self, name, self.patch == "none", "--patch lstsq or diag") for name in ("patch_target", "patch_fit")],
            *[(data, name, self.patch == "none", "--patch lstsq or diag") for name in ("patch_tokens", "patch_blocks")],
            (self, "speedup_estimate", self.target_speedup is None, "--target-speedup"),
            (self, "gguf_type", not self.gguf, "model.gguf written (drop --no-gguf)"),
            *[(heal, f.name, heal.method == "none", "--heal distill")
              for f in dataclasses.fields(heal) if f.name != "method"],
            *[(heal, name, heal.trainable != "lora", "--trainable lora") for name in ("lora_r", "lora_alpha")],
            (heal, "radius", heal.trainable != "neighbours", "--trainable neighbours"),
            (heal, "guard_retries", not heal.guard, "the healing guard (drop --no-heal-guard)"),
            (data, "val_tokens", not heal.guard or heal.method == "none", "the healing guard"),
            *[(heal, name, not heal.teacher_cache, "the teacher cache") for name in ("cache_memory", "cache_disk")],
        ]
        found = {}
        for config, name, unused, needs in rules:
            default = {f.name: f for f in dataclasses.fields(config)}[name].default
            if unused and getattr(config, name) != default:
                found.setdefault(flag_of(type(config), name), needs)
        return [f"{flag} has no effect here: it applies with {needs}" for flag, needs in found.items()]

    def most_removable(self, depth: int) -> int:
        """How many of `depth` layers may go: the unprotected ones, one layer always kept."""
        return min(depth - 1, depth - self.protect_first - self.protect_last)

    def removable(self, depth: int) -> list[int]:
        """Current indices that may be removed: all but the protected first and last layers."""
        return list(range(self.protect_first, depth - self.protect_last))


@dataclass(frozen=True, kw_only=True)
class CompareConfig(Recipe):
    """`layerprune compare`: the method against the baselines on the same inputs and budgets."""

    counts: tuple[int, ...] = opt((2, 4, 6), "comma-separated layer counts to remove", flag="--remove")
    methods: tuple[str, ...] = opt(COMPARE_METHODS, "comma-separated subset of the methods")
    healing: tuple[str, ...] = opt(HEAL_METHODS[::-1], "none, distill or both")
    final_tasks: tuple[str, ...] = opt((), "benchmark suites every variant is scored on at every count: bench, mmlu "
                                           "(retention per task family, chance-corrected, and each variant's paired "
                                           "difference from layerprune's, in compare.md)")
    unseen_data: str | None = opt("embedded:news", "a second held-out text, of a domain nothing is trained or "
                                                   "scored on, all of it read as held-out text (--eval-tokens); "
                                                   "quality retained is reported on it too")
    seeds: tuple[int, ...] | None = opt(None, "comma-separated seeds, each variant run once per seed (default: "
                                              "--seed); a seed changes healing's data order and sampled task items")

    def validate(self) -> None:
        super().validate()
        if not self.counts or min(self.counts) < 1:
            raise LayerpruneError("layer counts to compare must be positive", "pass e.g. --remove 2,4,6")
        unknown = [m for m in self.methods if m not in COMPARE_METHODS]
        if unknown or not self.methods:
            raise LayerpruneError(f"unknown method(s) {unknown}", f"use some of {', '.join(COMPARE_METHODS)}")
        for heal in self.healing:
            _one_of(heal, HEAL_METHODS, "healing")
        if self.seeds is not None and not self.seeds:
            raise LayerpruneError("--seeds is empty", "give distinct seeds, e.g. --seeds 0,1, or leave --seeds out")
        seeds = self.seeds or ()
        if len(set(seeds)) != len(seeds) or min(seeds, default=0) < 0:
            raise LayerpruneError(f"--seeds {','.join(map(str, self.seeds))} repeats a seed or has a negative one",
                                  "give distinct seeds, e.g. --seeds 0,1")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """`layerprune export-gguf RUN_DIR`: a finished run's model as GGUF, from the GGUF it started from."""

    source: str | None = opt(None, "the .gguf file the run started from (default: the model named in the run's "
                                   "history.json)")
    output: str | None = opt(None, "the GGUF file to write (default: RUN_DIR/model.gguf, and the model card "
                                   "gains a GGUF section)")
    gguf_type: str = _gguf_type()

    def validate(self) -> None:
        _one_of(self.gguf_type, GGUF_TYPES, "--gguf-type")
