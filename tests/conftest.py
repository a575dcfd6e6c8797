"""Fixtures; the models, tokenizers and checkers themselves live in common.py."""

from __future__ import annotations

import pytest

from common import CONFIGS, TinyTokenizer, make_text_file, save_tiny


@pytest.fixture
def tokenizer():
    return TinyTokenizer()


@pytest.fixture(params=list(CONFIGS))
def arch(request):
    return request.param


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny(tmp_path / "tiny-llama")


@pytest.fixture
def text_file(tmp_path):
    return make_text_file(tmp_path / "corpus.txt")
