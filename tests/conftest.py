"""Tiny random models of every supported architecture, built locally in milliseconds."""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          Phi3Config, Qwen2Config, Qwen3Config)

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=3),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=8),
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=8),
    "gemma2": lambda: Gemma2Config(**SMALL, head_dim=8, sliding_window=8),
    "gemma3": lambda: Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=8, sliding_window_pattern=2),
    "phi3": lambda: Phi3Config(**SMALL),
}


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


@pytest.fixture
def tokenizer():
    return TinyTokenizer()


@pytest.fixture(params=list(CONFIGS))
def arch(request):
    return request.param


def make_text_file(path, docs: int = 30, words: int = 150, seed: int = 0):
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


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny(tmp_path / "tiny-llama")


@pytest.fixture
def text_file(tmp_path):
    return make_text_file(tmp_path / "corpus.txt")
