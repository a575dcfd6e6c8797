"""Real-scale speed and memory with randomly initialised weights of real configs (the weights
themselves cannot travel to the GPU machine): one scoring round of the `quality` metric on
16 x 2048 calibration tokens, and 200 healing steps of global batch 8 x 2048.

Speed and memory do not depend on the weights' values, so the figures hold for the real
models; quality does, so none is reported. Prints tokens/s, model FLOPs utilisation (against
`--peak-tflops`, the device's dense bf16 peak), peak GPU memory and peak host RSS.

    python bench/bench_gpu.py --model qwen2.5-3b                 # on a GPU, bfloat16
    python bench/bench_gpu.py --model llama-3.1-8b
    python bench/bench_gpu.py --model tiny --device cpu --dtype float32 --steps 3 --seq-len 64   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

import torch

# The published configs (config.json of Qwen/Qwen2.5-3B and meta-llama/Llama-3.1-8B).
CONFIGS = {
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500_000.0, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096),
}


def build(name: str, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(CONFIGS[name])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def layer_params(model) -> tuple[int, int]:
    """(parameters of one decoder layer, of the output head): what each token's FLOPs scale with."""
    from layerprune.surgery import find_layers

    layer = sum(p.numel() for p in find_layers(model).layers[0].parameters())
    return layer, model.get_output_embeddings().weight.numel()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def scoring_round(model, blocks: torch.Tensor, batch_size: int, device: str) -> dict:
    from layerprune.importance import ScoringContext, score_layers
    from layerprune.tasks import TaskData, blocks_to_batches, build_tasks, evaluate_tasks

    tasks = build_tasks(("perplexity", "token_accuracy"), TaskData(None, blocks, [], batch_size))
    reference = evaluate_tasks(model, tasks, model)
    ctx = ScoringContext(blocks_to_batches(blocks, batch_size), tasks, model, reference, progress=False)
    sync(device)
    start = time.perf_counter()
    score_layers(model, "quality", ctx)
    sync(device)
    seconds = time.perf_counter() - start
    depth = model.config.num_hidden_layers
    layer, head = layer_params(model)
    # one full pass, then candidate i runs layers i+1.. and the head: 2 FLOPs per parameter per token
    flops = 2 * blocks.numel() * (depth * layer + head + sum((depth - 1 - i) * layer + head for i in range(depth)))
    return {"seconds": seconds, "tokens_per_s": blocks.numel() / seconds, "flops": flops}


def healing(model, steps: int, batch: int, seq_len: int, device: str) -> dict:
    from layerprune.config import HealConfig
    from layerprune.healing.loop import heal
    from layerprune.healing.job import plan
    from layerprune.surgery import remove_layers

    depth = model.config.num_hidden_layers
    cut = depth // 2
    student = copy.deepcopy(model)
    remove_layers(student, [cut])
    config = HealConfig(steps=steps, batch_size=batch, grad_accum=1, teacher_cache=False, log_every=steps,
                        checkpoint_every=0)
    job = plan(student, config, steps, iteration=1, seed=0, dropped=[cut])
    blocks = torch.randint(0, model.config.vocab_size, (steps * batch, seq_len),
                           generator=torch.Generator().manual_seed(0))
    sync(device)
    start = time.perf_counter()
    heal(student, model, blocks, job, None, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    layer, head = layer_params(model)
    tokens = steps * batch * seq_len
    lowest = min(job.layers)
    # teacher forward (2N), student forward (2N), backward through the layers from the lowest trained
    # one up and the head (4 per parameter: activation and weight gradients)
    forward = 2 * (depth * layer + head) + 2 * ((depth - 1) * layer + head)
    backward = 4 * ((depth - 1 - lowest) * layer + head)
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "flops": tokens * (forward + backward),
            "trained_layers": job.layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(CONFIGS), default="qwen2.5-3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--calib-blocks", type=int, default=16)
    parser.add_argument("--score-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--heal-batch", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = build(args.model, dtype, args.device)
    calib = torch.randint(0, model.config.vocab_size, (args.calib_blocks, args.seq_len),
                          generator=torch.Generator().manual_seed(1))
    rows = {}
    for name, run in (("scoring round", lambda: scoring_round(model, calib, args.score_batch, args.device)),
                      ("healing", lambda: healing(model, args.steps, args.heal_batch, args.seq_len, args.device))):
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        result = run()
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        result["mfu"] = result["flops"] / result["seconds"] / (args.peak_tflops * 1e12)
        rows[name] = result
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e9:.2f}B parameters, {args.dtype}, {args.device}; "
          f"scoring {args.calib_blocks} x {args.seq_len} tokens, healing {args.steps} steps of "
          f"{args.heal_batch} x {args.seq_len}")
    print(f"{'phase':15s} {'seconds':>9s} {'tokens/s':>10s} {'MFU':>7s} {'peak GPU GiB':>13s}")
    for name, r in rows.items():
        gpu = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "-"
        print(f"{name:15s} {r['seconds']:>9.1f} {r['tokens_per_s']:>10.0f} {r['mfu']:>7.1%} {gpu:>13s}")
    print(f"peak host RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
