import math

from layerprune import faults


def test_poison_hits_only_the_named_occurrence(monkeypatch):
    monkeypatch.setattr(faults, "_COUNTS", {})
    monkeypatch.setenv("LAYERPRUNE_NAN_AT", "healing:2")
    values = [faults.poisoned("healing", 1.0) for _ in range(3)]
    assert values[0] == 1.0 and math.isnan(values[1]) and values[2] == 1.0
    assert faults.poisoned("scoring", 1.0) == 1.0


def test_unset_variables_do_nothing(monkeypatch):
    monkeypatch.delenv("LAYERPRUNE_KILL_AT", raising=False)
    faults.crash_point("healing")  # returns: nothing to kill
