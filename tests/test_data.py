import json

import pytest

from layerprune.config import DataConfig
from layerprune.data import documents, load_corpus, split_documents, token_blocks
from layerprune.errors import LayerpruneError

from common import TinyTokenizer, make_text_file


def test_split_is_by_document_identity_not_order():
    docs = [(f"doc-{i}", f"text {i}") for i in range(50)]
    a, b = split_documents(docs), split_documents(list(reversed(docs)))
    assert a == b
    assert not set(a["eval"]) & set(a["calib"]) and not set(a["calib"]) & set(a["train"])
    assert len(a["eval"]) == 5 and len(a["calib"]) == 5 and len(a["train"]) == 40


def test_blocks_are_taken_evenly_across_the_split():
    blocks = token_blocks(["abcdefgh" * 10, "ijklmnop" * 10], TinyTokenizer(), 8, 4, "train")
    assert blocks.shape == (4, 8)
    with pytest.raises(LayerpruneError, match="block\\(s\\) of 8, 100 needed"):
        token_blocks(["short"], TinyTokenizer(), 8, 100, "train")


def test_file_formats(tmp_path):
    txt = make_text_file(tmp_path / "a.txt", docs=3)
    assert len(documents(str(txt))) == 3
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(4)))
    assert [t for _, t in documents(str(jsonl), "body")] == [f"row {i}" for i in range(4)]


def test_load_corpus_gives_every_split(tmp_path):
    text = make_text_file(tmp_path / "c.txt")
    corpus = load_corpus(DataConfig(source=str(text), seq_len=16, calib_blocks=2, train_blocks=3, eval_blocks=2),
                         TinyTokenizer())
    assert {k: tuple(v.shape) for k, v in corpus.blocks.items()} == {"calib": (2, 16), "train": (3, 16),
                                                                      "eval": (2, 16)}
