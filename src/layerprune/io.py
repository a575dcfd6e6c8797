"""Atomic writes: a reader, or a resumed run, sees the old version of a file or folder or the
new one, never half of one. Every module that leaves something on disk writes through here."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from .faults import crash_point


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes a temporary file next to `path`, which then replaces `path` whole.
    A failed write leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def write_json(path: Path, data, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent))


def write_folder(out: Path, name: str, write: Callable[[Path], None], site: str) -> None:
    """`write(tmp)` fills a temporary folder; every file in it is fsynced, then it replaces
    `out/name`. A crash mid-swap leaves `.name.old`, which readers accept as the previous version."""
    tmp, final, old = out / f".{name}.tmp", out / name, out / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for path in tmp.iterdir():
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    fsync_dir(tmp)
    crash_point(site)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)


def remove_folder(out: Path, name: str) -> None:
    """A folder written by `write_folder`, with its temporary and previous versions."""
    for folder in (name, f".{name}.tmp", f".{name}.old"):
        shutil.rmtree(out / folder, ignore_errors=True)
