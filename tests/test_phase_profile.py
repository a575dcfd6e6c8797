"""bench/phase_profile.py reads a run's phases from its progress output: each stretch a row with
its seconds and peak RSS, iterations numbered by the log's "iteration N/M: removed" lines."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "phase_profile.py"

FAKE_RUN = r"""
import sys, time
for line, pause in [("data embedded:wiki: blocks", 0.3), ("m: 6 layers, removing 2 (--remove 2) by quality", 0.1),
                    ("scoring layers:  50%|", 0.3), ("healing (iteration 1):  10%|", 0.3),
                    ("healing iteration 1: validation KL 0.1 -> 0.09 at lr 0.0005", 0.2),
                    ("iteration 1/2: removed layer [3]", 0.1), ("scoring layers:  5%|", 0.2),
                    ("iteration 2/2: removed layer [2]", 0.1), ("speed: prefill", 0.1)]:
    print(line, end="\r", file=sys.stderr, flush=True)
    time.sleep(pause)
"""


def test_each_phase_of_a_run_gets_its_seconds_in_order(tmp_path):
    out = tmp_path / "phases.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), "--", sys.executable, "-c", FAKE_RUN],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["phases"]
    assert [row["phase"] for row in rows] == ["start", "inputs", "shortlist 1", "scoring 1", "healing 1",
                                              "evaluation 1", "shortlist 2", "scoring 2", "final suite", "speed"]
    seconds = {row["phase"]: row["seconds"] for row in rows}
    assert seconds["inputs"] >= 0.25 and seconds["scoring 1"] >= 0.25 and seconds["scoring 2"] >= 0.15
    assert all(row["peak_rss_gb"] > 0 for row in rows[1:-1])
    assert "whole run" in done.stdout
