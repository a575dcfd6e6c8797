"""How deep the pruned model ends: the user's target, in layers, parameters or speed, as a
count of layers to remove, with the reason said in one sentence.

- `--remove K` and `--target-layers N` say it in layers.
- `--target-params N` (200M, 1.5B, 350000) counts the parameters the model keeps: embeddings,
  every kept layer, the final norm and an LM head that is not tied (each parameter once; for
  a mixture of experts, every expert). Which layers go is chosen later, so the count assumes
  the smallest go first: the result has at most N parameters, exactly as many as said when
  the layers are alike.
- `--target-speedup X` is measured on this device: prefill throughput of the model running its
  first d layers against the whole model (speed.prefill_speedup), for the fewest removals that
  reach X. `--speedup-estimate` takes the layer proportion (depth / kept) instead, which
  ignores the embeddings and the LM head and so promises more than a real run gives.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from .config import PruneConfig
from .errors import LayerpruneError
from .surgery import find_layers

log = logging.getLogger(__name__)

SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


@dataclass(frozen=True)
class Depth:
    """How many layers leave the model, and why that many."""

    remove: int
    why: str


def parse_count(text: str) -> int:
    """'200M' -> 200_000_000; '1.5B', '350000' and '3e8' as written."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", str(text).lower())
    if match is None:
        raise LayerpruneError(f"--target-params {text!r} is not a parameter count", "write e.g. 200M, 1.5B or 350000")
    return int(float(match.group(1)) * SUFFIXES[match.group(2)])


def _in_millions(count: float) -> str:
    return f"{count / 1e6:,.1f}M"


def layer_sizes(model) -> list[int]:
    return [sum(p.numel() for p in layer.parameters()) for layer in find_layers(model).layers]


def plan_depth(config: PruneConfig, model) -> Depth:
    """The count of layers to remove from `model`, checked against what may go (the unprotected
    layers, one always kept), before any heavy work."""
    depth = len(find_layers(model).layers)
    most = config.most_removable(depth)
    if config.target_params is not None:
        return _for_params(parse_count(config.target_params), model, most)
    if config.target_speedup is not None:
        return _for_speedup(config.target_speedup, model, most, config.speedup_estimate)
    if config.target_layers is not None:
        if config.target_layers >= depth:
            raise LayerpruneError(f"--target-layers {config.target_layers} is not below the model's {depth} layers",
                                  f"choose a target between 1 and {depth - 1}")
        return _checked(Depth(depth - config.target_layers, f"--target-layers {config.target_layers}"), depth, most)
    return _checked(Depth(config.remove, f"--remove {config.remove}"), depth, most)


def _checked(planned: Depth, depth: int, most: int) -> Depth:
    if planned.remove >= depth:
        raise LayerpruneError(f"--remove {planned.remove} would leave no layer of the model's {depth}",
                              f"remove at most {depth - 1}")
    if planned.remove > most:
        raise LayerpruneError(f"cannot remove {planned.remove} layers: only {max(most, 0)} of {depth} are "
                              "unprotected", "lower --protect-first/--protect-last, or remove fewer")
    return planned


def _for_params(target: int, model, most: int) -> Depth:
    total = sum(p.numel() for p in model.parameters())
    smallest = sorted(layer_sizes(model))
    kept = [total - sum(smallest[:k]) for k in range(most + 1)]
    if target >= total:
        raise LayerpruneError(f"--target-params {_in_millions(target)} is not below the model's "
                              f"{_in_millions(total)}", f"give a count from {_in_millions(kept[-1])} to below "
                                                         f"{_in_millions(total)}")
    count = next((k for k in range(1, most + 1) if kept[k] <= target), None)
    if count is None:
        raise LayerpruneError(f"--target-params {_in_millions(target)} is below what the model keeps with "
                              f"{most} layers removed ({_in_millions(kept[-1])})",
                              f"give a count from {_in_millions(kept[-1])} to below {_in_millions(total)}")
    return Depth(count, f"--target-params {_in_millions(target)}: {count} layer(s) removed leave at most "
                        f"{_in_millions(kept[count])} of {_in_millions(total)} parameters")


def _for_speedup(target: float, model, most: int, estimate: bool) -> Depth:
    from .speed import prefill_speedup

    depth = len(find_layers(model).layers)
    if estimate:
        count = math.ceil(depth - depth / target - 1e-9)
        if count > most:
            raise LayerpruneError(f"--target-speedup {target:g} needs {count} of {depth} layers removed; at most "
                                  f"{most} may go", f"ask for at most {depth / (depth - most):.2f}x")
        return Depth(count, f"--target-speedup {target:g} estimated from the layer count: {depth} -> "
                            f"{depth - count} layers is {depth / (depth - count):.2f}x")
    measured: dict[int, float] = {}

    def speedup(count: int) -> float:
        if count not in measured:
            measured[count] = prefill_speedup(model, depth - count)
            log.info("target speedup: %d layers run %.2fx the prefill speed of %d", depth - count,
                     measured[count], depth)
        return measured[count]

    count = min(max(math.ceil(depth - depth / target - 1e-9), 1), most)   # the layer proportion's guess
    while count > 1 and speedup(count - 1) >= target:
        count -= 1
    while speedup(count) < target:
        if count == most:
            raise LayerpruneError(f"--target-speedup {target:g} is not reached on this device: with {most} of "
                                  f"{depth} layers removed prefill runs {measured[most]:.2f}x",
                                  f"ask for at most {measured[most]:.2f}x, or allow more layers to go")
        count += 1
    return Depth(count, f"--target-speedup {target:g}: {depth - count} of {depth} layers measured "
                        f"{measured[count]:.2f}x prefill on this device")
