"""Peak RSS per process of a `layerprune prune --trainable all` run: 1 process against 2 with --fsdp.

A random Llama built from a config (about 190M parameters, float32) is pruned by one layer: one
scoring round, the patch, a few healing steps that train every parameter, evaluation and the
output folder. Each process reports its own peak RSS (ru_maxrss) when the command returns; a
process that only imports torch and transformers gives the baseline. The model-state part
(teacher + student + the student's gradients and two AdamW moments, float32) is expected to be
20 bytes per parameter in one process and half that per process with 2 processes sharding it.
Printed side by side from the same invocation, medians of `--repeats` runs:

    python bench/bench_fsdp_memory.py               # 190M parameters, 3 repeats
    python bench/bench_fsdp_memory.py --repeats 1 --layers 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

STATE_BYTES_PER_PARAM = 4 * (1 + 1 + 1 + 2)   # teacher, student, gradients, AdamW's two moments


def make_model(folder: Path, layers: int) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from common import hf_char_tokenizer

    tokenizer = hf_char_tokenizer()
    config = LlamaConfig(vocab_size=32_000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def child(report: Path, argv: list[str]) -> None:
    """Run one command in this process, then write this process's peak RSS."""
    code = 0
    if argv:
        from layerprune.cli import main

        code = main(argv)
    else:
        import torch  # noqa: F401  the baseline: what every process holds before any model
        import transformers  # noqa: F401
    rank = int(os.environ.get("RANK", "0"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(f"{report}.{rank}").write_text(json.dumps({"rank": rank, "peak": peak, "code": code}))
    sys.exit(code)


def run(report: Path, argv: list[str], processes: int) -> list[int]:
    """Peak RSS of each process of one command."""
    for old in report.parent.glob(f"{report.name}.*"):
        old.unlink()
    launch = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run([*launch, __file__, "--child", str(report), "--", *argv], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))})
    if result.returncode != 0:
        raise SystemExit(f"run failed ({result.returncode}): {result.stderr[-3000:]}")
    reports = [json.loads(path.read_text()) for path in sorted(report.parent.glob(f"{report.name}.*"))]
    return [r["peak"] for r in sorted(reports, key=lambda r: r["rank"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child is not None:
        child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
        return
    from common import make_text_file

    gib = 2**30
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = make_model(tmp / "model", args.layers)
        make_text_file(tmp / "corpus.txt")

        def argv(out: str, fsdp: bool) -> list[str]:
            return ["prune", "--model", str(tmp / "model"), "--data", str(tmp / "corpus.txt"), "--out",
                    str(tmp / out), "--device", "cpu", "--remove", "1", "--metric", "bi", "--seq-len", "64",
                    "--calib-blocks", "4", "--eval-blocks", "2", "--heal-steps", "3", "--heal-batch-size", "2",
                    "--heal-grad-accum", "1", "--trainable", "all", "--final-tasks", "perplexity", "--no-speed",
                    "--quiet", "--overwrite", *(["--fsdp"] if fsdp else [])]

        rows = {"baseline (imports only)": [], "1 process": [], "2 processes, --fsdp": []}
        for _ in range(args.repeats):
            rows["baseline (imports only)"].append(run(tmp / "rss", [], 1))
            rows["1 process"].append(run(tmp / "rss", argv("one", False), 1))
            rows["2 processes, --fsdp"].append(run(tmp / "rss", argv("two", True), 2))
    base = statistics.median(r[0] for r in rows["baseline (imports only)"])
    state = params * STATE_BYTES_PER_PARAM
    print(f"random Llama, {args.layers} layers, {params / 1e6:.0f}M parameters; model state (teacher + student + "
          f"gradients + AdamW, float32) {state / gib:.2f} GiB in one process; medians of {args.repeats} runs\n")
    print("| run | peak RSS per process (GiB) | above the baseline | model state expected per process |")
    print("| --- | --- | --- | --- |")
    for name, runs in rows.items():
        per_rank = [statistics.median(run[rank] for run in runs) for rank in range(len(runs[0]))]
        shown = ", ".join(f"{peak / gib:.2f}" for peak in per_rank)
        if name.startswith("baseline"):
            print(f"| {name} | {shown} | - | - |")
            continue
        ways = len(per_rank)
        above = ", ".join(f"{(peak - base) / gib:.2f}" for peak in per_rank)
        print(f"| {name} | {shown} | {above} | {state / ways / gib:.2f} |")


if __name__ == "__main__":
    main()
