"""Checkpoints after every iteration, written atomically, and resuming from them.

A checkpoint is a folder `checkpoint/` in the output folder: the student's
weights (in their pruned shape) and `state.json` (the configuration and the
history entries so far). It is written into a temporary folder, fsynced, and
swapped in by rename, so a crash at any moment leaves either the previous
checkpoint or the new one. Resuming rebuilds the student by replaying the
recorded removals on the original model and loading the saved weights;
every later iteration is seeded by its number, so the resumed run ends where
an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from safetensors.torch import load_model, save_model

from .errors import LayerpruneError
from .faults import crash_point
from .surgery import remove_layers

log = logging.getLogger(__name__)

FOLDER = "checkpoint"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out: Path, config: dict, entries: list[dict], student) -> None:
    tmp, final, old = out / f".{FOLDER}.tmp", out / FOLDER, out / f".{FOLDER}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(student, str(tmp / "student.safetensors"))  # handles tied embeddings
    with open(tmp / "state.json", "w", encoding="utf-8") as handle:
        json.dump({"config": config, "entries": entries}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    with open(tmp / "student.safetensors", "rb+") as handle:
        os.fsync(handle.fileno())
    _fsync_dir(tmp)
    crash_point("checkpoint")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint: `checkpoint/`, or `.checkpoint.old/` if a crash came mid-swap."""
    for name in (FOLDER, f".{FOLDER}.old"):
        folder = out / name
        if (folder / "state.json").is_file() and (folder / "student.safetensors").is_file():
            return folder
    return None


def read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LayerpruneError(f"the checkpoint in {folder} is unreadable ({err})",
                              "pass --overwrite to start afresh") from err


def restore_student(student, folder: Path, entries: list[dict]) -> None:
    """Replay the recorded removals on a copy of the original, then load the saved weights."""
    for entry in entries:
        remove_layers(student, entry["removed_current"])
    load_model(student, str(folder / "student.safetensors"), strict=True,
               device=str(next(student.parameters()).device))
    log.info("resumed after iteration %d (removed original layers %s)", len(entries),
             [layer for e in entries for layer in e["removed_original"]])


def clear(out: Path) -> None:
    for name in (FOLDER, f".{FOLDER}.tmp", f".{FOLDER}.old"):
        shutil.rmtree(out / name, ignore_errors=True)
