"""Shared by every test: tiny random models of every supported architecture (built locally in
milliseconds), tiny tokenizers and corpora, and one checker of output folders."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig,
                          MistralConfig, Phi3Config, Qwen2Config, Qwen3Config)

from layerprune.config import HealConfig
from layerprune.surgery import find_layers

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# A quick healing for runs on the tiny model: two steps per removal and one final, on reused text.
QUICK = HealConfig(steps=2, batch_size=2, grad_accum=1, warmup_steps=1, final_steps=1, train_data="reuse")

CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=3),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=8),
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=8),
    "gemma2": lambda: Gemma2Config(**SMALL, head_dim=8, sliding_window=8),
    "gemma3": lambda: Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=8, sliding_window_pattern=2),
    "phi3": lambda: Phi3Config(**SMALL),
}


def _auto(model_type: str, **kw):
    return lambda: AutoConfig.for_model(model_type, **{**SMALL, **kw})


# Every decoder architecture the surgery test prunes, reloads and compares: per-layer lists, MoE
# index lists and sparse steps, dense-first counts, hybrid layer types, no-rope layers.
ALL_ARCHITECTURES = {
    **CONFIGS,
    "gemma": _auto("gemma", head_dim=8),
    "mixtral": _auto("mixtral", num_local_experts=2, num_experts_per_tok=1),
    "qwen2_moe": _auto("qwen2_moe", moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=2,
                       num_experts_per_tok=1, decoder_sparse_step=2, mlp_only_layers=[0]),
    "qwen3_moe": _auto("qwen3_moe", head_dim=8, moe_intermediate_size=16, num_experts=2, num_experts_per_tok=1,
                       decoder_sparse_step=2, mlp_only_layers=[]),
    "llama4_text": _auto("llama4_text", head_dim=8, interleave_moe_layer_step=2, num_local_experts=2,
                         intermediate_size_mlp=64, attention_chunk_size=16),
    "deepseek_v3": _auto("deepseek_v3", moe_intermediate_size=16, n_routed_experts=2, num_experts_per_tok=1,
                         n_group=1, topk_group=1, first_k_dense_replace=2, kv_lora_rank=8, q_lora_rank=8,
                         qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8),
    "gpt_oss": _auto("gpt_oss", head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=8),
    "olmo": _auto("olmo"), "olmo2": _auto("olmo2"), "granite": _auto("granite"), "cohere": _auto("cohere"),
    "stablelm": _auto("stablelm"), "starcoder2": _auto("starcoder2"), "phi": _auto("phi"),
    "gpt_neox": _auto("gpt_neox"), "exaone4": _auto("exaone4", sliding_window=8, sliding_window_pattern=2),
    "falcon_h1": _auto("falcon_h1"), "lfm2": _auto("lfm2"),
    "falcon": lambda: AutoConfig.for_model("falcon", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6,
                                           num_attention_heads=4),
    "gpt2": lambda: AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=6, n_head=4, n_positions=128,
                                         bos_token_id=1, eos_token_id=2),
    "opt": lambda: AutoConfig.for_model("opt", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=6,
                                        num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128),
}
# Architectures whose layer pattern cannot follow a cut: refused with one line.
REFUSED_ARCHITECTURES = {
    "jamba": _auto("jamba", attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                   num_experts=2, mamba_d_state=4, mamba_expand=2),
}


def tiny_from_table(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    table = {**ALL_ARCHITECTURES, **REFUSED_ARCHITECTURES}
    model = AutoModelForCausalLM.from_config(table[arch]())
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 6):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(layers)]
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    model.requires_grad_(False)
    return model


class TinyTokenizer:
    """Characters to ids, enough of the HF tokenizer interface for data and tasks."""

    eos_token_id = 2
    pad_token_id = 0
    bos_token_id = 1
    eos_token = "</s>"
    pad_token = "<pad>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % (VOCAB - 3)) for c in text]}

    def get_vocab(self):
        return {chr(i): 3 + i for i in range(VOCAB - 3)}

    def __len__(self):
        return VOCAB


def make_text_file(path, docs: int = 100, words: int = 60, seed: int = 0):
    import random

    rng = random.Random(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "night", "song", "tree", "cloud", "sea"]
    paragraphs = [" ".join(rng.choice(vocab) for _ in range(words)) + "." for _ in range(docs)]
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


def hf_char_tokenizer():
    """A real PreTrainedTokenizerFast over single characters, built offline."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + VOCAB - 3)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<pad>")


