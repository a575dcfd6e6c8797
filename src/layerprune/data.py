"""Text sources, the embedded corpora, the three splits, and token blocks.

Documents are assigned to splits by a hash of their identity (an article
title, a line number), never by position, so calibration, training and
held-out text never share a document and the split survives reordering.
Blocks are fixed-length runs of the concatenated split (documents joined by
EOS), taken evenly across the split so that a few blocks still see many
documents.
"""

from __future__ import annotations

import bz2
import glob
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .errors import LayerpruneError

log = logging.getLogger(__name__)

SPLITS = ("calib", "train", "eval")
# Shares of documents per split, in hash order: held-out first, then calibration.
EVAL_SHARE, CALIB_SHARE = 0.1, 0.1
EMBEDDED = ("embedded:wiki", "embedded:news")


@dataclass
class Corpus:
    """Documents and token blocks per split; blocks are LongTensor [n, seq_len]."""

    docs: dict[str, list[str]]
    blocks: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""


def _gensim_data_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise LayerpruneError("the embedded corpus needs the gensim package", "run `pip install gensim`")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


_MARKUP = [
    (re.compile(r"'{2,}"), ""),                       # bold and italic quotes
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),  # headings keep their words
    (re.compile(r"^[\*#:;]+\s*", re.M), ""),          # list and indent markers
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n\s*\n\s*"), "\n\n"),
]


def clean_wiki(raw: str) -> str:
    """Wiki markup to plain paragraphs: gensim strips links, templates and tables; we strip the rest."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(raw)
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return "\n".join(line.strip() for line in text.split("\n")).strip()


def wiki_documents() -> list[tuple[str, str]]:
    """(title, text) of the English Wikipedia sample shipped with gensim."""
    from gensim.corpora.wikicorpus import extract_pages

    files = sorted(glob.glob(str(_gensim_data_dir() / "enwiki-latest-pages-articles*.bz2")))
    if not files:
        raise LayerpruneError("the Wikipedia sample is missing from gensim", "reinstall gensim")
    docs = []
    with bz2.BZ2File(files[0]) as handle:
        for title, raw, _ in extract_pages(handle, filter_namespaces=("0",)):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wiki(raw)
            if len(text) > 500:
                docs.append((title, text))
    return docs


def news_documents() -> list[tuple[str, str]]:
    """The Lee news corpus shipped with gensim: one article per line."""
    path = _gensim_data_dir() / "lee_background.cor"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [(f"lee-{i}", line.strip()) for i, line in enumerate(lines) if line.strip()]


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise LayerpruneError(f"{path} looks binary, not text", "give a UTF-8 .txt, .jsonl or .parquet file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LayerpruneError(f"{path} is not valid UTF-8 (byte {err.start})",
                              "convert it, e.g. `iconv -f latin1 -t utf-8`") from err


def file_documents(path: Path, text_field: str) -> list[tuple[str, str]]:
    """Documents of a local file: .txt (paragraphs split by blank lines), .jsonl or .parquet (rows)."""
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md", ".text"):
        paragraphs = re.split(r"\n\s*\n", _read_text_file(path))
        return [(f"{path.name}#{i}", p.strip()) for i, p in enumerate(paragraphs) if p.strip()]
    if suffix in (".jsonl", ".json"):
        docs = []
        for number, line in enumerate(_read_text_file(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LayerpruneError(f"{path} line {number} is not JSON ({err.msg})",
                                      "give one JSON object per line") from err
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise LayerpruneError(f"{path} line {number} has no string field {text_field!r}",
                                      "name the text field with --text-field")
            docs.append((f"{path.name}#{number}", record[text_field]))
        return docs
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a bad file
            raise LayerpruneError(f"cannot read {path} as parquet ({err})", "check the file") from err
        if text_field not in table.column_names:
            raise LayerpruneError(f"{path} has no column {text_field!r} (it has {table.column_names})",
                                  "name the text column with --text-field")
        return [(f"{path.name}#{i}", t) for i, t in enumerate(table.column(text_field).to_pylist()) if t]
    raise LayerpruneError(f"unsupported data file type {suffix!r}", "use .txt, .jsonl or .parquet")


def hub_documents(name: str, text_field: str) -> list[tuple[str, str]]:
    """A dataset from the HF hub (where the network allows): `name` or `name:config`, train split."""
    try:
        import datasets
    except ImportError as err:
        raise LayerpruneError("HF datasets need the `datasets` package", "run `pip install datasets`") from err
    repo, _, subset = name.partition(":")
    try:
        dataset = datasets.load_dataset(repo, subset or None, split="train")
    except Exception as err:  # hub, network and script errors come in many types
        raise LayerpruneError(f"cannot load dataset {name!r} ({str(err).splitlines()[0] if str(err) else err})",
                              "give a local .txt/.jsonl/.parquet file, or a dataset reachable from here") from err
    if text_field not in dataset.column_names:
        raise LayerpruneError(f"dataset {name!r} has no column {text_field!r}", "name it with --text-field")
    return [(f"{name}#{i}", t) for i, t in enumerate(dataset[text_field]) if t]


def documents(source: str | None, text_field: str = "text") -> list[tuple[str, str]]:
    if source in (None, "embedded:wiki"):
        return wiki_documents()
    if source == "embedded:news":
        return news_documents()
    path = Path(source)
    if path.exists():
        if path.is_dir():
            raise LayerpruneError(f"{source} is a folder", "give one .txt, .jsonl or .parquet file")
        return file_documents(path, text_field)
    if os.path.sep in source or path.suffix:
        raise LayerpruneError(f"data file {source} does not exist", "check the path given to --data")
    return hub_documents(source, text_field)


def split_documents(docs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Hash-ordered split by document identity: held-out, calibration, training."""
    if len(docs) < 3:
        raise LayerpruneError(f"the data has {len(docs)} document(s); three splits need at least 3",
                              "give more text (documents are paragraphs of .txt, rows of .jsonl/.parquet)")
    ordered = sorted(docs, key=lambda d: hashlib.sha1(d[0].encode("utf-8")).hexdigest())
    n_eval = max(1, round(EVAL_SHARE * len(docs)))
    n_calib = max(1, round(CALIB_SHARE * len(docs)))
    texts = [text for _, text in ordered]
    return {"eval": texts[:n_eval], "calib": texts[n_eval:n_eval + n_calib], "train": texts[n_eval + n_calib:]}


