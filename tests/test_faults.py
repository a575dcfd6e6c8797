import math

import pytest

from layerprune import faults


def test_poison_hits_only_the_named_occurrence(monkeypatch):
    monkeypatch.setattr(faults, "_COUNTS", {})
    monkeypatch.setenv("LAYERPRUNE_NAN_AT", "healing:2")
    values = [faults.poisoned("healing", 1.0) for _ in range(3)]
    assert values[0] == 1.0 and math.isnan(values[1]) and values[2] == 1.0
    assert faults.poisoned("scoring", 1.0) == 1.0


def test_unset_or_other_sites_do_nothing_and_count_nothing(monkeypatch):
    monkeypatch.setattr(faults, "_COUNTS", {})
    for variable in ("LAYERPRUNE_KILL_AT", "LAYERPRUNE_NAN_AT", "LAYERPRUNE_FULL_AT"):
        monkeypatch.delenv(variable, raising=False)
    for _ in range(3):   # the process survives, the value passes, no write fails
        faults.crash_point("healing")
        faults.full_disk_point("checkpoint")
        assert faults.poisoned("healing", 2.0) == 2.0
    assert faults._COUNTS == {}
    monkeypatch.setenv("LAYERPRUNE_KILL_AT", "scoring:1")   # another site's point: passed untouched
    monkeypatch.setenv("LAYERPRUNE_FULL_AT", "history.json:1")
    faults.crash_point("healing")
    faults.full_disk_point("checkpoint")
    assert faults._COUNTS == {}


def test_a_full_disk_point_fails_as_a_full_disk_at_its_occurrence(monkeypatch):
    import errno

    monkeypatch.setattr(faults, "_COUNTS", {})
    monkeypatch.setenv("LAYERPRUNE_FULL_AT", "checkpoint:2")
    faults.full_disk_point("checkpoint")
    with pytest.raises(OSError) as failed:
        faults.full_disk_point("checkpoint")
    assert failed.value.errno == errno.ENOSPC
