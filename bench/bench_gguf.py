"""What writing a pruned run as GGUF costs: file size, export time, and quality retained of the
GGUF (as transformers reads it) beside the run's HF folder and beside the same layers cut with no
healing, on the same held-out tokens.

For each `--gguf-type` the run is exported into a temporary folder; the original model is the
teacher. Quality retained is the mean of the perplexity, token-accuracy and KL scores against
the original, on the held-out split of each text (the news corpus is a domain the run never
saw). Export seconds are the median of `--repeats` exports.

    python bench/bench_gguf.py runs/smollm2-28
    python bench/bench_gguf.py runs/smollm2-28 --types source,q8_0 --data embedded:wiki
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from layerprune.config import DataConfig
from layerprune.data import load_corpus
from layerprune.gguf_export import source_of, write_gguf
from layerprune.models import load_model
from layerprune.surgery import remove_layers
from layerprune.tasks import TaskData, build_tasks, evaluate_tasks, quality_retained

TASKS = ("perplexity", "token_accuracy", "kl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run of a GGUF model")
    parser.add_argument("--types", default="source,q8_0,f16", help="comma-separated --gguf-type values")
    parser.add_argument("--data", default="embedded:wiki,embedded:news", help="comma-separated texts")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    history = json.loads((args.run / "history.json").read_text(encoding="utf-8"))
    source = source_of(history["model"])
    teacher, tokenizer = load_model(history["config"]["model"], device="cpu")  # what the run distilled from
    # The same layers cut from the original with nothing healed: every tensor of it is a bit-for-bit
    # copy in GGUF, so this is also the GGUF a cut without healing gives.
    cut = copy.deepcopy(teacher)
    remove_layers(cut, history["removed_original"])
    models = {"HF folder": load_model(str(args.run), device="cpu")[0], "cut only, no healing": cut}
    rows = {"cut only, no healing": {"MB": None, "s": None, "changed": ""}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types.split(","):
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                summary = write_gguf(source, args.run, history["kept_original"], Path(tmp) / f"{kind}.gguf", kind,
                                     progress=False)
                seconds.append(time.perf_counter() - start)
            changed = ", ".join(f"{len(names)} {pair}" for pair, names in summary.requantised.items())
            rows[f"GGUF, changed as {kind}"] = {"MB": summary.written_bytes / 1e6, "s": statistics.median(seconds),
                                                "changed": changed}
            models[f"GGUF, changed as {kind}"] = AutoModelForCausalLM.from_pretrained(
                tmp, gguf_file=f"{kind}.gguf", dtype=torch.float32).eval()
    rows["HF folder"] = {"MB": sum(p.stat().st_size for p in args.run.glob("*.safetensors")) / 1e6, "s": None,
                         "changed": ""}
    print(f"source {source.name}: {source.stat().st_size / 1e6:.1f} MB; run {args.run} kept "
          f"{len(history['kept_original'])} of {history['original_layers']} layers")
    texts = args.data.split(",")
    for text in texts:
        corpus = load_corpus(DataConfig(source=text), tokenizer)
        tasks = build_tasks(TASKS, TaskData(tokenizer, corpus.blocks["eval"], corpus.docs["eval"], 4, 0))
        reference = evaluate_tasks(teacher, tasks, teacher)
        for name, model in models.items():
            scores = evaluate_tasks(model, tasks, teacher)
            rows[name][text] = (quality_retained(scores, reference), scores["perplexity"]["perplexity"],
                                scores["kl"]["kl"])
        rows.setdefault("original", {"MB": None, "s": None, "changed": ""})[text] = (
            1.0, reference["perplexity"]["perplexity"], 0.0)
    head = " | ".join(f"{t}: retained / ppl / KL" for t in texts)
    print(f"| model | MB | export s | {head} | changed tensors written as |")
    print("|" + " --- |" * (4 + len(texts)))
    for name in ["original", "cut only, no healing", "HF folder"] + [n for n in rows if n.startswith("GGUF")]:
        row = rows[name]
        size = "" if row["MB"] is None else f"{row['MB']:.1f}"
        secs = "" if row["s"] is None else f"{row['s']:.1f}"
        cells = " | ".join("{:.3f} / {:.2f} / {:.3f}".format(*row[t]) for t in texts)
        print(f"| {name} | {size} | {secs} | {cells} | {row['changed']} |")


if __name__ == "__main__":
    main()