def save_tiny(path, arch="llama", layers=6, seed=0):
    model = tiny_model(arch, seed=seed, layers=layers)
    model.save_pretrained(path)
    hf_char_tokenizer().save_pretrained(path)
    return path


REPORT_KEYS = {"model", "original_layers", "final_layers", "removed_original", "kept_original", "quality_retained",
               "quality_retained_tasks", "suite_quality_retained", "suite_tasks", "quality_curve", "teacher_eval",
               "final_eval", "speed", "seconds", "config", "depth"}


def check_output_folder(out: Path, depth: int, removed: int | None = None) -> dict:
    """What every finished run must leave: a complete history, a model of `depth` layers that
    reloads with nothing missing, gives finite logits and generates the same with and without a
    KV cache, its original-layer map, config.yaml, and a report with every key. Returns history.json."""
    from layerprune.io import file_entry

    history = json.loads((out / "history.json").read_text())
    assert history["status"] == "complete" and history["final_layers"] == depth
    assert "config.yaml" in history["files"]
    # one file, or (written from a sharded model, --fsdp) one per layer with HF's index
    assert "model.safetensors" in history["files"] or "model.safetensors.index.json" in history["files"]
    for name, entry in history["files"].items():   # history.json refers to what it describes
        assert file_entry(out / name) == entry, name
    if removed is not None:
        assert len(history["removed_original"]) == removed
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    assert model.config.num_hidden_layers == depth
    assert model.config.layerprune_original_layers == history["kept_original"]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
        cached, uncached = model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)
    assert (out / "config.yaml").is_file()
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report), REPORT_KEYS - set(report)
    assert not [p.name for p in out.iterdir() if "checkpoint" in p.name or p.name in ("cache", ".staging")]
    return history


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved HF folder, from one safetensors file or from HF's sharded layout."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return weights


def teacher_with_massive_channels():
    """A tiny Llama whose third MLP writes two residual channels 500x larger than the rest, as
    the massive activations of real Qwen, Gemma and Llama models: every later norm is dominated
    by them, and a weight step that is harmless elsewhere moves the output a lot."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
        find_layers(model).layers[2].mlp.down_proj.weight[[3, 17]] *= 500
    return model


# ---------------------------------------------------------------- the CLI in a process of its own

_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["layerprune.cli", "common"])   # common: where the child's target lives


def _cli_child(args: list[str], env: dict, stdout: str, stderr: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    # torch read OMP_NUM_THREADS when the server imported it, so the command's own value is set here
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))
    for fd, path in ((1, stdout), (2, stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    from layerprune.cli import main

    sys.exit(main(args))


def run_cli(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m layerprune ARGS` in a process of its own, its exit code (-9 when it SIGKILLed
    itself) and output as subprocess.run gives them, but forked from a server that has imported
    torch, transformers and layerprune once: a tiny run's process spent most of its ~7 s importing,
    and the tests that kill and resume runs start dozens of them."""
    with tempfile.TemporaryDirectory(prefix="layerprune-cli-") as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        process = _FORKS.Process(target=_cli_child, args=(list(args), dict(env), out, err))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["layerprune", *args], timeout)
        with open(out) as stdout, open(err) as stderr:
            return subprocess.CompletedProcess(["layerprune", *args], process.exitcode, stdout.read(), stderr.read())
