"""The output folder: whose it is, one run in it at a time, and whether it can be written.

A run claims `--out` before it writes anything (`claim`):
- a folder that is not empty and holds no run of ours is refused, whatever the
  flags: layerprune never writes over a user's own files, nor over the model
  it is pruning;
- an advisory lock (`fcntl.flock` on `.layerprune.lock`) is held for the
  whole run: a second run on the folder is refused at once, naming the
  process. The OS drops the lock when the process dies, so a SIGKILL leaves
  no stale lock behind;
- `.layerprune-run.json`, the run record, marks the folder as ours. A resume
  is keyed to the folder and its checkpoints' configuration, never to how
  `--out` is spelled, so the same folder by another path, or a moved one,
  resumes.
OS failures (no space, read-only, a file in the path) become one-line errors
through `errors.write_error`, which every writer shares.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import LayerpruneError, write_error
from .faults import full_disk_point
from .io import write_json

LOCK, RECORD = ".layerprune.lock", ".layerprune-run.json"
# What a folder of ours written before run records existed holds (besides a history.json of ours).
OURS = ("checkpoint/state.json", ".checkpoint.old/state.json", "heal-checkpoint/state.json",
        ".heal-checkpoint.old/state.json")


def holds_our_run(out: Path) -> bool:
    if (out / RECORD).is_file() or any((out / name).is_file() for name in OURS):
        return True
    try:   # a finished run from before run records: its history names what it kept
        history = json.loads((out / "history.json").read_text(encoding="utf-8"))
        return isinstance(history, dict) and {"config", "kept_original"} <= set(history)
    except (OSError, ValueError):
        return False


def _same_or_inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


@dataclass
class Claim:
    """The lock held on `out`; `release()` at the end of the run."""

    out: Path
    handle: object | None = None
    fresh: bool = False   # the folder was new or empty when claimed
    made: bool = False    # the folder was made by the claim

    def abandon(self) -> None:
        """After a run that failed before writing anything: leave the folder as it was found."""
        if not self.fresh or any(item.name not in (LOCK, RECORD) for item in self.out.iterdir()):
            return
        for name in (RECORD, LOCK):
            (self.out / name).unlink(missing_ok=True)
        if self.made:
            self.out.rmdir()

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()   # closing the file drops the flock
            self.handle = None


def check_out(out: Path, model: str | None) -> None:
    """What is refused before the folder is touched: a file, the model itself, and a non-empty
    folder that holds no run of ours."""
    if out.exists() and not out.is_dir():
        raise LayerpruneError(f"--out {out} is a file", "give a folder path")
    if model and Path(model).exists() and _same_or_inside(Path(model), out):
        raise LayerpruneError(f"--out {out} holds the model being pruned ({model})",
                              "choose another --out: the run would write over its own input")
    if out.is_dir() and any(out.iterdir()) and not holds_our_run(out):
        raise LayerpruneError(f"--out {out} is not empty and holds no layerprune run",
                              "choose a new folder for --out: layerprune never writes over files it did not make")


def claim(out: Path, model: str | None, overwrite: bool, need_bytes: int = 0) -> Claim:
    """Refuse what is not ours, take the lock (refusing a folder in use), empty the folder on
    `overwrite`, and record the run. `need_bytes`: a floor on what the run will write."""
    check_out(out, model)
    made = not out.exists()
    fresh = made or not any(out.iterdir())
    try:
        out.mkdir(parents=True, exist_ok=True)
        full_disk_point("lock")
        handle = open(out / LOCK, "a+", encoding="utf-8")
    except OSError as err:
        raise (write_error(out, err) or err) from err
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise LayerpruneError(f"{out} is in use by another layerprune run (process {holder})",
                              "wait for it to finish, or choose another --out") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        if overwrite:
            _empty(out)
        if not (out / RECORD).is_file():
            write_json(out / RECORD, {"tool": "layerprune"})
        _check_space(out, need_bytes)
    except BaseException as err:
        handle.close()
        problem = write_error(out, err) if isinstance(err, OSError) else None
        if problem is not None:
            raise problem from err
        raise
    return Claim(out, handle, fresh, made)


@contextmanager
def claimed(out: Path, model: str | None, overwrite: bool = False, main: bool = True):
    """The folder claimed for the block's run (by the main process alone under `accelerate
    launch`): released after it, and left as found if the run fails before writing anything."""
    held = claim(out, model, overwrite, model_bytes(model)) if main else None
    try:
        yield held
    except BaseException:
        if held is not None:
            held.abandon()
        raise
    finally:
        if held is not None:
            held.release()


def _empty(out: Path) -> None:
    """Everything but the lock file: removing that would let a second run lock a new one."""
    for item in out.iterdir():
        if item.name == LOCK:
            continue
        shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()


def _check_space(out: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(out).free
    if need_bytes and free < need_bytes:
        raise LayerpruneError(f"{out} has {free / 2**30:.2f} GiB free; this run writes at least "
                              f"{need_bytes / 2**30:.2f} GiB (checkpoints and the result)",
                              "free disk space or choose another --out")


def model_bytes(model: str | None) -> int:
    """The size of the model's files on disk (0 when not a local path): a run writes at least
    this much, once as a checkpoint and once as the result, in float32."""
    if not model or not Path(model).exists():
        return 0
    path = Path(model)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))
