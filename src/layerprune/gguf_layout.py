"""How an architecture's tensors differ between its HF model and its GGUF file, both ways: the
forward transform the export writes, and transformers' own reading, with which the export
decides what a run changed (gguf_export.py). An architecture is exportable only where both
directions are known here (`LAYOUTS`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def _permute_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotary halves to llama.cpp's interleaved pairs, within each head's rows."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _unpermute_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved pairs back to HF's rotary halves: transformers' reading."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


Heads = Callable[[str, str], int]


@dataclass(frozen=True)
class Layout:
    """How one architecture's tensors differ between the HF model and its GGUF file, both ways:
    `to_gguf` writes a tensor, `to_hf` is transformers' reading of one (an exact inverse is not
    needed: the source's tensors are compared with the run's weights in the HF domain)."""

    to_gguf: Callable[[str, np.ndarray, Heads], np.ndarray]
    to_hf: Callable[[str, np.ndarray, Heads], np.ndarray]


def _rotary(permute: Callable[[np.ndarray, int], np.ndarray]):
    def apply(name: str, rows: np.ndarray, heads: Heads) -> np.ndarray:
        if ".attn_q." in name:
            return permute(rows, heads(name, "head_count"))
        if ".attn_k." in name:
            return permute(rows, heads(name, "head_count_kv"))
        return rows
    return apply


def _norm_offset(offset: float):
    def apply(name: str, rows: np.ndarray, heads: Heads) -> np.ndarray:
        return rows + np.float32(offset) if name.endswith("norm.weight") else rows
    return apply


def _same(name: str, rows: np.ndarray, heads: Heads) -> np.ndarray:
    return rows


SAME = Layout(_same, _same)
# GGUF architecture -> its layout, as transformers reads that architecture's files.
LAYOUTS = {"llama": Layout(_rotary(_permute_rotary), _rotary(_unpermute_rotary)), "qwen2": SAME, "qwen3": SAME,
           "gemma3": Layout(_norm_offset(1.0), _norm_offset(-1.0))}
