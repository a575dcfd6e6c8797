"""keep_freed_memory: large tensors reuse freed memory (no page faults), the user's settings win."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt")

# Allocates, writes and frees three 20 MiB tensors ten times, twice; prints whether the settings were
# made and the page faults of the second round (the first may fault the heap in).
CHURN = """
import resource, sys, torch
from layerprune.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def churn():
    for _ in range(10):
        blocks = [torch.empty(5 * 2**20) for _ in range(3)]
        for block in blocks:
            block.fill_(1.0)
        del blocks, block
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def churn(way: str, **env) -> tuple[bool, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", CHURN, way], capture_output=True, text=True, check=True,
                         env=environment).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_blocks_are_reused_without_page_faults():
    _, default_faults = churn("default")
    kept, faults = churn("keep")
    assert kept
    assert default_faults > 20_000   # glibc's defaults: freed blocks go back to the kernel, faulted in again
    assert faults < default_faults / 20


def test_the_users_own_glibc_settings_are_kept():
    kept, faults = churn("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert not kept
    assert faults > 20_000
