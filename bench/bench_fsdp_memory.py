"""Peak RSS per process of a `layerprune prune --trainable all` run: 1 process against 2 with --fsdp.

A random Llama built from a config (174M parameters, float32) is pruned by one layer: one
scoring round, the patch, a few healing steps that train every layer, evaluation and the output
folder. Each process counts, after every healing step, the bytes it holds of the model state
(the teacher's and the student's parameters, the student's gradients and AdamW's two moments;
exact, from the tensors: a shard's local part), and reports its peak RSS (ru_maxrss) when the
command returns; processes that only import torch and transformers (and, for 2, join their
process group) give the baselines. Expected per process: 4 bytes x (teacher + student + 3 x
trained parameters), divided by the number of processes with --fsdp.
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

def make_model(folder: Path, layers: int) -> tuple[int, int]:
    """Save the model; return its parameter count and one layer's."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from common import hf_char_tokenizer

    tokenizer = hf_char_tokenizer()
    config = LlamaConfig(vocab_size=32_000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.model.layers[0].parameters())


def local_bytes(tensor) -> int:
    """Bytes this process holds of a tensor: its shard of a DTensor, all of a plain one."""
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def watch_model_state(seen: dict) -> None:
    """At every optimizer step (after AdamW's update, before the gradients are freed), count what
    this process holds of the teacher's and the student's parameters, the student's gradients and
    the optimizer's states, exactly, from the tensors."""
    import torch

    import layerprune.healing.loop as heal
    import layerprune.run as run

    setup, step = run.PruneRun.setup, heal._Attempt._step

    def kept_setup(self):
        seen["teacher"] = self.inputs.teacher
        return setup(self)

    def counted_step(self, n):
        optimizer, student = self.optimizer.optimizer, self.accelerator.unwrap_model(self.model)

        def count(*_):
            params = sum(local_bytes(p) for p in student.parameters())
            grads = sum(local_bytes(p.grad) for p in student.parameters() if p.grad is not None)
            states = sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)
            teacher = sum(local_bytes(p) for p in seen["teacher"].parameters())
            seen["state"] = max(seen.get("state", 0), params + grads + states + teacher)

        handle = optimizer.register_step_post_hook(count)
        try:
            return step(self, n)
        finally:
            handle.remove()

    run.PruneRun.setup, heal._Attempt._step = kept_setup, counted_step


def child(report: Path, argv: list[str]) -> None:
    """Run one command in this process, then write this process's peak RSS and model state."""
    code, seen = 0, {}
    if argv:
        from layerprune.cli import main

        watch_model_state(seen)
        code = main(argv)
    else:   # the baseline: what every process holds before any model
        import transformers  # noqa: F401

        from layerprune.processes import process_state

        process_state("cpu").wait_for_everyone()
    rank = int(os.environ.get("RANK", "0"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(f"{report}.{rank}").write_text(json.dumps({"rank": rank, "peak": peak, "state": seen.get("state", 0),
                                                    "code": code}))
    sys.exit(code)


def run(report: Path, argv: list[str], processes: int) -> list[dict]:
    """Peak RSS and model state of each process of one command."""
    for old in report.parent.glob(f"{report.name}.*"):
        old.unlink()
    launch = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run([*launch, __file__, "--child", str(report), "--", *argv], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))})
    if result.returncode != 0:
        raise SystemExit(f"run failed ({result.returncode}): {result.stderr[-3000:]}")
    reports = [json.loads(path.read_text()) for path in sorted(report.parent.glob(f"{report.name}.*"))]
    return sorted(reports, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-model", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child is not None:
        child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
        return
    if args.make_model is not None:
        print(json.dumps(make_model(args.make_model, args.layers)))
        return
    from common import make_text_file

    gib = 2**30
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # in a process of its own: a child inherits its parent's peak RSS, so this one stays small
        made = subprocess.run([sys.executable, __file__, "--make-model", str(tmp / "model"), "--layers",
                               str(args.layers)], check=True, capture_output=True, text=True)
        params, per_layer = json.loads(made.stdout.strip().splitlines()[-1])
        make_text_file(tmp / "corpus.txt")

        def argv(out: str, fsdp: bool) -> list[str]:
            return ["prune", "--model", str(tmp / "model"), "--data", str(tmp / "corpus.txt"), "--out",
                    str(tmp / out), "--device", "cpu", "--remove", "1", "--metric", "bi", "--seq-len", "64",
                    "--calib-blocks", "4", "--eval-blocks", "2", "--heal-steps", "3", "--heal-batch-size", "2",
                    "--heal-grad-accum", "1", "--trainable", "all", "--final-tasks", "perplexity", "--no-speed",
                    "--quiet", "--overwrite", *(["--fsdp"] if fsdp else [])]

        rows = {"1 process": [], "2 processes, --fsdp": []}
        bases = {"1 process": [], "2 processes, --fsdp": []}
        for _ in range(args.repeats):
            bases["1 process"].append(run(tmp / "rss", [], 1))
            bases["2 processes, --fsdp"].append(run(tmp / "rss", [], 2))
            rows["1 process"].append(run(tmp / "rss", argv("one", False), 1))
            rows["2 processes, --fsdp"].append(run(tmp / "rss", argv("two", True), 2))
    student, trained = params - per_layer, (args.layers - 1) * per_layer
    state = 4 * (params + student + 3 * trained)
    print(f"random Llama, {args.layers} layers, {params / 1e6:.0f}M parameters ({per_layer / 1e6:.1f}M per layer, "
          f"{trained / 1e6:.0f}M trained after the cut); medians of {args.repeats} runs\n")
    print("| run | model state per process, counted (GiB) | expected (GiB) | peak RSS per process (GiB) | "
          "baseline RSS (GiB) | peak above the baseline (GiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, runs in rows.items():
        ranks = range(len(runs[0]))
        peaks = [statistics.median(run[rank]["peak"] for run in runs) for rank in ranks]
        base = [statistics.median(run[rank]["peak"] for run in bases[name]) for rank in ranks]
        counted = [statistics.median(run[rank]["state"] for run in runs) for rank in ranks]

        def cells(values):
            return ", ".join(f"{value / gib:.2f}" for value in values)

        print(f"| {name} | {cells(counted)} | {state / len(peaks) / gib:.2f} | {cells(peaks)} | {cells(base)} | "
              f"{cells(p - b for p, b in zip(peaks, base))} |")


if __name__ == "__main__":
    main()
