"""Where text comes from: every source read lazily, one document at a time.

A source is a file, a folder or glob of shards (.txt paragraphs, .jsonl,
.jsonl.gz, .parquet rows), the embedded corpora (the Wikipedia sample and
the Lee news corpus shipped with gensim), or an HF dataset streamed with
`streaming=True`. Each document comes with an identity (a title, a shard's
path within the source and its line) that data.py splits on. A damaged shard
fails where the stream reaches the damage, naming the shard and the line.
"""

from __future__ import annotations

import bz2
import functools
import glob
import gzip
import json
import os
import re
import zlib
from pathlib import Path
from typing import Iterator

from .config import DataConfig
from .errors import LayerpruneError

DEFAULT_DATA, NEWS = "embedded:wiki", "embedded:news"   # --data unset means the Wikipedia sample
SHARD_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")

Document = tuple[str, str]   # (identity, text)


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


def wiki_documents() -> Iterator[Document]:
    """(identity, text) of the sections of the English Wikipedia sample shipped with gensim."""
    return iter(_wiki_sample())


# A heading line of wiki markup: "== History ==", "=== Origins ===".
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
# Sections shorter than this (after cleaning) join the next one: a document is a group of sections
# long enough to give whole blocks, so short ones ("See also", a one-line lead) never stand alone.
SECTION_CHARS = 1000


def wiki_sections(title: str, raw: str) -> Iterator[Document]:
    """An article's sections, grouped until each holds SECTION_CHARS characters of text. A group's
    identity is the article's title and its first heading (the lead: the title alone), numbered
    when a heading repeats; titles and headings, not positions, so the split of the sample into
    held-out, calibration and training text stays put when articles are added or reordered."""
    parts = _HEADING.split(raw)   # lead, then (equals signs, heading, body) per section
    sections = [("", clean_wiki(parts[0]))]
    sections += [(heading, clean_wiki(f"{heading}\n\n{body}")) for heading, body in zip(parts[2::3], parts[3::3])]
    seen: dict[str, int] = {}
    group: list[str] = []
    first, size = "", 0
    for heading, text in sections:
        if not group:
            first = heading
        if text:
            group.append(text)
            size += len(text)
        if size >= SECTION_CHARS:
            yield _section_identity(title, first, seen), "\n\n".join(group)
            group, size = [], 0
    if size > SECTION_CHARS // 2:
        yield _section_identity(title, first, seen), "\n\n".join(group)


def _section_identity(title: str, heading: str, seen: dict[str, int]) -> str:
    seen[heading] = seen.get(heading, 0) + 1
    name = f"{title} / {heading}" if heading else title
    return name if seen[heading] == 1 else f"{name} ({seen[heading]})"


@functools.lru_cache(maxsize=1)
def _wiki_sample() -> tuple[Document, ...]:
    """Parsed once per process: the sample is small and fixed (about 3 MB of text), and cleaning
    its markup is what makes reading it slow. Its 105 articles are cut into sections, so that
    held-out text spans many documents (1,329 section groups, 123 of them held out)."""
    from gensim.corpora.wikicorpus import extract_pages

    files = sorted(glob.glob(str(_gensim_data_dir() / "enwiki-latest-pages-articles*.bz2")))
    if not files:
        raise LayerpruneError("the Wikipedia sample is missing from gensim", "reinstall gensim")
    docs = []
    with bz2.BZ2File(files[0]) as handle:
        for title, raw, _ in extract_pages(handle, filter_namespaces=("0",)):
            if not raw.lstrip().lower().startswith("#redirect"):
                docs.extend(wiki_sections(title, raw))
    return tuple(docs)


def news_documents() -> Iterator[Document]:
    """The Lee news corpus shipped with gensim: one article per line."""
    with open(_gensim_data_dir() / "lee_background.cor", encoding="utf-8", errors="replace") as handle:
        for i, line in enumerate(handle):
            if line.strip():
                yield f"lee-{i}", line.strip()


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(SHARD_SUFFIXES, key=len, reverse=True) if name.endswith(s)), path.suffix.lower())


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, gzip-decompressed by suffix; a corrupt or non-text
    file fails naming the file and line, wherever in the stream the damage is."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if number == 1 and b"\x00" in raw[:4096]:
                    raise LayerpruneError(f"{path} looks binary, not text",
                                          "give a UTF-8 .txt, .jsonl, .jsonl.gz or .parquet file")
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise LayerpruneError(f"{path} is not valid UTF-8 (line {number}, byte {err.start})",
                                          "convert it, e.g. `iconv -f latin1 -t utf-8`") from err
    except (EOFError, OSError, zlib.error) as err:
        raise LayerpruneError(f"{path} is corrupt after line {number} ({err})",
                              "replace the shard or remove it from --data") from err


