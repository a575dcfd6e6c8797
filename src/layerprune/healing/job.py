"""One healing, decided before it starts (`HealJob`, from `plan`), the text it reads (`TextSpan`),
and what it did (`HealLog`).

A removal fixes everything a healing needs to know about the model: where the cuts are (in
the indexing after the removal), which layers train (the cut's neighbours by default, as in
the paper), and which student layer outputs the MSE term matches to which teacher layers.
`plan` works these out once; the teacher-target cache and `heal()` both read them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from ..config import HealConfig
from ..data import StreamPosition
from ..errors import LayerpruneError
from ..surgery import num_layers, original_indices
from .guard import GuardLog


@dataclass(frozen=True)
class TextSpan:
    """Which training text a healing read: the stream from `start` to `end` (a reused text starts
    at the beginning each time), `blocks` of it, `epochs` passes, and what was cached and why."""

    start: StreamPosition
    end: StreamPosition
    blocks: int
    epochs: int
    caches: str

    def to_json(self) -> dict:
        return {"start": self.start.to_json(), "end": self.end.to_json(), "blocks": self.blocks,
                "epochs": self.epochs, "caches": self.caches}

    @classmethod
    def from_json(cls, data: dict | None) -> "TextSpan | None":
        """None for a record written before healings recorded their text."""
        if not data or "end" not in data:
            return None
        return cls(StreamPosition.from_json(data["start"]), StreamPosition.from_json(data["end"]), data["blocks"],
                   data.get("epochs", 1), data.get("caches", ""))


@dataclass(frozen=True)
class HealJob:
    """One healing, decided before it starts. `pairs`: (student layer, teacher layer) whose
    OUTPUTS the MSE term matches, in current and original indices; `layers`: current indices
    that train; `local_steps`: how many of the first steps are local; `resume`: a state saved by
    `on_checkpoint`, to continue from its step. `text` and `held_out_before` describe what the
    run fed it and measured before it; the log carries them."""

    config: HealConfig
    steps: int
    iteration: int
    seed: int
    cuts: list[int]
    pairs: list[tuple[int, int]]
    layers: list[int]
    prefix_cache: bool = False
    resume: dict | None = None
    on_checkpoint: Callable[[dict], None] | None = None
    lr: float | None = None   # the learning rate to start from (None: config.lr); the guard may lower it
    local_steps: int = 0   # the first steps are local (step.local_step): config.local_steps after a cut
    text: TextSpan | None = None   # which training text: stream positions, blocks, caches used
    held_out_before: dict = field(default_factory=dict)   # held-out KL and perplexity of the cut, unhealed
    lr_probe: dict | None = None   # what the lr probe tried and chose (lr_probe.ProbeLog), where it ran
    label: str = "healing"   # what its progress bar says it is

    @property
    def start_lr(self) -> float:
        return self.config.lr if self.lr is None else self.lr


@dataclass
class HealLog:
    """What a healing did, as recorded in history.json; `heal()` returns it whole. The held-out
    figures after a healing are its iteration's evaluation (checkpoint.IterationRecord)."""

    steps: int
    trained_layers_current: list[int]
    mse_pairs: list[tuple[int, int]]
    rows: list[dict] = field(default_factory=list)
    resumed_at_step: int | None = None
    held_out_before: dict = field(default_factory=dict)
    text: TextSpan | None = None   # which training text: stream positions, blocks, caches used
    guard: GuardLog | None = None   # validation KL before, at each check, kept; retries; lr that won
    lr_probe: dict | None = None   # the lr probe's rungs and choice (lr_probe.ProbeLog), where it ran

    def to_json(self) -> dict:
        data = {**asdict(self), "text": self.text.to_json() if self.text is not None else {},
                "guard": self.guard.to_json() if self.guard is not None else None}
        for key in ("resumed_at_step", "guard", "lr_probe"):
            if data[key] is None:
                del data[key]
        data["mse_pairs"] = [list(pair) for pair in self.mse_pairs]
        data["first_loss"] = self.rows[0]["loss"] if self.rows else None
        data["last_loss"] = self.rows[-1]["loss"] if self.rows else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> "HealLog":
        derived = ("first_loss", "last_loss", "held_out_after")   # written for readers of the JSON
        fields = {k: v for k, v in data.items() if k not in derived}
        guard = GuardLog(**fields["guard"]) if fields.get("guard") else None
        return cls(**{**fields, "mse_pairs": [tuple(p) for p in fields["mse_pairs"]],
                      "text": TextSpan.from_json(fields.get("text")), "guard": guard})


def cut_positions(dropped: list[int]) -> list[int]:
    """Where each removed layer was, in the indexing after the removal (the index of the layer
    that now follows the cut)."""
    return [d - j for j, d in enumerate(sorted(dropped))]


# --trainable last: the layers trained with the LM head ("Reassessing Layer Pruning in LLMs").
LAST_LAYERS = 3


def trainable_layers(depth: int, cuts: list[int], config: HealConfig) -> list[int]:
    """Current indices of the layers that train: the neighbours of each cut (radius r: r layers
    below it and r above), all layers, or the last LAST_LAYERS (with the LM head, loop.py)."""
    if config.trainable == "last":
        return list(range(max(0, depth - LAST_LAYERS), depth))
    if config.trainable in ("all", "lora") or not cuts:
        return list(range(depth))
    chosen = set()
    for cut in cuts:
        chosen.update(range(max(0, cut - config.radius), min(depth, cut + config.radius)))
    return sorted(chosen) or [min(cuts[0], depth - 1)]


def check_mse_layers(config: HealConfig, depth: int) -> None:
    """Before any work: an index out of range would silently switch the MSE term off."""
    wrong = [i for i in config.mse_layers or () if not 0 <= i < depth]
    if wrong:
        raise LayerpruneError(f"--mse-layers {','.join(map(str, wrong))} is not a layer of this {depth}-layer model",
                              f"give original layer indices from 0 to {depth - 1}")


def mse_pairs(student, cuts: list[int], config: HealConfig) -> list[tuple[int, int]]:
    """Default: the layer just above the (highest) cut, matched with the teacher layer it came
    from; `mse_layers` names original layers instead."""
    originals = original_indices(student)
    depth = len(originals)
    if config.w_mse == 0 or depth == 0:
        return []
    if config.mse_layers is not None:
        return [(k, o) for k, o in enumerate(originals) if o in set(config.mse_layers)]
    k = min(max(cuts) if cuts else depth // 2, depth - 1)
    return [(k, originals[k])]


def plan(student, config: HealConfig, steps: int, iteration: int, seed: int, dropped: list[int],
         **settings) -> HealJob:
    """The healing after removing current layers `dropped` (already removed from `student`):
    the cuts, MSE pairs and trained layers follow from the removal; `settings` are the job's
    other fields (prefix_cache, lr, resume, on_checkpoint, text, held_out_before)."""
    cuts = cut_positions(dropped)
    pairs, layers = mse_pairs(student, cuts, config), trainable_layers(num_layers(student), cuts, config)
    local = min(config.local_steps, steps) if cuts else 0   # the final healing has no cut to be local to
    if local and not any(k >= min(layers) for k, _ in pairs):
        raise LayerpruneError(f"the local healing phase has no trained layer at or below the state the MSE term "
                              f"matches (student layers {[k for k, _ in pairs]}; trained {layers})",
                              "widen --radius, change --mse-layers, or pass --heal-local-steps 0")
    return HealJob(config, steps, iteration, seed, cuts, pairs, layers, local_steps=local, **settings)
