"""Named fault points, for the tests that kill a run, or poison it, and resume it.

`LAYERPRUNE_KILL_AT=site:n` makes the process SIGKILL itself the n-th time it
passes `crash_point(site)` (scoring, healing, heal-checkpoint, checkpoint,
final); `site:n:SIGTERM` sends that signal instead. `LAYERPRUNE_NAN_AT=site:n`
turns the n-th value passing `poisoned(site, value)` into NaN (healing: one
micro-batch's loss). `LAYERPRUNE_FULL_AT=site:n` makes the n-th write passing
`full_disk_point(site)` fail as on a full disk, after it has written part of
its temporary file (lock, checkpoint, heal-checkpoint, result, model.gguf,
heal.csv, history.json). Unset, each is one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

_COUNTS: dict[tuple[str, str], int] = {}


def _due(variable: str, site: str) -> bool:
    spec = os.environ.get(variable)
    if not spec:
        return False
    name, _, nth = spec.partition(":")
    nth = nth.partition(":")[0]
    if name != site:
        return False
    key = (variable, site)
    _COUNTS[key] = _COUNTS.get(key, 0) + 1
    return _COUNTS[key] == int(nth or 1)


def crash_point(site: str) -> None:
    if _due("LAYERPRUNE_KILL_AT", site):
        name = os.environ["LAYERPRUNE_KILL_AT"].split(":")[2:] or ["SIGKILL"]
        os.kill(os.getpid(), getattr(signal, name[0]))


def full_disk_point(site: str) -> None:
    if _due("LAYERPRUNE_FULL_AT", site):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def poisoned(site: str, value):
    return value * float("nan") if _due("LAYERPRUNE_NAN_AT", site) else value
