import json
import os
import signal
import subprocess
import sys

from layerprune.io import remove_folder, write_folder, write_json


def test_write_json_replaces_whole_files(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_folder_swaps_in_a_complete_folder(tmp_path):
    write_folder(tmp_path, "ck", lambda tmp: (tmp / "f").write_text("1"), "site")
    write_folder(tmp_path, "ck", lambda tmp: (tmp / "f").write_text("2"), "site")
    assert (tmp_path / "ck" / "f").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    remove_folder(tmp_path, "ck")
    assert not any(tmp_path.iterdir())


def test_a_kill_before_the_swap_leaves_the_previous_version(tmp_path):
    code = ("import sys; from pathlib import Path; from layerprune.io import write_folder; "
            "write_folder(Path(sys.argv[1]), 'ck', lambda t: (t / 'f').write_text(sys.argv[2]), 'checkpoint')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), "old"], check=True)
    env = {**os.environ, "LAYERPRUNE_KILL_AT": "checkpoint:1"}
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path), "new"], env=env)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "ck" / "f").read_text() == "old"
