"""lm-eval's model interface over the model in memory, scoring a shared context once.

lm-eval defines the benchmark tasks (prompts, choices, metrics); a model only answers its
log-likelihood requests, each a (context, continuation) pair. lm-eval's own `HFLM` runs every
pair whole, so a 4-way HellaSwag item runs its context four times, and it computes logits at
every position. `InMemoryLM` groups the requests whose inputs share everything but the
continuation's tokens (a multiple-choice item's choices) and runs that shared prefix once,
where it saves enough to pay for a second pass; other requests run whole. The first pass is
left-padded, so every row ends at the last position and the LM head runs on the last positions
alone (on SmolLM2 the head is a fifth of a token's arithmetic); the choices' remaining tokens
run after their own row of its KV cache, sorted by length. Tokenisation is lm-eval's own
(`TemplateLM._encode_pair`) and `tok_encode` follows `HFLM.tok_encode`, so the per-request
log-likelihoods equal HFLM's (tests/test_suite.py checks within 1e-4).

On a CPU a model this small is bound by its matrix products, so the gain is the tokens saved:
most on HellaSwag and ARC (long shared contexts, short choices), little on PIQA (short goals,
long solutions) and WinoGrande (its two contexts differ). Generation is not served here: the
suite is multiple choice, and `lm_eval:NAME@DIR` tasks keep lm-eval's HFLM.
"""

from __future__ import annotations

import copy
import inspect
import logging

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from transformers import DynamicCache
from tqdm.auto import tqdm

from ..errors import LayerpruneError

DEFAULT_MAX_LENGTH = 2048
# An item's choices share one run of their context where that saves at least this many tokens
# (PIQA's short goals before two long solutions, and WinoGrande's contexts, which differ, run whole).
SHARE_MIN = 32
# A batch of first-pass rows holds at most this many positions (padding included) ...
PREFIX_TOKENS = 8192
# ... and a run makes at most this many bytes of float32 logits.
TAIL_LOGIT_BYTES = 1 << 28


def _score(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """(sum of log-probabilities, all greedy) of `targets`, one per row of `logits`."""
    logp = F.log_softmax(logits.float(), -1)
    wanted = torch.tensor(targets, device=logp.device)
    return float(logp.gather(-1, wanted[:, None]).sum()), bool((logp.argmax(-1) == wanted).all())


def _tail_parts(tails: list, rows: int, positions: int) -> list[list]:
    """Continuations sorted by length, cut into runs of at most `rows` rows and `positions`
    padded positions (their logits' bound), so a run pads little."""
    parts: list[list] = []
    for tail in tails:
        width = len(tail[2]) - 1
        if parts and len(parts[-1]) < rows and (len(parts[-1]) + 1) * width <= positions:
            parts[-1].append(tail)
        else:
            parts.append([tail])
    return parts


def max_length_of(model) -> int:
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, 1 << 20)
    return DEFAULT_MAX_LENGTH


