"""Teacher targets, computed once per run: the teacher never changes.

For every training block: the teacher's top-k logits with their indices and
the full-vocabulary log-sum-exp (enough for KL on the top-k, exact when k
covers the vocabulary), the final normed hidden state, and each layer's
output (for the MSE on whichever layer a later cut maps to). They live in
.npy files that are memory-mapped, so RAM holds only what a step reads.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .activations import capture
from .surgery import num_layers

log = logging.getLogger(__name__)

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.float32}


@dataclass
class TeacherTargets:
    """Memory-mapped arrays over blocks: values/indices [N, T, k], lse [N, T], final [N, T, D],
    layers [L, N, T, D] (the output of teacher layer o at layers[o])."""

    values: np.ndarray
    indices: np.ndarray
    lse: np.ndarray
    final: np.ndarray
    layers: np.ndarray

    def take(self, rows: torch.Tensor, layer_ids: list[int], device) -> dict:
        """The targets of blocks `rows`, as tensors on `device`."""
        idx = rows.cpu().numpy()

        def get(array):
            return torch.from_numpy(np.ascontiguousarray(array[idx])).to(device)

        return {"values": get(self.values), "indices": get(self.indices).long(), "lse": get(self.lse),
                "final": get(self.final), "layers": [get(self.layers[o]) for o in layer_ids]}


def _open(path: Path, shape, dtype) -> np.ndarray:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


@torch.no_grad()
def compute_targets(teacher, blocks: torch.Tensor, folder: Path, topk: int, batch_size: int = 4,
                    progress: bool = True) -> TeacherTargets:
    """Run the teacher once over `blocks` [N, T] and store its targets under `folder`."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    device = next(teacher.parameters()).device
    n, length = blocks.shape
    vocab = teacher.get_output_embeddings().weight.shape[0]
    k = min(topk, vocab)
    hidden = teacher.config.get_text_config().hidden_size
    depth = num_layers(teacher)
    dtype = _NUMPY.get(next(teacher.parameters()).dtype, np.float32)
    arrays = TeacherTargets(
        values=_open(folder / "values.npy", (n, length, k), np.float32),
        indices=_open(folder / "indices.npy", (n, length, k), np.int32),
        lse=_open(folder / "lse.npy", (n, length), np.float32),
        final=_open(folder / "final.npy", (n, length, hidden), dtype),
        layers=_open(folder / "layers.npy", (depth, n, length, hidden), dtype),
    )
    for start in tqdm(range(0, n, batch_size), desc="teacher targets", unit="batch", disable=not progress,
                      leave=False):
        ids = blocks[start:start + batch_size].to(device)
        with capture(teacher, final=True) as record:
            logits = teacher(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
        values, indices = logits.topk(k, dim=-1)
        end = start + len(ids)
        arrays.values[start:end] = values.cpu().numpy()
        arrays.indices[start:end] = indices.int().cpu().numpy()
        arrays.lse[start:end] = logits.logsumexp(-1).cpu().numpy()
        arrays.final[start:end] = record["final"].float().cpu().numpy()
        for o in range(depth):
            arrays.layers[o, start:end] = record["states"][o + 1].float().cpu().numpy()
    for array in (arrays.values, arrays.indices, arrays.lse, arrays.final, arrays.layers):
        array.flush()
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    log.debug("teacher targets for %d blocks: %.0f MiB in %s", n, size, folder)
    return arrays
