"""Healing text the original writes itself (`--train-data teacher`).

Healing pulls the student towards the text it is trained on; Self-Data Distillation (arXiv
2410.09982) found that text the original model generated keeps far more of its quality than the
dataset. Here the prompts are the first PROMPT_TOKENS tokens (a quarter of a shorter block) of the
training stream's blocks, in order (through the chat template for a chat model, as a request to
continue the text), and the teacher samples each continuation from its own distribution
(temperature 1, no top-k or top-p: the distribution the KL term matches). Prompt and
continuation are packed, one after the other, into blocks of the run's sequence length, like
documents in the stream.

The text is generated once, before the first removal, for every healing of the run, and written
under the output folder as numbered safetensors parts, one per generation batch, each written
whole (io.write_file): an interrupted generation resumes at its next part, and every part is
sampled from its own seed, so a resumed text is the text an uninterrupted run writes.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data import Blocks, StreamPosition, TrainStream
from ..errors import LayerpruneError
from ..faults import crash_point
from ..io import write_file, write_json
from .targets import default_budgets

log = logging.getLogger(__name__)

FOLDER = "teacher_text"
# Long enough to say what the text is about, short enough that most of a block is the teacher's.
PROMPT_TOKENS = 32
# Prompts generated together: on SmolLM2 on 2 CPU cores, 173 tokens/s at 64 against 121 at 16.
BATCH = 64
INSTRUCTION = "Continue the following text.\n\n"
BYTES_PER_TOKEN = 4   # stored as int32


def disk_bytes(blocks: int, seq_len: int) -> int:
    """What the generated text of `blocks` blocks takes on disk (the packing's carry included)."""
    return (blocks + BATCH) * seq_len * BYTES_PER_TOKEN


def check_disk(blocks: int, seq_len: int, folder: Path, budget_gib: float | None) -> None:
    """Fail before any work where the text would not fit --cache-disk (default: half the free
    space of the disk that holds `folder`)."""
    budget = budget_gib * 2**30 if budget_gib is not None else default_budgets(folder)[1]
    needed = disk_bytes(blocks, seq_len)
    if needed > budget:
        raise LayerpruneError(f"--train-data teacher writes {blocks} blocks of {seq_len} tokens "
                              f"({needed / 2**10:,.0f} KiB), more than the disk budget ({budget / 2**10:,.0f} KiB)",
                              "raise --cache-disk, free disk space, lower --heal-tokens, or use --train-data stream")


def prompt_length(seq_len: int) -> int:
    return min(PROMPT_TOKENS, max(seq_len // 4, 1))


def prompt_ids(tokenizer, block: torch.Tensor) -> list[int]:
    """The prompt a training block gives: its first tokens, as a chat request where the model has a
    chat template."""
    ids = block[:prompt_length(len(block))].tolist()
    if not getattr(tokenizer, "chat_template", None):
        return ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return list(tokenizer.apply_chat_template([{"role": "user", "content": INSTRUCTION + text}],
                                              add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


@dataclass(frozen=True)
class GeneratedText:
    """The generated blocks in their parts, read like the training stream: a position's `doc` is
    the number of blocks before it."""

    folder: Path
    sizes: tuple[int, ...]   # blocks in each part

    @property
    def count(self) -> int:
        return sum(self.sizes)

    def blocks(self, start: StreamPosition = StreamPosition()):
        seen = 0
        for index, size in enumerate(self.sizes):
            if seen + size > start.doc:   # parts wholly before the start are not read
                yield from load_file(self.folder / part_name(index))["blocks"].long()[max(start.doc - seen, 0):]
            seen += size

    def span(self, start: StreamPosition, count: int) -> Blocks:
        if start.doc + count > self.count:
            raise LayerpruneError(f"the teacher's text holds {self.count} blocks; a healing asks for blocks "
                                  f"{start.doc}..{start.doc + count}",
                                  "delete the teacher_text folder to write it anew")
        return Blocks(lambda: (b for b, _ in zip(self.blocks(start), range(count))), count)

    def advance(self, start: StreamPosition, count: int) -> StreamPosition:
        return StreamPosition(start.doc + count)


@dataclass(frozen=True)
class MixedText:
    """--train-data mix: the original's text and the training stream's, block by block. Position p
    has read (p + 1) // 2 generated blocks (the even offsets) and p // 2 of the stream's (the odd
    ones); the stream's lie before the guard's validation blocks, as every healing's text does."""

    generated: GeneratedText
    stream: object   # data.TrainStream

    def span(self, start: StreamPosition, count: int) -> Blocks:
        first = start.doc
        # the generated text's own span says, now rather than mid-healing, when it holds too few blocks
        self.generated.span(StreamPosition((first + 1) // 2), (first + count + 1) // 2 - (first + 1) // 2)

        def read():
            mine = self.generated.blocks(StreamPosition((first + 1) // 2))
            theirs = (block for block, _ in self.stream.blocks(self.stream.advance(StreamPosition(), first // 2)))
            for offset in range(first, first + count):
                yield next(mine) if offset % 2 == 0 else next(theirs)
        return Blocks(read, count)

    def advance(self, start: StreamPosition, count: int) -> StreamPosition:
        return StreamPosition(start.doc + count)


def part_name(index: int) -> str:
    return f"part-{index:05d}.safetensors"


def _read_state(folder: Path, seq_len: int, seed: int) -> tuple[list[int], int, list[int]]:
    """(blocks in each part written, prompts used, tokens carried into the next part)."""
    sizes, prompts, carry = [], 0, []
    while (folder / part_name(len(sizes))).exists():
        with safe_open(folder / part_name(len(sizes)), "pt") as part:
            meta = part.metadata()
            if (int(meta["seq_len"]), int(meta["seed"])) != (seq_len, seed):
                raise LayerpruneError(f"{folder} holds the teacher's text of another run (sequence length "
                                      f"{meta['seq_len']}, seed {meta['seed']})",
                                      f"delete {folder} or use another --out")
            prompts, carry = int(meta["prompts"]), part.get_tensor("carry").tolist()
            sizes.append(part.get_slice("blocks").get_shape()[0])
    return sizes, prompts, carry


@torch.no_grad()
def sample_continuations(teacher, tokenizer, prompts: list[list[int]], max_len: int, seed: int) -> list[list[int]]:
    """Each prompt followed by the teacher's sampled continuation (to its end of sequence, or to
    `max_len` tokens in all)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])   # left-padded: generation appends
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(teacher.parameters()).device
    torch.manual_seed(seed)
    out = teacher.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max(max_len - width, 1),
                           pad_token_id=pad)
    ends = teacher.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(ends if isinstance(ends, list) else [ends])}
    texts = []
    for prompt, row in zip(prompts, out[:, width:].tolist()):
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        texts.append(prompt + row[:end])
    return texts


def generate(teacher, stream: TrainStream, count: int, folder: Path, seed: int, skip: range = range(0),
             progress: bool = True, batch_size: int = BATCH) -> GeneratedText:
    """`count` blocks of the teacher's text in `folder`, generating what is not there yet; the
    prompts come from the stream's blocks in order, but for those at the offsets in `skip` (the
    guard's validation text)."""
    seq_len, tokenizer = stream.seq_len, stream.tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    sizes, used, carry = _read_state(folder, seq_len, seed)
    written = sum(sizes)
    if written >= count:
        return GeneratedText(folder, tuple(sizes))
    started, new = time.perf_counter(), 0
    source = (block for index, block in enumerate(stream.blocks()) if index not in skip)
    for _ in range(used):   # the prompts already turned into text
        next(source)
    teacher_was_training = teacher.training
    teacher.eval()
    with tqdm(total=count, initial=written, desc="writing healing text with the original", unit="block",
              disable=not progress, leave=False) as bar:
        while written < count:
            batch = [prompt_ids(tokenizer, block) for block, _ in itertools.islice(source, batch_size)]
            if not batch:
                raise LayerpruneError(f"the training split ran out of prompts after {used} of them, with {written} "
                                      f"of {count} blocks of teacher text written",
                                      "give more text, lower --heal-tokens, or use --train-data stream")
            for text in sample_continuations(teacher, tokenizer, batch, seq_len, seed * 1_000_003 + len(sizes)):
                carry += text
            whole = len(carry) // seq_len
            blocks = torch.tensor(carry[:whole * seq_len], dtype=torch.int32).view(whole, seq_len)
            carry, used = carry[whole * seq_len:], used + len(batch)
            meta = {"prompts": str(used), "seq_len": str(seq_len), "seed": str(seed)}
            write_file(folder / part_name(len(sizes)), lambda tmp: save_file(
                {"blocks": blocks, "carry": torch.tensor(carry, dtype=torch.int32)}, str(tmp), metadata=meta))
            sizes.append(whole)
            written, new = written + whole, new + whole
            bar.update(whole)
            crash_point("teacher-text")
    teacher.train(teacher_was_training)
    seconds = time.perf_counter() - started
    log.info("wrote %d blocks of the original's text (%d tokens, from %d prompts) in %.0fs, %.0f tokens/s, to %s",
             new, new * seq_len, used, seconds, new * seq_len / max(seconds, 1e-9), folder)
    write_json(folder / "summary.json", {"blocks": written, "prompts": used, "seq_len": seq_len,
                                         "prompt_tokens": prompt_length(seq_len), "seconds_this_start": seconds})
    return GeneratedText(folder, tuple(sizes))

