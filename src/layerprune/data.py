"""The three splits of any source, and token blocks read from them as streams.

Sources (sources.py) yield documents one at a time. Each document goes to held-out,
calibration or training text by a hash of its identity alone (a title, a
shard and line), so no split needs the whole corpus in memory or sorted, and
the split survives reordering and sharding.

What is read stays bounded by the budgets, never by the corpus:
- calibration and held-out blocks (`held_blocks`) are read round-robin: each
  document gives its first `seq_len` tokens, then, only if the budget is not
  met, its next ones in a second pass, so a few blocks still span many
  documents;
- training text (`TrainStream`) is a stream of blocks from a position (a
  document index and a token offset), so healing reads as much as its budget
  and a checkpoint stores where the stream stands.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from .config import DataConfig
from .errors import LayerpruneError
from .sources import documents, source_name

log = logging.getLogger(__name__)

# Shares of documents per split, by hash: held-out first, then calibration, the rest training.
EVAL_SHARE, CALIB_SHARE = 0.1, 0.1
# Documents kept as text for the held-out tasks that sample passages (continuation, copy).
TASK_DOCS = 32


# A source nothing in a run trains or scores on (compare's unseen domain) is held out whole.
EVERY_SPLIT = "all"


def split_of(identity: str) -> str:
    """The split a document belongs to, from its identity alone."""
    fraction = int(hashlib.sha1(identity.encode("utf-8")).hexdigest()[:8], 16) / 16**8
    return "eval" if fraction < EVAL_SHARE else "calib" if fraction < EVAL_SHARE + CALIB_SHARE else "train"


# Characters tokenised at once: a longer document is tokenised piece by piece (split at a space),
# so one huge document costs no more memory than many small ones.
CHUNK_CHARS = 1 << 18


def _pieces(text: str) -> Iterator[str]:
    start = 0
    while len(text) - start > CHUNK_CHARS:
        cut = text.rfind(" ", start + CHUNK_CHARS // 2, start + CHUNK_CHARS)
        cut = cut if cut > start and not text[cut - 1].isspace() else start + CHUNK_CHARS
        yield text[start:cut]
        start = cut
    yield text[start:]


def token_pieces(tokenizer, text: str) -> Iterator[list[int]]:
    """A document's token ids in bounded pieces, EOS last so blocks never join two documents
    silently. A document of up to CHUNK_CHARS characters is one piece, tokenised whole."""
    for piece in _pieces(text):
        yield tokenizer(piece, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        yield [tokenizer.eos_token_id]


def token_window(tokenizer, text: str, start: int, end: int) -> list[int]:
    """Tokens [start, end) of a document, tokenising no more of it than that needs."""
    window, seen = [], 0
    for ids in token_pieces(tokenizer, text):
        if seen + len(ids) > start:
            window.extend(ids[max(start - seen, 0):end - seen])
        seen += len(ids)
        if seen >= end:
            break
    return window


def _budget_error(split: str, tokens: int, seq_len: int, needed: int) -> LayerpruneError:
    flag = {"calib": "--calib-tokens", "eval": "--eval-tokens", EVERY_SPLIT: "--eval-tokens",
            "train": "--heal-tokens"}[split]
    return LayerpruneError(
        f"the {split} split has {tokens} tokens: {tokens // seq_len} block(s) of {seq_len}, {needed} needed",
        f"give more text, or lower {flag} / --seq-len")


# ---------------------------------------------------------------- held-out and calibration blocks


def held_blocks(source: str | None, split: str, tokenizer, config: DataConfig, count: int
                ) -> tuple[torch.Tensor, list[str]]:
    """`count` blocks of the split (EVERY_SPLIT: of every document), read round-robin (pass p takes
    tokens [p*L, (p+1)*L) of every document), and the texts of up to TASK_DOCS of its documents
    for passage tasks."""
    length = config.seq_len
    needed = count * length
    ids: list[int] = []
    texts: list[str] = []
    for p in range(needed // length + 1):   # a pass adds >= 1 token per document, or the split is spent
        added, read = 0, 0
        for identity, text in documents(source, config.text_field):
            read += 1
            if split != EVERY_SPLIT and split_of(identity) != split:
                continue
            if p == 0 and len(texts) < TASK_DOCS:
                texts.append(text[:CHUNK_CHARS])   # passage tasks read a document's start
            if len(ids) >= needed:
                if len(texts) >= TASK_DOCS or p > 0:
                    break
                continue
            piece = token_window(tokenizer, text, p * length, (p + 1) * length)
            ids.extend(piece)
            added += len(piece)
        if len(ids) >= needed or not added:
            break
    if not read:
        raise LayerpruneError(f"the data source {source_name(source)} holds no text",
                              "give a file with text in it")
    if len(ids) < needed:
        raise _budget_error(split, len(ids), length, count)
    return torch.tensor(ids[:needed], dtype=torch.long).view(count, length), texts


# ---------------------------------------------------------------- the training stream


@dataclass(frozen=True)
class Blocks:
    """`count` training blocks, read afresh by each `read()`: a healing's text is streamed every
    time it is needed, never held whole."""

    read: Callable[[], Iterator[torch.Tensor]]
    count: int

    @classmethod
    def of(cls, blocks: "Blocks | torch.Tensor") -> "Blocks":
        """Blocks as they are, or blocks already in memory [n, seq_len]."""
        return blocks if isinstance(blocks, Blocks) else cls(lambda: iter(blocks), len(blocks))


@dataclass(frozen=True)
class StreamPosition:
    """Where the training stream stands: `doc` documents of the source are behind it (of every
    split) and `token` tokens of the next one are consumed. JSON: [doc, token]."""

    doc: int = 0
    token: int = 0

    def to_json(self) -> list[int]:
        return [self.doc, self.token]

    @classmethod
    def from_json(cls, data) -> "StreamPosition":
        return cls(*data) if data is not None else cls()


@dataclass
class TrainStream:
    """Training text as blocks of `seq_len` tokens, read from a position on: nothing but the
    current document and one block is held in memory. Not frozen: `check_holds` remembers, in
    `known`, where the stream stands at the block offsets a run will start and end its healings,
    so finding a healing's end costs no second read of its text. The text itself never changes."""

    source: str | None
    text_field: str
    tokenizer: object
    seq_len: int
    known: dict[int, StreamPosition] = field(default_factory=dict, compare=False, repr=False)  # offset -> position

    def blocks(self, start: StreamPosition = StreamPosition()) -> Iterator[tuple[torch.Tensor, StreamPosition]]:
        """(block, position after it), in order, until the split runs out."""
        buffer: list[int] = []
        for index, (identity, text) in enumerate(documents(self.source, self.text_field)):
            if index < start.doc or split_of(identity) != "train":
                continue
            skip, read = (start.token if index == start.doc else 0), 0
            for ids in token_pieces(self.tokenizer, text):
                read += len(ids)
                buffer.extend(ids[skip:])
                skip = max(skip - len(ids), 0)
                used = 0
                while len(buffer) - used >= self.seq_len:
                    used += self.seq_len
                    # Whatever is left after a block lies in this document (a block is emitted as
                    # soon as one fits), so the position is this document and its consumed tokens.
                    yield (torch.tensor(buffer[used - self.seq_len:used], dtype=torch.long),
                           StreamPosition(index, read - (len(buffer) - used)))
                del buffer[:used]

    def span(self, start: StreamPosition, count: int) -> Blocks:
        """The `count` blocks from `start`, readable as often as needed."""
        return Blocks(lambda: (block for block, _ in itertools.islice(self.blocks(start), count)), count)

    def advance(self, start: StreamPosition, count: int) -> StreamPosition:
        """The position `count` blocks after `start`: remembered by `check_holds`, else read."""
        offsets = {position: offset for offset, position in self.known.items()}
        if start in offsets and offsets[start] + count in self.known:
            return self.known[offsets[start] + count]
        return self.take(count, start, keep=False)[1]

    def take(self, count: int, start: StreamPosition = StreamPosition(), keep: bool = True
             ) -> tuple[torch.Tensor | None, StreamPosition]:
        """The next `count` blocks [count, seq_len] from `start` (None unless `keep`), and the
        position after them."""
        if count == 0:   # nothing to read: the loop below would read to the end
            return (torch.empty(0, self.seq_len, dtype=torch.long) if keep else None), start
        taken, seen, position = [], 0, start
        for block, position in self.blocks(start):
            seen += 1
            if keep:
                taken.append(block)
            if seen == count:
                break
        if seen < count:
            raise _budget_error("train", seen * self.seq_len, self.seq_len, count)
        return (torch.stack(taken) if keep else None), position

    def check_holds(self, offsets: list[int], progress: bool = True, held_back: int = 0) -> None:
        """Fail now, before any heavy work, if the training split holds fewer blocks than the
        largest of `offsets` (blocks from the start; the last `held_back` of them validation);
        read once, counting, keeping only the positions at `offsets`."""
        wanted, needed = set(offsets), max(offsets, default=0)
        self.known[0] = StreamPosition()
        if needed <= 0:
            return
        seen = 0
        with tqdm(total=needed, desc="checking the training text", unit="block", disable=not progress,
                  leave=False) as bar:
            for _, position in self.blocks():
                seen += 1
                bar.update(1)
                if seen in wanted:
                    self.known[seen] = position
                if seen == needed:
                    return
        if held_back:
            raise LayerpruneError(
                f"the training split holds {seen} block(s) of {self.seq_len} tokens; this run heals on "
                f"{needed - held_back} and holds back {held_back} past them to guard healing",
                "give more text, lower --heal-tokens, --val-tokens or the layers removed, pass --train-data reuse, "
                "or --no-heal-guard")
        raise LayerpruneError(
            f"the training split holds {seen} block(s) of {self.seq_len} tokens; this run heals on {needed}",
            "give more text, lower --heal-tokens or the layers removed, or pass --train-data reuse")


# ---------------------------------------------------------------- what a run reads


@dataclass
class Corpus:
    """Calibration and held-out blocks [n, seq_len] with some of their documents' texts, a fixed
    pool of training blocks for fitting patches, and the training stream healing reads."""

    blocks: dict[str, torch.Tensor]
    docs: dict[str, list[str]]
    train: TrainStream
    source: str = ""
    patch_blocks: torch.Tensor | None = field(default=None, repr=False)


def load_corpus(config: DataConfig, tokenizer, patch_pool: bool = False) -> Corpus:
    """The calibration and held-out blocks of the budgets, and the training stream. The patch
    pool (the first --patch-tokens of training text) is read only where `patch_pool`."""
    source = source_name(config.source)
    blocks, docs = {}, {}
    for split in ("calib", "eval"):
        blocks[split], docs[split] = held_blocks(config.source, split, tokenizer, config, config.blocks(split))
    stream = TrainStream(config.source, config.text_field, tokenizer, config.seq_len)
    pool = stream.take(config.blocks("patch"))[0] if patch_pool else None
    log.info("data %s: blocks %s of %d tokens", source, {k: len(v) for k, v in blocks.items()}, config.seq_len)
    return Corpus(blocks, docs, stream, source, pool)
