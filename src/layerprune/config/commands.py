"""The configuration of each command: `score`, `eval`, `prune` and `compare` (which share a
`Recipe`), and `export-gguf`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import LayerpruneError
from ..options import flag_of
from .fields import (COMPARE_METHODS, DEVICES, DTYPES, GGUF_TYPES, HEAL_METHODS, MODES, PATCH_FITS, PATCH_TARGETS,
                     PATCHES, REMOVAL_METRICS, gguf_type, non_negative, one_of, opt, positive)
from .parts import BenchConfig, DataConfig, HealConfig


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
        one_of(self.dtype, DTYPES, "dtype")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise LayerpruneError(f"unknown device {self.device!r}", "use auto, cpu, cuda or cuda:N")
        non_negative(self, ("seed",))
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
    split: str = opt("eval", "which text the text tasks read: eval (held-out, what is reported) or calib (the "
                             "calibration documents, training-side: for choosing a recipe, with --bench-side "
                             "calibration for the suites)")
    bench: BenchConfig = opt(BenchConfig(), "")

    def validate(self) -> None:
        super().validate()
        one_of(self.split, ("eval", "calib"), "--split")
        self.bench.validate()


@dataclass(frozen=True, kw_only=True)
class Recipe(ModelConfig):
    """How layers are chosen, evaluated and healed: shared by `prune` and `compare`."""

    # the folder is the run's identity however its path is spelled, moved or not
    out: str = opt("", "output folder; an unfinished run of the same options there is continued", result=False)
    tasks: tuple[str, ...] = opt(("perplexity", "token_accuracy"),
                                 "tasks the quality metric measures on calibration text")
    eval_tasks: tuple[str, ...] = opt(("perplexity", "token_accuracy", "kl"),
                                      "held-out tasks after each removal; quality retained is their mean")
    # adds a held-out figure to the report; a resumed run has it for what it heals
    eval_before_heal: bool = opt(False, "also evaluate each cut on the held-out text before healing it, for the "
                                        "report's held-out KL before -> after (one more held-out evaluation per "
                                        "removal; without it the report gives the guard's validation KL)",
                                 result=False)
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
    bench: BenchConfig = opt(BenchConfig(), "", result=False)   # read by the final report alone

    def validate(self) -> None:
        super().validate()
        if not self.out:
            raise LayerpruneError("no output folder given", "pass --out FOLDER")
        if not self.tasks:
            raise LayerpruneError("no importance tasks given", "name at least one task with --tasks")
        if not self.eval_tasks:
            raise LayerpruneError("no evaluation tasks given", "name at least one task with --eval-tasks")
        non_negative(self, ("protect_first", "protect_last"))
        one_of(self.patch, PATCHES, "patch")
        one_of(self.patch_target, PATCH_TARGETS, "patch target")
        one_of(self.patch_fit, PATCH_FITS, "patch fit")
        for name in ("shortlist", "screen"):
            if getattr(self, name) is not None:
                non_negative(self, (name,))
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
    measure_speed: bool = opt(True, "measure prefill/decode speed of original and pruned for the report", result=False,
                              flag="--speed")
    gguf: bool = opt(True, "also write model.gguf when the model came from a .gguf file (the embedded default "
                           "did); --no-gguf skips it, `layerprune export-gguf` writes it later", result=False)
    gguf_type: str = gguf_type()
    fsdp: bool = opt(False, "shard the student and the teacher over the launched processes with PyTorch FSDP2 "
                            "(under `accelerate launch` or `torchrun`, 2 or more processes)")

    def validate(self) -> None:
        super().validate()
        one_of(self.mode, MODES, "mode")

        one_of(self.gguf_type, GGUF_TYPES, "--gguf-type")
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
        positive(self, [name for name in ("target_layers", "remove") if getattr(self, name) is not None])
        if self.fsdp and self.heal.method != "none" and self.heal.train_data in ("teacher", "mix"):
            raise LayerpruneError(f"--train-data {self.heal.train_data} generates with the whole original, which "
                                  "--fsdp shards", "use --train-data stream with --fsdp, or run without --fsdp")

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
                                           "difference from layerprune's, in compare.md); and copy_generate (or "
                                           "copy_generate:plain): generation retention on held-out paragraphs")
    unseen_data: str | None = opt("embedded:news", "a second held-out text, of a domain nothing is trained or "
                                                   "scored on, all of it read as held-out text (--eval-tokens); "
                                                   "quality retained is reported on it too")
    seeds: tuple[int, ...] | None = opt(None, "comma-separated seeds, each variant run once per seed (default: "
                                              "--seed); a seed changes healing's data order and sampled task items")
    heal_scales: tuple[float, ...] = opt((1.0,), "multiples of the healing steps per removal every healed variant "
                                                 "runs at (e.g. 0.5,1,2: rows '... at 2x healing'), for the frontier "
                                                 "of retention against seconds")
    scaled_methods: tuple[str, ...] | None = opt(None, "the methods --heal-scales applies to (default: every "
                                                       "healed one); the others run at their own budget only")
    equal_seconds: str | None = opt(None, "a method among --methods whose healed variant sets the budget: every "
                                          "other healed variant runs again at each count with the healing steps "
                                          "that make its seconds (scoring, cuts, healing) equal that variant's "
                                          "(rows '... @ equal seconds')")

    def validate(self) -> None:
        super().validate()
        if not self.counts or min(self.counts) < 1:
            raise LayerpruneError("layer counts to compare must be positive", "pass e.g. --remove 2,4,6")
        unknown = [m for m in self.methods if m not in COMPARE_METHODS]
        if unknown or not self.methods:
            raise LayerpruneError(f"unknown method(s) {unknown}", f"use some of {', '.join(COMPARE_METHODS)}")
        for heal in self.healing:
            one_of(heal, HEAL_METHODS, "healing")
        if self.seeds is not None and not self.seeds:
            raise LayerpruneError("--seeds is empty", "give distinct seeds, e.g. --seeds 0,1, or leave --seeds out")
        scales = self.heal_scales
        if 1 not in scales or min(scales) <= 0 or len(set(scales)) != len(scales):
            raise LayerpruneError(f"--heal-scales {','.join(f'{s:g}' for s in scales)} must be distinct positive "
                                  "multiples, 1 (the comparison's own budget) among them", "give e.g. 0.5,1,2")
        stray = [m for m in self.scaled_methods or () if m not in self.methods]
        if stray or self.scaled_methods == ():
            raise LayerpruneError(f"--scaled-methods names {', '.join(stray) or 'no method'}, not among --methods",
                                  f"name some of {', '.join(self.methods)}, or leave --scaled-methods out")
        if self.equal_seconds is not None and (self.equal_seconds not in self.methods or "distill" not in self.healing):
            raise LayerpruneError(f"--equal-seconds {self.equal_seconds} names no healed variant of this comparison",
                                  f"name one of --methods ({', '.join(self.methods)}) and keep distill in --healing")
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
    gguf_type: str = gguf_type()

    def validate(self) -> None:
        one_of(self.gguf_type, GGUF_TYPES, "--gguf-type")
