"""The LM head: finding it, comparing two, reading its input, and whether it is a plain linear map.

Evaluation (tasks/moments.py, tasks/engine.py) and healing (healing/step.py) both apply the head
themselves to a part of the tokens at a time where the logits are its plain linear map of the
final norm's output; the probes that say so live here, below both.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from .activations import capture, final_norm
from .shard import is_sharded

# Logits recomputed from the captured head input must match the model's own within this (relative
# to their scale): otherwise the head is not plain linear and the moments would not be exact.
LINEAR_TOLERANCE = 1e-4


def head(model) -> torch.nn.Module | None:
    """The model's LM head, where it has a plain one with a weight."""
    try:
        module = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return module if isinstance(getattr(module, "weight", None), torch.Tensor) else None


def same_head(model, teacher) -> bool:
    """Whether the model's LM head is the teacher's, value for value (and neither is sharded)."""
    mine, theirs = head(model), head(teacher)
    if mine is None or theirs is None or is_sharded(model) or is_sharded(teacher):
        return False
    if mine.weight.shape != theirs.weight.shape or not torch.equal(mine.weight, theirs.weight):
        return False
    bias, their_bias = getattr(mine, "bias", None), getattr(theirs, "bias", None)
    return (bias is None) == (their_bias is None) and (bias is None or torch.equal(bias, their_bias))


@contextmanager
def head_inputs(model) -> Iterator[dict]:
    """Within the block, `record["h"]` is the input of the model's LM head in the latest forward."""
    record: dict = {}
    module = head(model)
    handle = module.register_forward_pre_hook(lambda m, args: record.__setitem__("h", args[0]))
    try:
        yield record
    finally:
        handle.remove()


# Positions of the first row that `linear_head` recomputes: a cap or a scale shows on any token
# (8 x the vocabulary values), and a whole batch's logits recomputed would be as large as the batch's
# logits themselves (1 GB for Gemma-3's 262K vocabulary at 4 x 256 tokens).
PROBE_TOKENS = 8


def linear_head(model, logits: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether `logits` are exactly the head's linear map of `h` (no capping or scaling), on the
    first PROBE_TOKENS positions of the first row."""
    module = head(model)
    logits, h = logits.reshape(-1, logits.shape[-1])[:PROBE_TOKENS], h.reshape(-1, h.shape[-1])[:PROBE_TOKENS]
    again = F.linear(h.to(module.weight.dtype), module.weight, getattr(module, "bias", None)).float()
    scale = logits.float().abs().amax().clamp_min(1.0)
    return bool(((again - logits.float()).abs().amax() <= LINEAR_TOLERANCE * scale).item())


def plain_head(model) -> bool:
    """Whether the model's logits are its LM head's plain linear map of its final norm's output (no
    capping or scaling), checked on 8 tokens, and it is not sharded: then a caller may apply the
    head itself, to a part of the tokens at a time."""
    if is_sharded(model) or head(model) is None or final_norm(model) is None:
        return False
    device = next(model.parameters()).device
    ids = torch.arange(PROBE_TOKENS, device=device)[None] % head(model).weight.shape[0]
    with torch.no_grad(), capture(model, inputs=False, final=True) as record:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    return linear_head(model, logits, record["final"])
