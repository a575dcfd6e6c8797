"""Fixtures; the models, tokenizers and checkers themselves live in common.py.

The tiny model folder and the text file are made once per session: tests only read them (a test
that changes a model makes its own with save_tiny). The session ends with a check that nobody
wrote to them, so a test that did fails instead of changing what the others read.
"""

from __future__ import annotations

import hashlib
import os

# No test reaches the network (a CI machine has no hub): offline, the hub's libraries fail at once
# instead of retrying a connection for 20 s. Set before any of them is imported, for subprocesses too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from common import CONFIGS, QUICK, TinyTokenizer, make_text_file, save_tiny
from layerprune.config import DataConfig, PruneConfig
from layerprune.inputs import build_inputs
from layerprune.models import load_model


def _digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def tokenizer():
    return TinyTokenizer()


@pytest.fixture(params=list(CONFIGS))
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def _shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    save_tiny(root / "tiny-llama")
    make_text_file(root / "corpus.txt")
    before = _digest(root)
    yield root
    assert _digest(root) == before, "a test wrote into the session's shared tiny model or corpus"


@pytest.fixture
def tiny_dir(_shared):
    return _shared / "tiny-llama"


@pytest.fixture
def text_file(_shared):
    return _shared / "corpus.txt"


@pytest.fixture
def inputs_for(tiny_dir, text_file):
    def make(**kw):
        data = DataConfig(source=str(text_file), seq_len=32, calib_blocks=4, patch_blocks=8, eval_blocks=4,
                          batch_size=2)
        config = PruneConfig(**{"out": "unused", "model": str(tiny_dir), "data": data, "device": "cpu",
                                "metric": "bi", "remove": 2, "final_tasks": ("perplexity",),
                                "measure_speed": False, "heal": QUICK, **kw})
        teacher, tokenizer = load_model(config.model, device="cpu")
        return config, build_inputs(config, teacher, tokenizer, config.final_tasks, teacher_scores=False)
    return make