def token_blocks(texts: list[str], tokenizer, seq_len: int, count: int, split: str) -> torch.Tensor:
    """`count` blocks of `seq_len` tokens taken evenly across the concatenated documents."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    available = len(ids) // seq_len
    if available < count:
        raise LayerpruneError(
            f"the {split} split has {len(ids)} tokens: {available} block(s) of {seq_len}, {count} needed",
            f"give more text, or lower --{split}-blocks / --seq-len")
    starts = np.linspace(0, available - 1, count).round().astype(int) * seq_len
    flat = torch.tensor(ids, dtype=torch.long)
    return torch.stack([flat[s:s + seq_len] for s in starts])


def load_corpus(config: DataConfig, tokenizer) -> Corpus:
    docs = documents(config.source, config.text_field)
    if not docs or not any(text.strip() for _, text in docs):
        raise LayerpruneError(f"the data source {config.source or 'embedded:wiki'} holds no text",
                              "give a file with text in it")
    splits = split_documents(docs)
    counts = {"calib": config.calib_blocks, "train": config.train_blocks, "eval": config.eval_blocks}
    blocks = {split: token_blocks(splits[split], tokenizer, config.seq_len, counts[split], split) for split in SPLITS}
    log.info("data %s: %d documents; blocks %s of %d tokens", config.source or "embedded:wiki", len(docs),
             {k: len(v) for k, v in blocks.items()}, config.seq_len)
    return Corpus(docs=splits, blocks=blocks, source=config.source or "embedded:wiki")