class InMemoryLM(TemplateLM):
    """`lm_eval.api.model.LM` for a loaded causal LM and its tokenizer (log-likelihoods only)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, progress: bool = True, bar_file=None):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model, tokenizer, max(1, batch_size)
        self.progress, self.bar_file = progress, bar_file
        self.max_length = max_length_of(model)
        head = model.get_output_embeddings()
        self.vocab_size = head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size
        self.requests_scored = 0
        # transformers renamed the forward's `past_key_values` to `cache` within 5.x.
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """HFLM's rule: the tokenizer's own special tokens unless told, none where the string
        already starts with the prefix token's text."""
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        try:
            return self.tokenizer.encode(string, **options)
        except Exception as err:   # a tokenizer's own failure, whatever its type: said in one line
            raise LayerpruneError(f"the model's tokenizer cannot encode the benchmark text {string[:60]!r} ({err})",
                                  "use a model whose tokenizer covers the tasks' text (any HF text tokenizer)") from err

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        # Shown where progress is logged (not under --quiet), like every evaluation's bar.
        shown = self.progress and logging.getLogger(__name__).isEnabledFor(logging.INFO)
        bar = tqdm(total=len(requests), desc="benchmark requests", leave=False, file=self.bar_file,
                   disable=not shown)
        # Longest first, as HFLM orders them (a memory peak shows at the start), and rows of like
        # length share a batch.
        rows = sorted(self._rows(requests), key=lambda row: len(row[0]), reverse=True)
        start = 0
        while start < len(rows):
            keep = max(inside for _, members in rows[start:start + self.batch_size] for _, _, inside in members)
            count = max(1, min(self.batch_size, PREFIX_TOKENS // len(rows[start][0]),
                               TAIL_LOGIT_BYTES // (4 * self.vocab_size * keep)))
            chunk = rows[start:start + count]
            for index, value in self._score_rows(chunk):
                results[index] = value
            bar.update(sum(len(members) for _, members in chunk))
            start += count
        bar.close()
        self.requests_scored += len(requests)
        return results

    def _rows(self, requests) -> list[tuple[list[int], list[tuple[int, list[int], int]]]]:
        """The first pass's rows: (tokens, [(request, continuation, how many of its tokens the row
        predicts)]). Requests with the same prefix (every input up to the one that predicts the
        continuation's first token: an item's choices) share a row of it where that saves at
        least SHARE_MIN tokens; any other request is a row of its own, whole, as in HFLM."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for index, ((_, text), context, continuation) in enumerate(requests):
            if not continuation:
                raise LayerpruneError(f"the model's tokenizer encodes the benchmark answer {text!r} as no tokens",
                                      "use a model whose tokenizer covers the tasks' text (any HF text tokenizer)")
            whole = (context + continuation)[-(self.max_length + 1):]
            n = len(continuation)
            if n >= len(whole):
                raise LayerpruneError(f"a benchmark answer of {n} tokens ({text[:40]!r}...) does not fit this model's "
                                      f"{self.max_length}-token window with a token of context",
                                      "use a model with a longer context window for the benchmark suites")
            groups.setdefault(tuple(whole[:len(whole) - n]), []).append((index, whole[len(whole) - n:]))
        rows = []
        for prefix, members in groups.items():
            if (len(members) - 1) * len(prefix) >= SHARE_MIN:
                rows.append((list(prefix), [(index, c, 1) for index, c in members]))
            else:
                rows += [((list(prefix) + c)[:-1], [(index, c, len(c))]) for index, c in members]
        return rows

    @torch.no_grad()
    def _score_rows(self, rows):
        """(request index, (log-likelihood, greedy)) of every continuation of `rows`. Rows run
        left-padded in one batch (positions from the mask, as generation does), so every row ends
        at the last position and the head runs on the last `keep` positions alone; continuations
        longer than their row predicts run after the rows' cache, each reading its own row's."""
        device = next(self.model.parameters()).device
        width = max(len(tokens) for tokens, _ in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (tokens, _) in enumerate(rows):
            ids[r, width - len(tokens):] = torch.tensor(tokens)
            mask[r, width - len(tokens):] = 1
        keep = max(inside for _, members in rows for _, _, inside in members)
        tails = [(r, index, c) for r, (_, members) in enumerate(rows) for index, c, inside in members
                 if len(c) > inside]
        cache = DynamicCache(config=self.model.config) if tails else None
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=(mask.cumsum(-1) - 1).clamp_min(0).to(device), use_cache=bool(tails),
                         logits_to_keep=keep, **({self.cache_arg: cache} if tails else {}))
        scores = {}
        for r, (_, members) in enumerate(rows):
            for index, c, inside in members:
                scores[index] = _score(out.logits[r, keep - inside:], c[:inside])
        del out
        parts = _tail_parts(sorted(tails, key=lambda t: len(t[2])), 2 * self.batch_size,
                            TAIL_LOGIT_BYTES // (4 * self.vocab_size))
        for part in parts:
            # A cache grows with each run after it: every part but a lone one starts from a copy.
            own = cache if len(parts) == 1 else copy.deepcopy(cache)
            self._score_tails(own, mask, part, scores, device)
        return scores.items()

    def _score_tails(self, cache, prefix_mask, tails, scores: dict, device) -> None:
        """Add each continuation's tokens after its first to its score. Rows are right-padded:
        under causal attention no real token sees a pad after it."""
        width = max(len(c) - 1 for _, _, c in tails)
        rows = torch.tensor([row for row, _, _ in tails])
        ids = torch.zeros(len(tails), width, dtype=torch.long)
        own = torch.zeros_like(ids)
        for r, (_, _, c) in enumerate(tails):
            ids[r, :len(c) - 1] = torch.tensor(c[:-1])
            own[r, :len(c) - 1] = 1
        cache.batch_select_indices(rows.to(device))
        before = prefix_mask[rows]
        positions = before.sum(-1, keepdim=True) + torch.arange(width)
        logits = self.model(input_ids=ids.to(device), attention_mask=torch.cat([before, own], -1).to(device),
                            position_ids=positions.to(device), use_cache=True, **{self.cache_arg: cache}).logits
        for r, (_, index, c) in enumerate(tails):
            total, greedy = scores[index]
            more, more_greedy = _score(logits[r, :len(c) - 1], c[1:])
            scores[index] = (total + more, greedy and more_greedy)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("the benchmark suite scores choices only; use lm_eval:NAME@DIR for "
                                  "perplexity tasks")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("the benchmark suite scores choices only; use lm_eval:NAME@DIR for "
                                  "generative tasks")

