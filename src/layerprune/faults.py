"""Named fault points, for the tests that kill a run, or poison it, and resume it.

`LAYERPRUNE_KILL_AT=site:n` makes the process SIGKILL itself the n-th time it
passes `crash_point(site)` (scoring, healing, heal-checkpoint, checkpoint,
final). `LAYERPRUNE_NAN_AT=site:n` turns the n-th value passing
`poisoned(site, value)` into NaN (healing: one micro-batch's loss). Unset,
each is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_COUNTS: dict[tuple[str, str], int] = {}


def _due(variable: str, site: str) -> bool:
    spec = os.environ.get(variable)
    if not spec:
        return False
    name, _, nth = spec.partition(":")
    if name != site:
        return False
    key = (variable, site)
    _COUNTS[key] = _COUNTS.get(key, 0) + 1
    return _COUNTS[key] == int(nth or 1)


def crash_point(site: str) -> None:
    if _due("LAYERPRUNE_KILL_AT", site):
        os.kill(os.getpid(), signal.SIGKILL)


def poisoned(site: str, value):
    return value * float("nan") if _due("LAYERPRUNE_NAN_AT", site) else value
