"""Named crash points, for the tests that kill a run and resume it.

`LAYERPRUNE_KILL_AT=site:n` makes the process SIGKILL itself the n-th time it
passes `site` (scoring, healing, checkpoint, final). Unset, `crash_point` is
one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_COUNTS: dict[str, int] = {}


def crash_point(site: str) -> None:
    spec = os.environ.get("LAYERPRUNE_KILL_AT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != site:
        return
    _COUNTS[site] = _COUNTS.get(site, 0) + 1
    if _COUNTS[site] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
