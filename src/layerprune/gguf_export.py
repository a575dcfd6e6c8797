"""Writing a pruned model back as GGUF, for llama.cpp, Ollama and LM Studio.

The source GGUF is the template. Its metadata is copied (tokenizer, chat template, rope
settings) with the block count and every per-layer array following the cut, and its tensors
are written in their order. A tensor that the run did not change is copied bit for bit, under
its new block index. "Unchanged" is decided by value: the saved HF weight is compared with the
source tensor dequantised, so no record of what healing or a patch touched can be wrong, and a
tensor that moved by less than the run's dtype can tell keeps its original bits. A changed
tensor is quantised back to its source type where the `gguf` package can quantise that type,
else to Q8_0 (F16 where its rows are not whole Q8_0 blocks); `--gguf-type` asks for Q8_0, F16
or F32 instead: a second quantisation to a coarse type can cost more than healing gained
(README, GGUF, measures it). Vectors (norms, biases) stay in float, as llama.cpp reads them.

transformers reads GGUF through a per-architecture transform: for llama, the q and k rows are
permuted back from llama.cpp's rotary layout; for gemma3, 1 is taken from every norm weight (the
file holds the norm's scale, 1 + w). The export applies the forward transform, and decides what
changed by applying transformers' own reading to the source, so an architecture is supported only
where both directions are known here (`LAYOUTS`).

Gemma-3 interleaves sliding-window and full-attention layers, and a GGUF file has no per-layer
record of which is which: llama.cpp and transformers both give layer i full attention when
(i + 1) % 6 == 0 (a period the file may override). A cut that leaves the kept layers' types in
another order cannot be written as gemma3 without changing the model, so it is refused in one line
(`check_attention_pattern`); the HF folder, whose config keeps `layer_types`, is the result.

Memory holds one tensor at a time: the header needs every tensor's type and size first, so a
first pass decides what changed and a second pass writes, quantising changed tensors again.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import LayerpruneError
from .gguf_layout import LAYOUTS
from .io import write_file
from .models import embedded, first_line

log = logging.getLogger(__name__)

GGUF_NAME = "model.gguf"
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


CONVERT_HINT = "convert the HF folder with llama.cpp's convert_hf_to_gguf.py (README, GGUF)"


@dataclass
class ExportSummary:
    """What went into a written GGUF: the caller's log line and the model card's section."""

    path: str
    source: str
    source_blocks: int
    blocks: int
    copied: int
    requantised: dict[str, list[str]] = field(default_factory=dict)  # "Q4_1 -> Q4_1": tensor names
    source_bytes: int = 0
    written_bytes: int = 0

    def log_line(self) -> str:
        changed = sum(len(names) for names in self.requantised.values())
        kinds = ", ".join(f"{len(names)} {kind}" for kind, names in self.requantised.items()) or "none"
        return (f"wrote {self.path}: {self.blocks} of {self.source_blocks} blocks, {_mb(self.written_bytes)} "
                f"(source {_mb(self.source_bytes)}); {self.copied} tensors copied bit for bit, {changed} "
                f"re-quantised ({kinds})")

    def card(self) -> str:
        lines = [f"## GGUF\n\n`{Path(self.path).name}` is this model for llama.cpp, written from "
                 f"`{Path(self.source).name}`: {self.blocks} of its {self.source_blocks} blocks, "
                 f"{_mb(self.written_bytes)} against {_mb(self.source_bytes)}. {self.copied} tensors are copied bit "
                 "for bit from the source; the ones the run changed are written again, as source type -> written "
                 "type:", ""]
        lines += [f"- {kind}: {', '.join(names)}" for kind, names in self.requantised.items()] or ["- none"]
        return "\n".join(lines) + "\n"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------- the source


@lru_cache(maxsize=None)
def _handles(qtype, quantise: bool) -> bool:
    """Whether the gguf package can quantise (or dequantise) this type, tried on one zero block."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        if quantise:
            gguf.quants.quantize(np.zeros((1, block), np.float32), qtype)
        else:
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
    except (NotImplementedError, gguf.quants.QuantError):
        return False
    return True


