"""Teacher targets, computed once per run: the teacher never changes.

For every training block: the teacher's top-k logits with their indices and
the full-vocabulary log-sum-exp (enough for KL on the top-k, exact when k
covers the vocabulary), the final normed hidden state, and the outputs of
the teacher layers the MSE term maps to. Those layers are known only once a
cut is made, so each is added when a healing first needs it (a teacher pass
up to that layer): a run stores a handful of layers, not all of them. They
live in .npy files that are memory-mapped, so RAM holds only what a step reads.
A manifest, written last, lists what is complete, so a resumed run reopens the
cache instead of running the teacher again.

Lifecycle: `TeacherTargets.open(...)` computes the cache (or reopens a
complete one), `extend(teacher, layers)` adds mapped layers as cuts need
them, `close()` deletes the files once the run no longer needs them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .activations import capture, prefix_state
from .io import write_json

log = logging.getLogger(__name__)

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.float32}


MANIFEST = "manifest.json"


def _open(path: Path, shape, dtype) -> np.ndarray:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def _identity(teacher, blocks: torch.Tensor, k: int) -> dict:
    """What the cached arrays depend on: the training tokens, the top-k and the teacher (its shapes,
    and a sum of its weights, which changes if the model files were replaced)."""
    with torch.no_grad():
        weights = sum(float(p.double().sum()) for p in teacher.parameters())
    return {"tokens_sha256": hashlib.sha256(blocks.cpu().numpy().tobytes()).hexdigest(), "shape": list(blocks.shape),
            "weights_sum": weights, "k": k, "hidden": teacher.config.get_text_config().hidden_size,
            "dtype": np.dtype(_hidden_dtype(teacher)).name}


def _write_manifest(folder: Path, identity: dict, layers) -> None:
    write_json(folder / MANIFEST, {**identity, "layers": sorted(layers)})


def _hidden_dtype(teacher):
    return _NUMPY.get(next(teacher.parameters()).dtype, np.float32)


def _batches(blocks: torch.Tensor, batch_size: int, device, desc: str, progress: bool):
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        ids = blocks[start:start + batch_size].to(device)
        yield start, start + len(ids), ids


@dataclass
class TeacherTargets:
    """Memory-mapped arrays over blocks: values/indices [N, T, k], lse [N, T], final [N, T, D],
    layers[o] [N, T, D] (the output of teacher layer o, for the layers added so far)."""

    folder: Path
    blocks: torch.Tensor
    batch_size: int
    identity: dict
    values: np.ndarray
    indices: np.ndarray
    lse: np.ndarray
    final: np.ndarray
    layers: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path, teacher, blocks: torch.Tensor, topk: int, batch_size: int = 4,
             progress: bool = True, layers=()) -> "TeacherTargets":
        """The targets of `blocks` [N, T] under `folder`: reopened if complete there, else computed
        by one teacher pass; with the outputs of teacher `layers`."""
        return compute_targets(teacher, blocks, folder, topk, batch_size, progress, layers)

    def close(self) -> None:
        """Delete the cache (and its parent folder once empty): it is large, and only this run's."""
        self.values = self.indices = self.lse = self.final = None
        self.layers = {}
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:  # not empty: another process's cache is still there
            pass

    @torch.no_grad()
    def extend(self, teacher, layer_ids, progress: bool = True) -> None:
        """Add the outputs of teacher layers not stored yet, one partial teacher pass each."""
        device = next(teacher.parameters()).device
        for o in sorted(set(layer_ids) - set(self.layers)):
            array = _open(self.folder / f"layer_{o}.npy", self.final.shape, _hidden_dtype(teacher))
            for start, end, ids in _batches(self.blocks, self.batch_size, device, f"teacher layer {o}", progress):
                array[start:end] = prefix_state(teacher, o + 1, ids, torch.ones_like(ids)).float().cpu().numpy()
            array.flush()
            self.layers[o] = array
            _write_manifest(self.folder, self.identity, self.layers)

    def take(self, rows: torch.Tensor, layer_ids: list[int], device) -> dict:
        """The targets of blocks `rows`, as tensors on `device`."""
        idx = rows.cpu().numpy()

        def get(array):
            return torch.from_numpy(np.ascontiguousarray(array[idx])).to(device)

        return {"values": get(self.values), "indices": get(self.indices).long(), "lse": get(self.lse),
                "final": get(self.final), "layers": [get(self.layers[o]) for o in layer_ids]}

    def nbytes(self) -> int:
        arrays = [self.values, self.indices, self.lse, self.final, *self.layers.values()]
        return sum(array.nbytes for array in arrays)


@torch.no_grad()
def compute_targets(teacher, blocks: torch.Tensor, folder: Path, topk: int, batch_size: int = 4,
                    progress: bool = True, layers=()) -> TeacherTargets:
    """Run the teacher once over `blocks` [N, T] and store its targets under `folder`, with the
    outputs of teacher `layers` (more can be added later by `extend`). A complete cache of
    the same tokens already in `folder` (a resumed run's) is reopened instead."""
    folder = Path(folder)
    k = min(topk, teacher.get_output_embeddings().weight.shape[0])
    identity = _identity(teacher, blocks, k)
    cached = reopen(folder, identity, blocks, batch_size)
    if cached is not None:
        cached.extend(teacher, layers, progress)
        return cached
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    device = next(teacher.parameters()).device
    n, length = blocks.shape
    hidden = identity["hidden"]
    dtype = _hidden_dtype(teacher)
    layers = sorted(set(layers))
    targets = TeacherTargets(
        folder, blocks, batch_size, identity,
        values=_open(folder / "values.npy", (n, length, k), np.float32),
        indices=_open(folder / "indices.npy", (n, length, k), np.int32),
        lse=_open(folder / "lse.npy", (n, length), np.float32),
        final=_open(folder / "final.npy", (n, length, hidden), dtype),
        layers={o: _open(folder / f"layer_{o}.npy", (n, length, hidden), dtype) for o in layers},
    )
    for start, end, ids in _batches(blocks, batch_size, device, "teacher targets", progress):
        with capture(teacher, final=True) as record:
            logits = teacher(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
        values, indices = logits.topk(k, dim=-1)
        targets.values[start:end] = values.cpu().numpy()
        targets.indices[start:end] = indices.int().cpu().numpy()
        targets.lse[start:end] = logits.logsumexp(-1).cpu().numpy()
        targets.final[start:end] = record["final"].float().cpu().numpy()
        for o in layers:
            targets.layers[o][start:end] = record["states"][o + 1].float().cpu().numpy()
    for array in (targets.values, targets.indices, targets.lse, targets.final, *targets.layers.values()):
        array.flush()
    _write_manifest(folder, identity, layers)
    log.debug("teacher targets for %d blocks: %.0f MiB in %s", n, targets.nbytes() / 2**20, folder)
    return targets


def reopen(folder: Path, identity: dict, blocks: torch.Tensor, batch_size: int) -> TeacherTargets | None:
    """The cache in `folder` if its manifest says it is complete for these tokens, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if {key: manifest.get(key) for key in identity} != identity:
        return None

    def load(name: str) -> np.ndarray:
        return np.load(folder / name, mmap_mode="r+")

    log.info("reusing the teacher targets in %s", folder)
    return TeacherTargets(folder, blocks, batch_size, identity, values=load("values.npy"),
                          indices=load("indices.npy"), lse=load("lse.npy"), final=load("final.npy"),
                          layers={o: load(f"layer_{o}.npy") for o in manifest["layers"]})
