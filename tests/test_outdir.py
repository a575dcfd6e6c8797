"""Nothing lost, nothing mixed up: one run per output folder, never a write over what is not ours,
resumes keyed to the folder (not its spelling), and every OS failure one line with no temporary
file left behind."""

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from layerprune import faults, outdir, prepare
from layerprune.run import PruneRun
from layerprune.cli import main
from layerprune.errors import write_error

from test_cli import common, run


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders a failed write must not leave behind."""
    return [str(p) for p in folder.rglob("*") if p.name.endswith((".tmp", ".deleting")) or p.name == ".staging"]


def prune_args(tiny_dir, text_file, out, *extra):
    return [*common(tiny_dir, text_file, out), "--remove", "2", "--metric", "bi", "--heal", "distill",
            "--heal-steps", "2", "--heal-checkpoint-every", "1", "--val-tokens", "64", *extra]


def test_a_second_run_on_a_locked_folder_is_refused_at_once_and_sigkill_leaves_no_stale_lock(
        capsys, monkeypatch, tiny_dir, text_file, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from layerprune.outdir import claim; held = claim(Path(sys.argv[1]), None, False); "
                               "print('held', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"

        def never(*args, **kwargs):
            raise AssertionError("the model was loaded although the folder is in use")

        monkeypatch.setattr(prepare, "load_model", never)
        code, lines = run(capsys, *prune_args(tiny_dir, text_file, out))
        assert code == 2 and len(lines) == 1
        assert f"is in use by another layerprune run (process {holder.pid})" in lines[0]
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.undo()
    assert main(prune_args(tiny_dir, text_file, out)) == 0   # the OS dropped the killed holder's lock
    assert (out / "history.json").exists()


def test_the_model_folder_as_out_is_left_byte_identical(capsys, tiny_dir, text_file):
    before = snapshot(tiny_dir)
    for extra in ([], ["--overwrite"]):
        code, lines = run(capsys, *prune_args(tiny_dir, text_file, tiny_dir, *extra))
        assert code == 2 and "holds the model being pruned" in lines[0]
    assert snapshot(tiny_dir) == before


def test_a_folder_of_the_users_own_files_is_refused_whatever_the_flags(capsys, tiny_dir, text_file, tmp_path):
    out = tmp_path / "mine"
    (out / "logs").mkdir(parents=True)
    for name, text in (("README.md", "my notes"), ("report.md", "my report"), ("logs/heal.csv", "a,b\n")):
        (out / name).write_text(text)
    before = snapshot(out)
    for extra in ([], ["--overwrite"], ["--resume"]):
        code, lines = run(capsys, *prune_args(tiny_dir, text_file, out, *extra))
        assert code == 2 and "holds no layerprune run" in lines[0], lines
    assert snapshot(out) == before


def test_a_failed_start_leaves_a_new_folder_as_it_was(capsys, tiny_dir, text_file, tmp_path):
    out = tmp_path / "new"
    code, _ = run(capsys, *prune_args(tiny_dir, text_file, out, "--seq-len", "512"))
    assert code == 2 and not out.exists()


def interrupted_after_first_iteration(monkeypatch, argv):
    """Run until the first iteration is checkpointed, then stop as a Ctrl-C would."""
    select, calls = PruneRun._select, []

    def stop_at_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return select(*args, **kwargs)

    monkeypatch.setattr(PruneRun, "_select", stop_at_second)
    assert main(argv) == 130
    monkeypatch.undo()


def test_resume_by_another_spelling_or_after_a_move_ends_bit_identical(monkeypatch, tiny_dir, text_file, tmp_path):
    reference = tmp_path / "reference"
    assert main(prune_args(tiny_dir, text_file, reference)) == 0
    out = tmp_path / "runs" / "x"
    interrupted_after_first_iteration(monkeypatch, prune_args(tiny_dir, text_file, out))
    assert (out / "checkpoint").is_dir() and not (out / "history.json").exists()
    assert main(prune_args(tiny_dir, text_file, f"{out}/", "--resume")) == 0
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    moved_from, moved_to = tmp_path / "runs" / "y", tmp_path / "elsewhere" / "y"
    interrupted_after_first_iteration(monkeypatch, prune_args(tiny_dir, text_file, moved_from))
    moved_to.parent.mkdir()
    shutil.move(str(moved_from), str(moved_to))
    monkeypatch.chdir(moved_to.parent)
    assert main(prune_args(tiny_dir, text_file, "./y", "--resume")) == 0
    b = load_file(str(moved_to / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


# Every moment the run writes, failing as on a full disk: (site, what has been written before it).
WRITE_MOMENTS = ["lock", "heal-checkpoint", "checkpoint", "heal.csv", "result", "history.json"]


@pytest.mark.parametrize("site", WRITE_MOMENTS)
def test_a_full_disk_at_any_write_is_one_line_leaves_no_temporary_file_and_resumes(
        capsys, monkeypatch, tiny_dir, text_file, tmp_path, site):
    out = tmp_path / "out"
    monkeypatch.setattr(faults, "_COUNTS", {})
    monkeypatch.setenv("LAYERPRUNE_FULL_AT", f"{site}:1")
    code, lines = run(capsys, *prune_args(tiny_dir, text_file, out))
    assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0] and str(out) in lines[0], lines
    assert "free disk space" in lines[0]
    assert "Traceback" not in capsys.readouterr().err
    assert not (out / "history.json").exists()
    assert leftovers(out) == [] if out.exists() else True
    monkeypatch.delenv("LAYERPRUNE_FULL_AT")
    assert main(prune_args(tiny_dir, text_file, out)) == 0
    assert (out / "history.json").exists() and leftovers(out) == []


def test_a_read_only_folder_is_one_line_before_the_model_is_loaded(capsys, monkeypatch, tiny_dir, text_file,
                                                                    tmp_path):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although the folder is read-only")

    monkeypatch.setattr(outdir, "open", read_only, raising=False)
    monkeypatch.setattr(prepare, "load_model", never)
    code, lines = run(capsys, *prune_args(tiny_dir, text_file, tmp_path / "out"))
    assert code == 2 and "Read-only file system" in lines[0] and "writable" in lines[0]


def test_too_little_free_space_is_refused_before_the_model_is_loaded(capsys, monkeypatch, tiny_dir, text_file,
                                                                      tmp_path):
    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 10))
    code, lines = run(capsys, *prune_args(tiny_dir, text_file, tmp_path / "out"))
    assert code == 2 and "GiB free" in lines[0] and "free disk space" in lines[0]


def test_torch_and_safetensors_full_disk_errors_become_one_line():
    from safetensors import SafetensorError

    for err in (RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing "
                             "file data/0: file write failed"),
                SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                "message: \"No space left on device\" })"),
                OSError(errno.ENOSPC, "No space left on device")):
        problem = write_error(Path("runs/x"), err)
        assert problem is not None and "No space left on device" in str(problem) and "runs/x" in str(problem)
    assert write_error(Path("x"), RuntimeError("a bug")) is None


def test_sigterm_is_one_line_and_the_run_resumes(tiny_dir, text_file, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "layerprune", *prune_args(tiny_dir, text_file, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAYERPRUNE_KILL_AT": "healing:2:SIGTERM"}
    stopped = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 143
    assert stopped.stderr.strip().splitlines()[-1].startswith("layerprune: terminated (rerun the same command")
    assert "Traceback" not in stopped.stderr
    env.pop("LAYERPRUNE_KILL_AT")
    resumed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_only_our_own_records_make_a_folder_ours(tmp_path):
    assert not outdir.holds_our_run(tmp_path)
    (tmp_path / "history.json").write_text("{}")            # someone else's history.json
    assert not outdir.holds_our_run(tmp_path)
    (tmp_path / "history.json").write_text('{"config": {}, "kept_original": [0, 1]}')   # ours, before records
    assert outdir.holds_our_run(tmp_path)
    other = tmp_path / "other"
    (other / "checkpoint").mkdir(parents=True)
    assert not outdir.holds_our_run(other)
    (other / "checkpoint" / "state.json").write_text("{}")
    assert outdir.holds_our_run(other)
