"""Items per second of the benchmark suite through our lm-eval adapter (InMemoryLM) beside lm-eval's
own HFLM, on the same items, the same model in memory and the same batch size, task by task.

    python bench/bench_suite.py --items 40 --repeats 3          # SmolLM2, every task of `bench`

Each task runs through lm-eval's `simple_evaluate` once per adapter per repeat, alternating, and
the median seconds are printed side by side with the ratio; the suite's line adds up the medians.
It also prints whether the two adapters gave every item the same answer (acc and acc_norm), and
the largest difference between their per-request log-likelihoods. Run it alone: it hogs both cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model folder or GGUF (default: the embedded SmolLM2)")
    parser.add_argument("--suite", default="bench", choices=["bench", "mmlu"])
    parser.add_argument("--items", type=int, default=40, help="items a task")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from layerprune.models import load_model
    from layerprune.tasks import suite
    from layerprune.tasks.harness import InMemoryLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, "float32", "cpu")
    root = suite.data_root()
    tasks = suite.SUITES[args.suite]
    adapters = {"ours": lambda: InMemoryLM(model, tokenizer, args.batch_size, progress=False),
                "hflm": lambda: HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu")}
    print(f"{'task':<14} {'items':>5} {'ours s':>8} {'hflm s':>8} {'ours it/s':>9} {'hflm it/s':>9} {'ratio':>6} "
          f"{'same answers':>12} {'max |dlogp|':>11}")
    totals = {"ours": 0.0, "hflm": 0.0, "items": 0}
    with tempfile.TemporaryDirectory() as folder:
        names = suite.write_yamls(Path(folder), tasks, root)
        chosen = suite.choose_items(tasks, root, names, args.items, 0.2)
        with contextlib.redirect_stderr(io.StringIO()):
            manager = TaskManager(include_path=folder, include_defaults=True)
        for task in tasks:
            wanted = [n for n in names[task.name] if n in chosen]
            samples = {n: chosen[n] for n in wanted}
            seconds: dict[str, list[float]] = {"ours": [], "hflm": []}
            answers, logps = {}, {}
            for _ in range(args.repeats):
                for name, make in adapters.items():
                    lm = make()
                    started = time.perf_counter()
                    with contextlib.redirect_stderr(io.StringIO()):
                        result = simple_evaluate(model=lm, tasks=wanted, task_manager=manager, samples=samples,
                                                 log_samples=True, bootstrap_iters=0, verbosity="ERROR")
                    seconds[name].append(time.perf_counter() - started)
                    rows = [s for n in wanted for s in sorted(result["samples"][n], key=lambda s: s["doc_id"])]
                    answers[name] = [(s["acc"], s.get("acc_norm")) for s in rows]
                    logps[name] = [float(_first(r)) for s in rows for r in s["resps"]]
            count = sum(len(v) for v in samples.values())
            ours, hflm = statistics.median(seconds["ours"]), statistics.median(seconds["hflm"])
            totals["ours"] += ours
            totals["hflm"] += hflm
            totals["items"] += count
            gap = max(abs(a - b) for a, b in zip(logps["ours"], logps["hflm"]))
            print(f"{task.name:<14} {count:>5} {ours:>8.1f} {hflm:>8.1f} {count / ours:>9.2f} {count / hflm:>9.2f} "
                  f"{hflm / ours:>6.2f} {str(answers['ours'] == answers['hflm']):>12} {gap:>11.2e}", flush=True)
    print(f"{'suite':<14} {totals['items']:>5} {totals['ours']:>8.1f} {totals['hflm']:>8.1f} "
          f"{totals['items'] / totals['ours']:>9.2f} {totals['items'] / totals['hflm']:>9.2f} "
          f"{totals['hflm'] / totals['ours']:>6.2f}   (medians of {args.repeats}; batch size {args.batch_size})")


def _first(response):
    """A request's log-likelihood from a logged response: [(logp, greedy)] or (logp, greedy)."""
    while isinstance(response, (list, tuple)):
        response = response[0]
    return response


if __name__ == "__main__":
    main()
