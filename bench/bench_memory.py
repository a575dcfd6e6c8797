"""Peak RSS and peak disk of a whole `layerprune prune` run against the data size and the healing budget.

A tiny Llama (built from a config here, with a character tokenizer) is pruned by 2 layers with
healing, on generated .jsonl files. Each run is its own process: its peak RSS is the kernel's
ru_maxrss of that process, and the output folder's size is sampled every 0.2 s for its peak.
Printed side by side from the same invocation, medians of `--repeats` runs:

    python bench/bench_memory.py                 # 400 MB and 4 MB files, 16K and 1M healing tokens
    python bench/bench_memory.py --repeats 1 --big-mb 40
    python bench/bench_memory.py --only document # one 50 MB document beside 50 MB of 2 KB documents
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def make_model(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from common import VOCAB, hf_char_tokenizer

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    hf_char_tokenizer().save_pretrained(folder)
    return folder


def make_jsonl(path: Path, megabytes: float, seed: int = 0) -> Path:
    """Rows of random words, about 2 KB each, until the file holds `megabytes`."""
    rng = random.Random(seed)
    words = ["river", "stone", "light", "night", "song", "tree", "cloud", "sea", "alpha", "beta", "gamma", "delta"]
    target = int(megabytes * 2**20)
    with open(path, "w", encoding="utf-8") as handle:
        written = 0
        while written < target:
            rows = "".join(json.dumps({"text": " ".join(rng.choices(words, k=350))}) + "\n" for _ in range(500))
            handle.write(rows)
            written += len(rows)
    return path


def make_one_document(path: Path, megabytes: float, seed: int = 0) -> Path:
    """One row holding `megabytes` of random words, the first document of the training split (so
    healing reads it), among 200 rows of 2 KB that give the calibration and held-out text."""
    from layerprune.data import split_of

    rng = random.Random(seed)
    words = ["river", "stone", "light", "night", "song", "tree", "cloud", "sea", "alpha", "beta", "gamma", "delta"]
    rows = [json.dumps({"text": " ".join(rng.choices(words, k=350))}) + "\n" for _ in range(200)]
    first_train = next(n for n in range(1, 100) if split_of(f"{path.name}#{n}") == "train")  # lines count from 1
    count = int(megabytes * 2**20 / 5.5)   # about 5.5 characters per word with its space
    huge = json.dumps({"text": " ".join(rng.choices(words, k=count))}) + "\n"
    path.write_text("".join(rows[:first_train - 1]) + huge + "".join(rows[first_train - 1:]), encoding="utf-8")
    return path


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # a file replaced while walking
                pass
    return total


def run_once(model: Path, data: Path, heal_tokens: int, out: Path) -> dict:
    argv = [sys.executable, "-m", "layerprune", "prune", "--model", str(model), "--data", str(data), "--out", str(out),
            "--device", "cpu", "--remove", "2", "--metric", "bi", "--seq-len", "256", "--heal-tokens",
            str(heal_tokens), "--heal-batch-size", "8", "--heal-grad-accum", "1", "--final-tasks", "perplexity",
            "--no-speed", "--quiet", "--overwrite"]
    peak_disk, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            if out.exists():
                peak_disk[0] = max(peak_disk[0], folder_bytes(out))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    if status != 0:
        raise SystemExit(f"run failed ({status}): {process.stderr.read()[-2000:]}")
    return {"rss_mb": usage.ru_maxrss / 1024, "disk_mb": peak_disk[0] / 2**20, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mb", type=float, default=400)
    parser.add_argument("--small-mb", type=float, default=4)
    parser.add_argument("--small-tokens", type=int, default=16_384)
    parser.add_argument("--large-tokens", type=int, default=1_048_576)
    parser.add_argument("--one-doc-mb", type=float, default=50, help="the single-document file's size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("size", "document"), default=None,
                        help="size: the data-size and budget cases alone; document: the one-document case alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "tiny")
        runs = {}
        if args.only != "document":
            big, small = make_jsonl(tmp / "big.jsonl", args.big_mb), make_jsonl(tmp / "small.jsonl", args.small_mb)
            runs.update({"big file, small budget": (big, args.small_tokens),
                         "big file, large budget": (big, args.large_tokens),
                         "small file, large budget": (small, args.large_tokens)})
        if args.only != "size":
            one = make_one_document(tmp / "one.jsonl", args.one_doc_mb)
            many = make_jsonl(tmp / "many.jsonl", args.one_doc_mb)
            runs.update({"one document, small budget": (one, args.small_tokens),
                         "many documents, small budget": (many, args.small_tokens)})
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for _ in range(args.repeats):   # interleaved, so drift on the machine hits every case alike
            for name, (data, tokens) in runs.items():
                results[name].append(run_once(model, data, tokens, tmp / "out"))
                print(f"  run: {name}: {results[name][-1]}", flush=True)
    median = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in results.items()}
    print(f"files: {args.big_mb:g} MB and {args.small_mb:g} MB of jsonl (2 KB rows), and {args.one_doc_mb:g} MB as one "
          f"row and as 2 KB rows; 2 removals with healing; median of {args.repeats} runs")
    print(f"{'run':30s} {'heal tokens/removal':>20s} {'peak RSS MB':>12s} {'peak disk MB':>13s} {'seconds':>8s}")
    for name, (_, tokens) in runs.items():
        m = median[name]
        print(f"{name:30s} {tokens:>20,d} {m['rss_mb']:>12.0f} {m['disk_mb']:>13.1f} {m['seconds']:>8.1f}")
    if args.only != "document":
        budget = median["big file, large budget"]["rss_mb"] - median["big file, small budget"]["rss_mb"]
        size = median["big file, large budget"]["rss_mb"] - median["small file, large budget"]["rss_mb"]
        print(f"peak RSS, large minus small budget (same {args.big_mb:g} MB file): {budget:+.0f} MB (target < 200)")
        print(f"peak RSS, big minus small file (same budget): {size:+.0f} MB (target < 200)")
        print(f"peak disk, large budget: {median['big file, large budget']['disk_mb']:.1f} MB (target < 1024)")
    if args.only != "size":
        one, many = median["one document, small budget"], median["many documents, small budget"]
        print(f"peak RSS, one document minus many of the same {args.one_doc_mb:g} MB: "
              f"{one['rss_mb'] - many['rss_mb']:+.0f} MB (target < 200); seconds {one['seconds']:.0f} vs "
              f"{many['seconds']:.0f}")


if __name__ == "__main__":
    main()