def _text_documents(path: Path, name: str) -> Iterator[Document]:
    """Paragraphs (split by blank lines) of a text file."""
    paragraph: list[str] = []
    count = 0
    for _, line in _lines(path):
        if line.strip():
            paragraph.append(line)
            continue
        if paragraph:
            yield f"{name}#{count}", "".join(paragraph).strip()
            count, paragraph = count + 1, []
    if paragraph:
        yield f"{name}#{count}", "".join(paragraph).strip()


def _jsonl_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    for number, line in _lines(path):
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
        yield f"{name}#{number}", record[text_field]


def _parquet_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    row = 0
    try:
        reader = pq.ParquetFile(path)
        if text_field not in reader.schema_arrow.names:
            raise LayerpruneError(f"{path} has no column {text_field!r} (it has {reader.schema_arrow.names})",
                                  "name the text column with --text-field")
        for batch in reader.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text:
                    yield f"{name}#{row}", text
                row += 1
    except LayerpruneError:
        raise
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise LayerpruneError(f"cannot read {path} as parquet after row {row} ({err})",
                              "replace the shard or remove it from --data") from err


def file_documents(path: Path, text_field: str, name: str | None = None) -> Iterator[Document]:
    """Documents of one shard: paragraphs of text, rows of .jsonl(.gz) or .parquet. Identities are
    `name#k` (the shard's path within its source, by default its file name), never the folder the
    data happens to sit in, so moving the data moves no document to another split."""
    suffix, name = _suffix(path), name or path.name
    if suffix in (".txt", ".md", ".text"):
        return _text_documents(path, name)
    if suffix in (".jsonl", ".json", ".jsonl.gz", ".json.gz"):
        return _jsonl_documents(path, name, text_field)
    if suffix == ".parquet":
        return _parquet_documents(path, name, text_field)
    raise LayerpruneError(f"unsupported data file type {suffix!r} ({path.name})",
                          "use .txt, .jsonl, .jsonl.gz or .parquet")


def shard_paths(source: str) -> list[Path] | None:
    """The files a local source names (a file, a folder of shards, or a glob), sorted; None when
    it names nothing local (then it may be a dataset id)."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        shards = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in SHARD_SUFFIXES)
        if not shards:
            raise LayerpruneError(f"folder {source} holds no .txt, .jsonl, .jsonl.gz or .parquet shard",
                                  "give a folder of shards, a file or a glob")
        return shards
    if glob.has_magic(source):
        shards = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not shards:
            raise LayerpruneError(f"the pattern {source} matches no file", "check the glob given to --data")
        return shards
    if "/" in source and (source.startswith((".", "/", "~")) or path.suffix or path.parent.exists()):
        raise LayerpruneError(f"data file {source} does not exist", "check the path given to --data")
    if path.suffix and _suffix(path) in SHARD_SUFFIXES:
        raise LayerpruneError(f"data file {source} does not exist", "check the path given to --data")
    return None


def hub_documents(name: str, text_field: str) -> Iterator[Document]:
    """A dataset from the HF hub (where the network allows), streamed: `name` or `name:config`."""
    try:
        import datasets
    except ImportError as err:
        raise LayerpruneError("HF datasets need the `datasets` package", "run `pip install datasets`") from err
    repo, _, subset = name.partition(":")
    try:
        stream = iter(datasets.load_dataset(repo, subset or None, split="train", streaming=True))
        first = next(stream, None)
    except Exception as err:  # hub, network and script errors come in many types
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LayerpruneError(f"cannot reach dataset {name!r} ({reason})",
                              "give a local file, folder or glob of shards, or a dataset reachable from here") from err
    if first is not None and not isinstance(first.get(text_field), str):
        raise LayerpruneError(f"dataset {name!r} has no text column {text_field!r} (it has {sorted(first)})",
                              "name it with --text-field")
    index = 0
    row = first
    while row is not None:
        if row.get(text_field):
            yield f"{name}#{index}", row[text_field]
        index += 1
        row = next(stream, None)


def source_name(source: str | None) -> str:
    return source or DEFAULT_DATA


def documents(source: str | None, text_field: str = "text") -> Iterator[Document]:
    """Every document of `source`, lazily, in source order."""
    if source in (None, DEFAULT_DATA):
        return wiki_documents()
    if source == NEWS:
        return news_documents()
    shards = shard_paths(source)
    if shards is None:
        return hub_documents(source, text_field)
    root = Path(os.path.commonpath([s.parent for s in shards])) if len(shards) > 1 else shards[0].parent
    names = [str(shard.relative_to(root)) for shard in shards]
    for shard, name in zip(shards, names):
        file_documents(shard, text_field, name)  # an unsupported type fails now, before anything is read
    return (doc for shard, name in zip(shards, names) for doc in file_documents(shard, text_field, name))


def probe(config: DataConfig) -> None:
    """Read the source's first document: an unreachable dataset, a missing or unreadable file fails
    here, before any model is loaded."""
    if next(iter(documents(config.source, config.text_field)), None) is None:
        raise LayerpruneError(f"the data source {source_name(config.source)} holds no text",
                              "give a file with text in it")