def open_source(path: Path):
    """The source GGUF's reader, after checking that its architecture and tensor types can be
    exported: both fail in one line naming what cannot."""
    if not Path(path).is_file():
        raise LayerpruneError(f"source GGUF {path} does not exist", "pass the original .gguf file with --source")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise LayerpruneError(f"cannot read {path} as GGUF ({first_line(err)})",
                              "pass the original .gguf file") from err
    check_architecture(_field(reader, "general.architecture"), Path(path).name)
    odd = sorted({t.tensor_type.name for t in reader.tensors if not _handles(t.tensor_type, quantise=False)})
    if odd:
        raise LayerpruneError(f"GGUF export cannot read the tensor types {', '.join(odd)} of {Path(path).name}",
                              f"pass --no-gguf and {CONVERT_HINT}")
    return reader


# Architectures whose readers take each layer's attention type from its position alone: the
# key of the period (default 6, as llama.cpp and transformers assume when the file has none).
POSITIONAL_ATTENTION = {"gemma3": "gemma3.attention.sliding_window_pattern"}
PATTERN_HINT = "the HF folder is the result (its config.json keeps layer_types); --no-gguf skips the attempt"


def check_attention_pattern(reader, layer_types: list[str] | None) -> None:
    """Refuse, in one line, a cut that a GGUF of this architecture cannot hold: its readers would
    give the kept layers other attention types (and, on Gemma-3, other rotary bases)."""
    arch = _field(reader, "general.architecture")
    if arch not in POSITIONAL_ATTENTION or not layer_types or not _field(reader, f"{arch}.attention.sliding_window"):
        return
    period = _field(reader, POSITIONAL_ATTENTION[arch], 6)
    period = period if isinstance(period, int) and period > 0 else 6
    if list(layer_types) != positional_types(len(layer_types), period):
        full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
        raise LayerpruneError(f"model.gguf cannot hold this cut: {arch} GGUF readers (llama.cpp, transformers) give "
                              f"layer i full attention where (i + 1) % {period} == 0, but the kept layers have it at "
                              f"{full}", PATTERN_HINT)


def positional_types(layers: int, period: int = 6) -> list[str]:
    """The attention types a gemma3 GGUF reader gives `layers` layers: one full in `period`."""
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers)]


def check_architecture(arch: str, name: str) -> None:
    """One line where the export does not know how this architecture's tensors are laid out."""
    if arch not in LAYOUTS:
        raise LayerpruneError(f"GGUF export does not handle the architecture {arch!r} of {name} "
                              f"(it handles {', '.join(LAYOUTS)})", f"pass --no-gguf and {CONVERT_HINT}")


def gguf_architecture(model_type: str) -> str:
    """The GGUF architecture transformers read a model of this type from (its names differ for one)."""
    return {"gemma3_text": "gemma3"}.get(model_type, model_type)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def source_of(model: str | None) -> Path | None:
    """The GGUF file a run's model came from (history's `model`), or None for an HF model."""
    shipped = embedded(model)
    if shipped is not None:
        return shipped.gguf()
    return Path(model) if model.endswith(".gguf") else None


# ---------------------------------------------------------------- the HF side


