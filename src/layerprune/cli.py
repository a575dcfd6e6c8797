"""The command line: parse, build the same config objects as the Python API, call it.

Every user error arrives here as a LayerpruneError and leaves as one line on
stderr with exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from .config import DataConfig, HealConfig, PruneConfig
from .errors import LayerpruneError

EXIT_USER_ERROR = 2

DATA_HELP = {
    "source": ("--data", "text source: a .txt/.jsonl/.parquet file, embedded:wiki (default), embedded:news, "
                         "or a HF dataset id where the network allows"),
    "text_field": ("--text-field", "the text field of .jsonl/.parquet/HF data"),
    "seq_len": ("--seq-len", "tokens per block"),
    "calib_blocks": ("--calib-blocks", "calibration blocks, used to score layers"),
    "train_blocks": ("--train-blocks", "training blocks, used for healing"),
    "eval_blocks": ("--eval-blocks", "held-out blocks, used only for evaluation"),
    "batch_size": ("--batch-size", "blocks per forward pass when scoring and evaluating"),
}
HEAL_HELP = {
    "method": ("--heal", "healing after each removal: distill (the paper's) or none"),
    "steps": ("--heal-steps", "optimizer steps of healing after each removal"),
    "final_steps": ("--heal-final-steps", "extra healing steps after the last removal"),
    "batch_size": ("--heal-batch-size", "global micro-batch of training blocks"),
    "grad_accum": ("--heal-grad-accum", "micro-batches per optimizer step"),
    "lr": ("--heal-lr", "AdamW learning rate"),
    "warmup_steps": ("--heal-warmup-steps", "linear warm-up steps before the cosine decay"),
    "weight_decay": ("--heal-weight-decay", "AdamW weight decay"),
    "max_grad_norm": ("--heal-max-grad-norm", "gradient clipping norm"),
    "w_kl": ("--w-kl", "weight of KL(teacher || student) on logits (paper: 0.01)"),
    "temperature": ("--temperature", "softmax temperature of the KL term"),
    "w_mse": ("--w-mse", "weight of the MSE on mapped intermediate hidden states"),
    "w_final": ("--w-final", "weight of the MSE on the final (normed) hidden state"),
    "trainable": ("--trainable", "what trains: neighbours of the removed layer, all layers, or lora adapters"),
    "radius": ("--radius", "neighbours trained on each side of the cut"),
    "lora_r": ("--lora-r", "LoRA rank (with --trainable lora)"),
    "lora_alpha": ("--lora-alpha", "LoRA alpha (with --trainable lora)"),
    "mixed_precision": ("--mixed-precision", "no, bf16 or fp16 autocast for healing"),
    "teacher_topk": ("--teacher-topk", "teacher logits kept per token in the target cache (KL over these)"),
    "log_every": ("--heal-log-every", "update the progress bar's loss every N steps"),
    "checkpoint_every": ("--heal-checkpoint-every", "checkpoint healing every N steps (0: only between iterations)"),
}


def _add_fields(parser: argparse.ArgumentParser, cls, helps: dict, group_title: str) -> None:
    """One option per dataclass field, typed and defaulted from the dataclass itself."""
    group = parser.add_argument_group(group_title)
    for f in dataclasses.fields(cls):
        if f.name not in helps:
            continue
        flag, text = helps[f.name]
        kind = type(f.default) if f.default is not None else str
        group.add_argument(flag, dest=f"{cls.__name__}.{f.name}", type=kind, default=f.default, metavar=f.name.upper(),
                           help=f"{text} (default: {f.default})")


def _from_args(args: argparse.Namespace, cls, **extra):
    values = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith(f"{cls.__name__}.")}
    return cls(**values, **extra)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a local HF folder, a .gguf file or a hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    _add_fields(parser, DataConfig, DATA_HELP, "data")


def build_parser() -> argparse.ArgumentParser:
    from .importance import METRICS
    from .tasks import TASKS

    parser = argparse.ArgumentParser(prog="layerprune", description="Remove transformer layers one at a time, "
                                     "chosen by measured importance, and heal by distillation from the original.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save the result",
                       description="Score every layer, remove the least important, heal, repeat.")
    _common(p)
    p.add_argument("--out", required=True,
                   help="output folder; an unfinished run of the same options there is continued")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out (an error if none)")
    p.add_argument("--overwrite", action="store_true", help="delete what --out holds and start afresh")
    p.add_argument("--metric", default="quality", help=f"importance metric: {', '.join(METRICS)} (default: quality)")
    p.add_argument("--mode", default="iterative",
                   help="iterative (re-score after each removal), one-shot (score once, remove the lowest; "
                        "ShortGPT) or block (remove the most redundant contiguous block; Gromov et al.)")
    depth = p.add_mutually_exclusive_group(required=True)
    depth.add_argument("--target-layers", type=int, help="stop at this many layers")
    depth.add_argument("--remove", type=int, help="remove this many layers")
    p.add_argument("--protect-first", type=int, default=0, help="never remove the first N layers (default: 0)")
    p.add_argument("--protect-last", type=int, default=0, help="never remove the last N layers (default: 0)")
    p.add_argument("--tasks", default="perplexity,token_accuracy",
                   help=f"comma-separated tasks the quality metric measures on calibration text ({', '.join(TASKS)})")
    p.add_argument("--eval-tasks", default="perplexity,token_accuracy,kl",
                   help="comma-separated tasks evaluated on held-out text after each removal")
    p.add_argument("--final-tasks", default="perplexity,token_accuracy,kl,continuation,copy,copy_generate",
                   help="comma-separated tasks of the final report (also mmlu, mc:FILE.jsonl)")
    p.add_argument("--no-speed", action="store_true", help="skip measuring prefill/decode speed for the report")
    p.add_argument("--shortlist", type=int, default=None,
                   help="score only the N layers Block Influence ranks lowest with the expensive metric")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--mse-layers", default=None,
                   help="comma-separated ORIGINAL layer indices whose outputs the MSE term matches "
                        "(default: the layer just above each cut)")
    _add_fields(p, HealConfig, HEAL_HELP, "healing")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory when healing")
    p.add_argument("--no-teacher-cache", action="store_true",
                   help="run the teacher and the whole student every healing step (the straightforward loop)")

    s = sub.add_parser("score", help="print the importance of every layer (original indices)")
    _common(s)
    s.add_argument("--metric", default="bi", help=f"importance metric: {', '.join(METRICS)} (default: bi)")
    s.add_argument("--tasks", default="perplexity,token_accuracy", help="tasks for the quality metric")
    add_eval_parser(sub)
    add_compare_parser(sub)
    return parser


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model on held-out tasks (against a teacher)")
    _common(e)
    e.add_argument("--teacher", default=None, help="the original model, for kl and quality retained")
    e.add_argument("--tasks", default="perplexity,token_accuracy,continuation,copy",
                   help="comma-separated tasks: perplexity, token_accuracy, kl, continuation, copy, copy_generate, "
                        "mmlu, mc:FILE.jsonl")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.add_argument("--seed", type=int, default=0, help="sample seed of the tasks (default: 0)")


def run_eval(args) -> int:
    from .api import evaluate

    result = evaluate(args.model, args.teacher, _names(args.tasks), _from_args(args, DataConfig), args.dtype,
                      args.device, args.seed)
    teacher = result.get("teacher_tasks", {})
    print(f"{'task':<16} {'measure':<12} {'model':>10} {'teacher':>10} {'retained':>9}")
    for task, values in result["tasks"].items():
        for key, value in values.items():
            ref = teacher.get(task, {}).get(key)
            retained = f"{value / ref:9.3f}" if key == "score" and ref else ""
            print(f"{task:<16} {key:<12} {value:>10.4f} {'' if ref is None else f'{ref:10.4f}':>10} {retained}")
    if "quality_retained" in result:
        print(f"quality retained: {result['quality_retained']:.4f}")
    if args.json:
        from .pipeline import write_json

        write_json(Path(args.json), result)
    return 0


def add_compare_parser(sub) -> None:
    from .compare import METHODS

    c = sub.add_parser("compare", help="the paper's method against the baselines, with and without healing",
                       description="Runs ShortGPT (one-shot BI), iterative BI, angular block removal (Gromov et al.), "
                                   "SLEB-style iterative NLL and the paper's method on the same model, data and "
                                   "budgets; writes compare.json, compare.md and compare.png.")
    _common(c)
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--remove", default="2,4,6", help="comma-separated layer counts to remove (default: 2,4,6)")
    c.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    c.add_argument("--healing", default="none,distill", help="none, distill or both (default: none,distill)")
    c.add_argument("--tasks", default="perplexity,token_accuracy", help="tasks of the quality metric")
    c.add_argument("--eval-tasks", default="perplexity,token_accuracy,kl", help="held-out tasks compared")
    c.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _add_fields(c, HealConfig, HEAL_HELP, "healing")


def run_compare(args) -> int:
    from .compare import compare

    try:
        counts = [int(n) for n in _names(args.remove)]
    except ValueError as err:
        raise LayerpruneError(f"--remove {args.remove!r} is not a list of numbers", "pass e.g. --remove 2,4,6") from err
    config = PruneConfig(out=args.out, model=args.model, remove=max(counts) if counts else 1, tasks=_names(args.tasks),
                         eval_tasks=_names(args.eval_tasks), final_tasks=(), measure_speed=False, dtype=args.dtype,
                         device=args.device, seed=args.seed, data=_from_args(args, DataConfig),
                         heal=_from_args(args, HealConfig))
    summary = compare(config, counts, _names(args.methods), _names(args.healing), progress=not args.quiet)
    print((Path(args.out) / "compare.md").read_text(encoding="utf-8"))
    return 0 if summary["results"] else 1


def run_prune(args) -> int:
    from .pipeline import prune

    mse_layers = tuple(int(x) for x in _names(args.mse_layers)) if args.mse_layers else None
    heal = _from_args(args, HealConfig, mse_layers=mse_layers, gradient_checkpointing=args.gradient_checkpointing,
                      teacher_cache=not args.no_teacher_cache)
    config = PruneConfig(out=args.out, model=args.model, metric=args.metric, mode=args.mode,
                         target_layers=args.target_layers, remove=args.remove, protect_first=args.protect_first,
                         protect_last=args.protect_last, tasks=_names(args.tasks), eval_tasks=_names(args.eval_tasks),
                         final_tasks=_names(args.final_tasks), measure_speed=not args.no_speed,
                         shortlist=args.shortlist, dtype=args.dtype, device=args.device, seed=args.seed,
                         data=_from_args(args, DataConfig), heal=heal)
    prune(config, progress=not args.quiet, resume=args.resume, overwrite=args.overwrite)
    return 0


def run_score(args) -> int:
    from .api import score

    rows = score(args.model, args.metric, _from_args(args, DataConfig), _names(args.tasks), args.dtype, args.device,
                 progress=not args.quiet)
    ranked = sorted(range(len(rows)), key=lambda i: rows[i]["score"])
    rank = {i: r + 1 for r, i in enumerate(ranked)}
    print(f"{'layer':>5} {'current':>7} {args.metric:>12} {'rank':>5}  (rank 1 = least important)")
    for i, row in enumerate(rows):
        print(f"{row['layer']:>5} {row['current']:>7} {row['score']:>12.6f} {rank[i]:>5}")
    return 0


COMMANDS = {"prune": run_prune, "score": run_score, "eval": run_eval, "compare": run_compare}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    for noisy in ("transformers", "accelerate", "gensim", "smart_open"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command](args)
    except LayerpruneError as err:
        if args.debug:
            raise
        print(f"layerprune: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("layerprune: interrupted", file=sys.stderr)
        return 130
