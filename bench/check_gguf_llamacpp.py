"""The exported GGUF in llama.cpp itself: load it and its source through llama-cpp-python, print
each file's size and block count, greedy-generate from one prompt with both, and measure both
perplexities on the same text windows with llama.cpp's own logits.

Not part of the tests: llama-cpp-python compiles llama.cpp on install. In its own venv:

    pip install llama-cpp-python numpy
    python bench/check_gguf_llamacpp.py runs/smollm2-28 --source PATH/TO/SOURCE.gguf --text FILE

(If generation crashes with a segmentation fault, rebuild without the host-specific kernels:
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_OPENMP=OFF" pip install --no-cache-dir
--force-reinstall llama-cpp-python.)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def load(path: Path, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0)


def generate(llm, prompt: str, tokens: int) -> str:
    """Through the chat template where the file has one (an instruction-tuned model), else the
    prompt continued as it is (a base model such as Gemma-3-270M)."""
    if "tokenizer.chat_template" not in llm.metadata:
        return llm.create_completion(prompt, max_tokens=tokens, temperature=0.0)["choices"][0]["text"]
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=tokens,
                                       temperature=0.0)
    return reply["choices"][0]["message"]["content"]


def perplexity(llm, ids: list[int], window: int, windows: int) -> float:
    """Mean next-token NLL over `windows` disjoint windows of `window` tokens, exponentiated."""
    total, count = 0.0, 0
    for w in range(windows):
        chunk = ids[w * window:(w + 1) * window]
        llm.reset()
        llm.eval(chunk)
        scores = np.array(llm.scores[:len(chunk)], dtype=np.float64)
        logz = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
        nll = logz[:-1] - scores[np.arange(len(chunk) - 1), chunk[1:]]
        total, count = total + nll.sum(), count + len(nll)
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished layerprune run folder holding model.gguf")
    parser.add_argument("--source", type=Path, required=True, help="the GGUF the run started from")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--tokens", type=int, default=48, help="tokens to generate")
    parser.add_argument("--text", type=Path, help="a text file for perplexity (the first windows of it)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()

    history = json.loads((args.run / "history.json").read_text(encoding="utf-8"))
    files = {"source": args.source, "pruned": args.run / "model.gguf"}
    text = args.text.read_text(encoding="utf-8", errors="replace") if args.text else None
    rows = {}
    for name, path in files.items():
        llm = load(path, max(args.window, 512))
        blocks = int(llm.metadata[f"{llm.metadata['general.architecture']}.block_count"])
        row = {"file": str(path), "bytes": path.stat().st_size, "blocks": blocks,
               "general.name": llm.metadata.get("general.name"), "reply": generate(llm, args.prompt, args.tokens)}
        if text is not None:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False)
            row["perplexity"] = perplexity(llm, ids, args.window, args.windows)
        rows[name] = row
        del llm
    source, pruned = rows["source"], rows["pruned"]
    removed = source["blocks"] - pruned["blocks"]
    print(f"removed original layers {history['removed_original']} ({removed} of {source['blocks']} blocks)")
    for name, row in rows.items():
        ppl = f", perplexity {row['perplexity']:.2f}" if "perplexity" in row else ""
        print(f"{name}: {row['file']}: {row['bytes'] / 1e6:.1f} MB, {row['blocks']} blocks, "
              f"general.name {row['general.name']!r}{ppl}")
    print(f"size ratio {pruned['bytes'] / source['bytes']:.4f} "
          f"(blocks ratio {pruned['blocks'] / source['blocks']:.4f})")
    for name, row in rows.items():
        print(f"\n{name} (llama.cpp, greedy) <- {args.prompt!r}\n{row['reply']}")


if __name__ == "__main__":
    main()