class _HFWeights:
    """The saved HF weights, read one tensor at a time from (possibly sharded) safetensors, each
    file opened once."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", "pt") as handle:
                files = {name: "model.safetensors" for name in handle.keys()}
        else:
            raise LayerpruneError(f"{folder} holds no safetensors weights", "export a finished layerprune run")
        self.files = files
        self._handles = {file: safe_open(folder / file, "pt") for file in set(files.values())}
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.layer_types = config.get("layer_types")   # what the pruned model computes, layer by layer

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.files[name]].get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return self._handles[self.files[name]].get_slice(name).get_shape()


def _hf_names_by_gguf(arch: str, blocks: int, hf_names) -> dict[str, str]:
    arch_id = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    names = gguf.get_tensor_name_map(arch_id, blocks)
    mapping = {}
    for hf_name in hf_names:
        base, _, suffix = hf_name.rpartition(".")
        mapped = names.get_name(base) if suffix in ("weight", "bias") else None
        if mapped is not None:
            mapping[f"{mapped}.{suffix}"] = hf_name
    return mapping


# ---------------------------------------------------------------- planning and writing


@dataclass
class _Tensor:
    name: str  # in the written file
    source: gguf.ReaderTensor
    hf_name: str | None
    out_type: gguf.GGMLQuantizationType
    changed: bool


def _written_type(source_type: gguf.GGMLQuantizationType, shape: tuple[int, ...], wanted: str = "source"
                  ) -> gguf.GGMLQuantizationType:
    """The type a changed tensor is written in: `wanted` (a GGUF_TYPES name), where its rows are
    whole blocks of that type; a source type gguf cannot quantise becomes Q8_0; F16 is the last resort."""
    quant = gguf.GGMLQuantizationType
    if len(shape) < 2:  # norms and biases: llama.cpp multiplies by them as floats
        return source_type if source_type in (quant.F32, quant.F16, quant.BF16) else quant.F32
    qtype = source_type if wanted == "source" else quant[wanted.upper()]
    if _handles(qtype, quantise=True) and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    return quant.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[quant.Q8_0][0] == 0 else quant.F16


def _nbytes(qtype, shape) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


class _Export:
    """One export: the source, the HF weights and how blocks are renumbered."""

    def __init__(self, reader, weights: _HFWeights, kept: list[int], changed_type: str):
        self.reader, self.weights, self.changed_type = reader, weights, changed_type
        self.arch = _field(reader, "general.architecture")
        self.source_blocks = int(_field(reader, f"{self.arch}.block_count"))
        self.new_index = {original: new for new, original in enumerate(kept)}
        self.kept = kept
        self.hf_by_gguf = _hf_names_by_gguf(self.arch, len(kept), weights.files)

    def heads(self, name: str, key: str) -> int:
        value = _field(self.reader, f"{self.arch}.attention.{key}")
        if value is None and key == "head_count_kv":
            value = _field(self.reader, f"{self.arch}.attention.head_count")
        return int(value[int(name.split(".")[1])] if isinstance(value, list) else value)

    def new_name(self, name: str) -> str | None:
        match = _BLOCK.match(name)
        if match is None:
            return name
        new = self.new_index.get(int(match.group(1)))
        return None if new is None else f"blk.{new}.{match.group(2)}"

    def hf_name(self, name: str) -> str | None:
        hf = self.hf_by_gguf.get(name)
        if hf is None and name == "output.weight" and self.weights.tied:
            hf = self.hf_by_gguf.get("token_embd.weight")
        return hf

    def value(self, tensor: _Tensor) -> np.ndarray:
        """The HF weight in the GGUF's layout, as float32."""
        hf = self.weights.get(tensor.hf_name).float().numpy()
        return LAYOUTS[self.arch].to_gguf(tensor.source.name, hf, self.heads)

    def unchanged(self, tensor: _Tensor, shape: tuple[int, ...]) -> bool:
        """Whether the saved weight is what transformers read from the source tensor, in the
        dtype it was saved in: then the run did not change it."""
        hf = self.weights.get(tensor.hf_name)
        original = gguf.quants.dequantize(tensor.source.data, tensor.source.tensor_type).reshape(shape)
        as_read = torch.tensor(LAYOUTS[self.arch].to_hf(tensor.source.name, original, self.heads))
        return torch.equal(as_read.to(hf.dtype), hf)

    def plan(self, source, progress: bool) -> list[_Tensor]:
        plans, used = [], set()
        for tensor in tqdm(source, desc="GGUF: comparing tensors", disable=not progress, leave=False):
            name = self.new_name(tensor.name)
            if name is None:
                continue
            hf_name = self.hf_name(name)
            plan = _Tensor(name, tensor, hf_name, tensor.tensor_type, False)
            if hf_name is not None:
                used.add(hf_name)
                hf_shape = tuple(self.weights.shape(hf_name))
                shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
                if hf_shape != shape:
                    raise LayerpruneError(f"{hf_name} has shape {hf_shape} but {tensor.name} in the source "
                                          f"GGUF {shape}", "export with the GGUF file the run started from")
                if not self.unchanged(plan, shape):
                    plan.changed, plan.out_type = True, _written_type(tensor.tensor_type, shape, self.changed_type)
            plans.append(plan)
        missing = sorted(set(self.weights.files) - used)
        if missing:
            raise LayerpruneError(f"the HF weights {', '.join(missing[:3])} have no tensor in the source GGUF",
                                  "export with the GGUF file the run started from")
        return plans

    def metadata(self, writer) -> None:
        value_type = gguf.GGUFValueType
        for key, entry in self.reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":  # the writer adds the architecture
                continue
            kind = entry.types[0]
            value = entry.contents()
            if key == f"{self.arch}.block_count":
                value = len(self.kept)
            elif kind == value_type.ARRAY and key.startswith(f"{self.arch}.") and len(value) == self.source_blocks:
                value = [value[i] for i in self.kept]  # a per-layer setting follows the cut
            elif key == "general.name":
                value = f"{value} pruned to {len(self.kept)} layers by layerprune"
            elif key == "general.alignment":
                writer.data_alignment = int(value)
            writer.add_key_value(key, value, kind, entry.types[-1] if kind == value_type.ARRAY else None)
        if "general.name" not in self.reader.fields:
            writer.add_key_value("general.name", f"pruned to {len(self.kept)} layers by layerprune",
                                 value_type.STRING)

    def write(self, path: Path, plans: list[_Tensor], progress: bool, title: str) -> None:
        writer = gguf.GGUFWriter(path, self.arch, endianess=self.reader.endianess)
        self.metadata(writer)
        for plan in plans:
            shape = tuple(int(n) for n in reversed(plan.source.shape.tolist()))
            nbytes = _nbytes(plan.out_type, shape) if plan.changed else plan.source.n_bytes
            writer.add_tensor_info(plan.name, shape, np.dtype(np.float32), nbytes, raw_dtype=plan.out_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in tqdm(plans, desc=f"GGUF: writing {title}", disable=not progress, leave=False):
            if plan.changed:
                writer.write_tensor_data(gguf.quants.quantize(self.value(plan), plan.out_type))
            else:
                writer.write_tensor_data(plan.source.data, tensor_endianess=self.reader.endianess)
        writer.close()


def write_gguf(source: Path, weights_dir: Path, kept: list[int], dest: Path, changed_type: str = "source",
               progress: bool = True) -> ExportSummary:
    """`dest` from the source GGUF and the pruned HF weights in `weights_dir`, whose layer i is the
    source's block kept[i]; the tensors the run changed are written as `changed_type` says
    (config.GGUF_TYPES). Written atomically."""
    reader = open_source(source)
    export = _Export(reader, _HFWeights(Path(weights_dir)), list(kept), changed_type)
    if max(kept, default=-1) >= export.source_blocks:
        raise LayerpruneError(f"the run kept layer {max(kept)} but {Path(source).name} has {export.source_blocks} "
                              "blocks", "export with the GGUF file the run started from")
    check_attention_pattern(reader, export.weights.layer_types)
    plans = export.plan(reader.tensors, progress)
    write_file(Path(dest), lambda tmp: export.write(tmp, plans, progress, Path(dest).name))
    summary = ExportSummary(str(dest), str(source), export.source_blocks, len(kept),
                            sum(not p.changed for p in plans), {},
                            Path(source).stat().st_size, Path(dest).stat().st_size)
    for plan in plans:
        if plan.changed:
            kind = f"{plan.source.tensor_type.name} -> {plan.out_type.name}"
            summary.requantised.setdefault(kind, []).append(plan.name)
    return summary
