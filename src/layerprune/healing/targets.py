"""Teacher targets and the cache policy: what healing keeps, where, within which budgets.

Healing revisits text only in two cases: every removal reads the same
tokens (`--train-data reuse`), or a removal passes over its tokens more than
once (`--heal-epochs`). Only then is a cache worth its cost; `plan_caches`
decides, within `--cache-disk` (teacher targets, on disk) and
`--cache-memory` (frozen-prefix states, in RAM), and says why. Otherwise the
teacher and the frozen layers run online, and nothing grows with the budget.

Teacher targets, computed once per run: the teacher never changes.

For every training block: the teacher's top-k logits with their indices and
the full-vocabulary log-sum-exp (enough for KL on the top-k, exact when k
covers the vocabulary), the final normed hidden state, and the outputs of
the teacher layers the MSE term maps to. Those layers are known only once a
cut is made, so each is added when a healing first needs it (a teacher pass
up to that layer): a run stores a handful of layers, not all of them. They
live in .npy files that are memory-mapped, so RAM holds only what a step reads;
states are stored in the model's dtype (bfloat16 as its 16-bit pattern).
A manifest, written last, lists what is complete, so a resumed run reopens the
cache instead of running the teacher again.

Lifecycle: `TeacherTargets.open(...)` computes the cache (or reopens a
complete one), `extend(teacher, layers)` adds mapped layers as cuts need
them, `close()` deletes the files once the run no longer needs them.
`TargetCache` is the one place a run opens and closes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..activations import capture, prefix_state
from ..config import HealConfig
from ..data import Blocks
from ..errors import LayerpruneError
from ..io import write_json

log = logging.getLogger(__name__)

# numpy has no bfloat16: its states are stored as their 16-bit patterns and viewed back on reading.
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}
GIB = 2**30


def _to_numpy(tensor: torch.Tensor, dtype) -> np.ndarray:
    if dtype == np.int16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy()
    return tensor.to(torch.float16 if dtype == np.float16 else torch.float32).cpu().numpy()


def _to_torch(array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if array.dtype == np.int16 else tensor


MANIFEST = "manifest.json"


def _open(path: Path, shape, dtype) -> np.ndarray:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def _identity(teacher, blocks: Blocks, k: int) -> dict:
    """What the cached arrays depend on: the training tokens, the top-k and the teacher (its shapes,
    and a sum of its weights, which changes if the model files were replaced)."""
    with torch.no_grad():
        weights = sum(float(p.double().sum()) for p in teacher.parameters())
    digest, length = hashlib.sha256(), 0
    for block in blocks.read():
        digest.update(block.numpy().tobytes())
        length = len(block)
    return {"tokens_sha256": digest.hexdigest(), "shape": [blocks.count, length],
            "weights_sum": weights, "k": k, "hidden": teacher.config.get_text_config().hidden_size,
            "dtype": np.dtype(_hidden_dtype(teacher)).name}


def _write_manifest(folder: Path, identity: dict, layers) -> None:
    write_json(folder / MANIFEST, {**identity, "layers": sorted(layers)})


def _hidden_dtype(teacher):
    return _NUMPY.get(next(teacher.parameters()).dtype, np.float32)


def _batches(blocks: Blocks, batch_size: int, device, desc: str, progress: bool):
    batch, start = [], 0
    with tqdm(total=blocks.count, desc=desc, unit="block", disable=not progress, leave=False) as bar:
        for block in blocks.read():
            batch.append(block)
            if len(batch) == batch_size:
                yield start, start + len(batch), torch.stack(batch).to(device)
                start, batch = start + len(batch), []
                bar.update(batch_size)
        if batch:
            yield start, start + len(batch), torch.stack(batch).to(device)
            bar.update(len(batch))


@dataclass
class TeacherTargets:
    """Memory-mapped arrays over blocks: values/indices [N, T, k], lse [N, T], final [N, T, D],
    layers[o] [N, T, D] (the output of teacher layer o, for the layers added so far)."""

    folder: Path
    blocks: Blocks
    batch_size: int
    identity: dict
    values: np.ndarray
    indices: np.ndarray
    lse: np.ndarray
    final: np.ndarray
    layers: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path, teacher, blocks: Blocks | torch.Tensor, topk: int, batch_size: int = 4,
             progress: bool = True, layers=()) -> "TeacherTargets":
        """The targets of `blocks` (N blocks of T tokens) under `folder`: reopened if complete
        there, else computed by one teacher pass; with the outputs of teacher `layers`."""
        return compute_targets(teacher, Blocks.of(blocks), folder, topk, batch_size, progress, layers)

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
                array[start:end] = _to_numpy(prefix_state(teacher, o + 1, ids, torch.ones_like(ids)), array.dtype)
            array.flush()
            self.layers[o] = array
            _write_manifest(self.folder, self.identity, self.layers)

    def take(self, rows: torch.Tensor, layer_ids: list[int], device) -> dict:
        """The targets of blocks `rows`, as tensors on `device`."""
        get = self._reader(rows, device)
        return {"values": get(self.values), "indices": get(self.indices).long(), "lse": get(self.lse),
                "final": get(self.final), "layers": self.take_layers(rows, layer_ids, device)}

    def take_layers(self, rows: torch.Tensor, layer_ids: list[int], device) -> list[torch.Tensor]:
        """Only the stored outputs of teacher layers `layer_ids` for blocks `rows` (a local healing
        step reads nothing else)."""
        get = self._reader(rows, device)
        return [get(self.layers[o]) for o in layer_ids]

    @staticmethod
    def _reader(rows: torch.Tensor, device):
        idx = rows.cpu().numpy()
        return lambda array: _to_torch(array[idx]).to(device)

    def nbytes(self) -> int:
        arrays = [self.values, self.indices, self.lse, self.final, *self.layers.values()]
        return sum(array.nbytes for array in arrays)


@torch.no_grad()
def compute_targets(teacher, blocks: Blocks | torch.Tensor, folder: Path, topk: int, batch_size: int = 4,
                    progress: bool = True, layers=()) -> TeacherTargets:
    """Run the teacher once over `blocks` [N, T] and store its targets under `folder`, with the
    outputs of teacher `layers` (more can be added later by `extend`). A complete cache of
    the same tokens already in `folder` (a resumed run's) is reopened instead."""
    folder, blocks = Path(folder), Blocks.of(blocks)
    k = min(topk, teacher.get_output_embeddings().weight.shape[0])
    identity = _identity(teacher, blocks, k)
    cached = reopen(folder, identity, blocks, batch_size)
    if cached is not None:
        cached.extend(teacher, layers, progress)
        return cached
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    device = next(teacher.parameters()).device
    n, length = identity["shape"]
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
        targets.final[start:end] = _to_numpy(record["final"], dtype)
        for o in layers:
            targets.layers[o][start:end] = _to_numpy(record["states"][o + 1], dtype)
    for array in (targets.values, targets.indices, targets.lse, targets.final, *targets.layers.values()):
        array.flush()
    _write_manifest(folder, identity, layers)
    log.debug("teacher targets for %d blocks: %.0f MiB in %s", n, targets.nbytes() / 2**20, folder)
    return targets


def reopen(folder: Path, identity: dict, blocks: Blocks, batch_size: int) -> TeacherTargets | None:
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


# ---------------------------------------------------------------- the cache policy


def target_bytes_per_block(teacher, seq_len: int, topk: int, mapped_layers: int = 1) -> int:
    """Disk one block's teacher targets take: top-k values and indices, the log-sum-exp, the final
    state and each mapped layer's output, states in the model's dtype."""
    hidden = teacher.config.get_text_config().hidden_size
    k = min(topk, teacher.get_output_embeddings().weight.shape[0])
    state = np.dtype(_hidden_dtype(teacher)).itemsize * hidden
    return seq_len * (8 * k + 4 + state * (1 + mapped_layers))


def prefix_bytes_per_block(teacher, seq_len: int) -> int:
    return seq_len * teacher.config.get_text_config().hidden_size * next(teacher.parameters()).element_size()


def default_budgets(folder: Path) -> tuple[float, float]:
    """(memory, disk) in bytes, sized to this machine: a quarter of the RAM available now, and half
    of the free space on the disk that holds `folder`."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            info = dict(line.split(":", 1) for line in handle)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    existing = next((p for p in [Path(folder), *Path(folder).absolute().parents] if p.exists()), Path("/"))
    return available / 4, shutil.disk_usage(existing).free / 2


def check_budgets(config: HealConfig, teacher, seq_len: int) -> None:
    """A cache budget given that cannot hold even one block is a mistake, caught before any work."""
    for name, size, what in (("cache_disk", target_bytes_per_block(teacher, seq_len, config.teacher_topk),
                              "teacher targets"),
                             ("cache_memory", prefix_bytes_per_block(teacher, seq_len), "frozen-prefix states")):
        budget = getattr(config, name)
        if budget is not None and budget * GIB < size:
            flag = "--" + name.replace("_", "-")
            raise LayerpruneError(f"{flag} {budget} GiB cannot hold the {what} of one block ({size / 2**20:.1f} MiB)",
                                  f"raise {flag}, or pass --no-teacher-cache to run everything online")


@dataclass(frozen=True)
class CachePlan:
    """Which caches one healing uses, and the reasons, for the log and history."""

    targets: bool
    prefix: bool
    targets_why: str
    prefix_why: str

    @property
    def why(self) -> str:
        return f"{self.targets_why}; {self.prefix_why}"


def plan_caches(config: HealConfig, teacher, seq_len: int, blocks: int, folder: Path, reused: bool) -> CachePlan:
    """Cache only what this healing (or a later one) reads again, and only within the budgets.
    `reused`: every removal heals on these same blocks."""
    memory, disk = default_budgets(folder)
    memory = config.cache_memory * GIB if config.cache_memory is not None else memory
    disk = config.cache_disk * GIB if config.cache_disk is not None else disk
    if not config.teacher_cache:
        return CachePlan(False, False, "teacher online (--no-teacher-cache)",
                         "frozen prefix online (--no-teacher-cache)")
    revisit = config.epochs > 1 or reused
    target_size = blocks * target_bytes_per_block(teacher, seq_len, config.teacher_topk)
    prefix_size = blocks * prefix_bytes_per_block(teacher, seq_len)
    if not revisit:
        targets, why_t = False, "teacher online: each block is read once"
    elif target_size > disk:
        targets, why_t = False, f"teacher online: its targets ({target_size / GIB:.2f} GiB) exceed --cache-disk " \
                                f"({disk / GIB:.2f} GiB)"
    else:
        targets, why_t = True, f"teacher targets cached on disk ({target_size / GIB:.2f} GiB of {disk / GIB:.2f})"
    if config.epochs == 1 or config.trainable in ("lora", "last"):
        prefix, why_p = False, "frozen prefix online: " + (
            "each block is read once per healing" if config.epochs == 1 else
            "LoRA trains every layer" if config.trainable == "lora" else "the LM head trains (tied: the embedding)")
    elif prefix_size > memory:
        prefix, why_p = False, f"frozen prefix online: its states ({prefix_size / GIB:.2f} GiB) exceed " \
                               f"--cache-memory ({memory / GIB:.2f} GiB)"
    else:
        prefix, why_p = True, f"frozen-prefix states cached in RAM ({prefix_size / GIB:.2f} GiB of {memory / GIB:.2f})"
    return CachePlan(targets, prefix, why_t, why_p)


class TargetCache:
    """Where a run's (or a comparison's) teacher targets are opened and closed. With reused text
    (--train-data reuse) one cache serves every healing: opened at the first, kept for a resumed
    run to reopen, deleted by `close()` once the run is done. Text read again only within one
    healing (--heal-epochs) gets a cache of its own, deleted after that healing. `folder`: where
    the caches go (None: a temporary folder each)."""

    def __init__(self, config: HealConfig, teacher, seq_len: int, batch_size: int, folder: Path | None = None,
                 progress: bool = True):
        self.config, self.teacher, self.seq_len, self.batch_size = config, teacher, seq_len, batch_size
        self.folder, self.progress = folder, progress
        self.shared: TeacherTargets | None = None

    @contextmanager
    def healing(self, text: Blocks, iteration: int) -> Iterator[tuple[CachePlan, TeacherTargets | None]]:
        """What healing `iteration` on `text` caches (plan_caches), and the targets it reads, if any."""
        reuse = self.config.train_data == "reuse"
        plan = plan_caches(self.config, self.teacher, self.seq_len, text.count,
                           self.folder or Path(tempfile.gettempdir()), reused=reuse)
        if not plan.targets:
            yield plan, None
        elif not reuse:
            own = self._open(self._place() / f"iteration-{iteration}", text)
            try:
                yield plan, own
            finally:
                own.close()
        else:
            if self.shared is None:
                self.shared = self._open(self._place(), text)
            if self.shared.blocks.count == text.count:
                yield plan, self.shared
            else:   # e.g. a final healing of another length
                yield dataclasses.replace(plan, targets=False,
                                          targets_why="teacher online: the run's target cache holds other blocks"), None

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
            self.shared = None

    def _place(self) -> Path:
        return self.folder or Path(tempfile.mkdtemp(prefix="layerprune-"))

    def _open(self, folder: Path, text: Blocks) -> TeacherTargets:
        return TeacherTargets.open(folder, self.teacher, text, self.config.teacher_topk, self.batch_size,
                                   self.progress)
