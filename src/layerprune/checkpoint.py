"""Checkpoints, written atomically, and resuming from them.

Two folders in the output folder, each written into a temporary folder,
fsynced, and swapped in by rename, so a crash at any moment leaves either the
previous version or the new one:

- `checkpoint/`, after every iteration: the student's weights (in their pruned
  shape) and `state.json` (the configuration and the history entries so far);
- `heal-checkpoint/`, every N healing steps of the iteration in flight: its
  scoring result (so scoring is not redone), the trained parameters, the
  optimizer, scheduler and RNG states, the step reached and the loss rows.
  Only what healing changes is stored: the frozen rest comes from
  `checkpoint/` plus the iteration's removal.

Resuming rebuilds the student by replaying the recorded removals on the
original model and loading the saved weights; a healing resumes at its step
with the data order replayed; every iteration is seeded by its number, so the
resumed run ends where an uninterrupted one would, bit for bit on CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model, save_model

from .errors import LayerpruneError
from .faults import crash_point
from .surgery import remove_layers

log = logging.getLogger(__name__)

FOLDER, HEAL_FOLDER = "checkpoint", "heal-checkpoint"
FILES = {FOLDER: ("state.json", "student.safetensors"), HEAL_FOLDER: ("state.json", "heal.pt")}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(out: Path, name: str, write: Callable[[Path], None], site: str) -> None:
    """`write(tmp)` fills a temporary folder; every file is fsynced, then it replaces `out/name`."""
    tmp, final, old = out / f".{name}.tmp", out / name, out / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for path in tmp.iterdir():
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    crash_point(site)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data, indent: int | None = 2) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=indent)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(out: Path, config: dict, entries: list[dict], student) -> None:
    def write(tmp: Path) -> None:
        save_model(student, str(tmp / "student.safetensors"))  # handles tied embeddings
        write_json(tmp / "state.json", {"config": config, "entries": entries}, indent=None)

    _write_atomically(out, FOLDER, write, "checkpoint")


def save_heal_checkpoint(out: Path, config: dict, pending: dict, state: dict) -> None:
    """`pending`: the iteration in flight (number, scores, removal, evaluation before healing);
    `state`: what `distill.heal` hands its checkpoint callback (tensors and rows)."""
    def write(tmp: Path) -> None:
        torch.save(state, tmp / "heal.pt")
        write_json(tmp / "state.json", {"config": config, "pending": {**pending, "step": state["step"]}}, indent=None)

    _write_atomically(out, HEAL_FOLDER, write, "heal-checkpoint")


def find_checkpoint(out: Path, name: str = FOLDER) -> Path | None:
    """The newest complete checkpoint: `name/`, or `.name.old/` if a crash came mid-swap."""
    for folder in (out / name, out / f".{name}.old"):
        if all((folder / file).is_file() for file in FILES[name]):
            return folder
    return None


def read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LayerpruneError(f"the checkpoint in {folder} is unreadable ({err})",
                              "pass --overwrite to start afresh") from err


def read_heal_state(folder: Path) -> dict:
    try:
        return torch.load(folder / "heal.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: torch raises several types
        raise LayerpruneError(f"the healing checkpoint in {folder} is unreadable ({err})",
                              "pass --overwrite to start afresh") from err


def restore_student(student, folder: Path, entries: list[dict]) -> None:
    """Replay the recorded removals on a copy of the original, then load the saved weights."""
    for entry in entries:
        remove_layers(student, entry["removed_current"])
    load_model(student, str(folder / "student.safetensors"), strict=True,
               device=str(next(student.parameters()).device))
    log.info("resumed after iteration %d (removed original layers %s)", len(entries),
             [layer for e in entries for layer in e["removed_original"]])


def clear(out: Path, names=(FOLDER, HEAL_FOLDER)) -> None:
    for name in names:
        for folder in (name, f".{name}.tmp", f".{name}.old"):
            shutil.rmtree(out / folder, ignore_errors=True)
