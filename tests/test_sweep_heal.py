"""bench/sweep_heal.py's kept folder: a sweep longer than a session continues from the rows and
files it keeps there, since the next session's checkout has no runs/ folder."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "sweep_heal.py"


def sweep_module():
    spec = importlib.util.spec_from_file_location("sweep_heal", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finished_variants_are_kept_and_a_fresh_working_folder_continues_from_them(tmp_path):
    sweep = sweep_module()
    out, keep = tmp_path / "runs" / "screen", tmp_path / "docs" / "screen"
    finished = out / "current"
    finished.mkdir(parents=True)
    (finished / "history.json").write_text('{"removed_original": [3]}')
    (finished / "bench-calibration.json").write_text("{}")
    (finished / "model.safetensors").write_bytes(b"weights")
    rows = {"current": {"variant": "current", "validation": 0.8}}
    sweep.save_rows(rows, out, keep, finished)

    assert json.loads((keep / "sweep.json").read_text()) == rows == json.loads((out / "sweep.json").read_text())
    assert sorted(p.name for p in (keep / "current").iterdir()) == ["bench-calibration.json", "history.json"]
    # the next session: no working folder, the kept rows count as finished
    assert sweep.read_rows(tmp_path / "fresh", keep) == rows
    # the working folder's rows are newer than the kept ones
    (out / "sweep.json").write_text(json.dumps({"current": {"variant": "current", "validation": 0.9}}))
    assert sweep.read_rows(out, keep)["current"]["validation"] == 0.9
    assert sweep.read_rows(out, None)["current"]["validation"] == 0.9
