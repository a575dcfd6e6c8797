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


def _suite(correct: list[int]) -> dict:
    n = len(correct)
    return {"boolq": {"metric": "acc", "chance": "majority", "item": [f"b/{i}" for i in range(n)],
                      "acc": [1.0] * n, "acc_norm": [1.0] * n, "choices": [2] * n, "target": [1] * n},
            "piqa": {"metric": "acc", "chance": "uniform", "item": [f"p/{i}" for i in range(n)],
                     "acc": [float(c) for c in correct], "acc_norm": [float(c) for c in correct],
                     "choices": [2] * n, "target": [0] * n}}


def test_each_variant_is_paired_with_todays_default_on_the_same_items(tmp_path):
    """The screen's leads and losses with their noise: per-item results kept by two variants give
    the difference on the suite, without BoolQ, and on copying; a variant whose reference has not
    finished gets no line."""
    from layerprune.tasks.suite import ItemResults

    sweep = sweep_module()
    keep = tmp_path / "keep"
    files = {"current": (_suite([1, 0, 0, 0]), [0.5] * 4), "choice-copy": (_suite([1, 1, 0, 0]), [1.0] * 4)}
    for key, (bench, copying) in files.items():
        (keep / key).mkdir(parents=True)
        (keep / key / sweep.BENCH_ITEMS).write_text(json.dumps(bench))
        (keep / key / sweep.COPY_ITEMS).write_text(json.dumps(copying))
    rows = {"current": {"variant": "current", "seed": 0}, "choice-copy": {"variant": "choice-copy", "seed": 0},
            "bf16@1": {"variant": "bf16", "seed": 1}}
    original = {"bench": ItemResults.from_json(_suite([1, 1, 1, 1])), "copy": [1.0] * 4}
    lines = sweep.differences(rows, [tmp_path / "runs", keep], original)
    assert len(lines) == 1 and lines[0].startswith("| choice-copy | 0 | ")
    suite, without, copying = (cell.split(" [")[0] for cell in lines[0].strip(" |").split(" | ")[2:])
    # one PIQA item more of 4: +1/8 over both tasks (BoolQ scores 1 everywhere), +1/4 without BoolQ
    assert (suite, without, copying) == ("+0.125", "+0.250", "+0.500")
