"""Atomic writes: a reader, or a resumed run, sees the old version of a file or folder or the
new one, never half of one. Every module that leaves something on disk writes through here.

A folder written by `write_folder` carries `manifest.json`: the size and sha256 of each of its
files, which `verify_folder` checks before a resumed run trusts any of them. A failed write
leaves no temporary file behind and ends in a one-line error naming the path
(errors.write_error)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from .errors import LayerpruneError, write_error
from .faults import crash_point, full_disk_point

MANIFEST = "manifest.json"


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
        full_disk_point(path.name)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception) and not isinstance(err, LayerpruneError):
            raise (write_error(path, err) or err) from err
        raise


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def write_json(path: Path, data, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def write_folder(out: Path, name: str, write: Callable[[Path], None], site: str, collective: bool = False) -> None:
    """`write(tmp)` fills a temporary folder; its manifest is added, every file is fsynced, then
    it replaces `out/name`. A crash mid-swap leaves `.name.old`, which readers accept as the
    previous version; a failed write removes the temporary folder. `collective`: every process
    calls this and `write` (each writes its shard, --fsdp); the main one makes, seals and swaps
    the folder, the others wait for it."""
    from .processes import is_main_process, wait_for_everyone

    if collective and not is_main_process():
        wait_for_everyone()   # the main process has made the folder
        write(out / f".{name}.tmp")
        wait_for_everyone()   # every shard is written
        wait_for_everyone()   # the folder is in place
        return
    tmp, final, old = out / f".{name}.tmp", out / name, out / f".{name}.old"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if collective:
            wait_for_everyone()
        write(tmp)
        if collective:
            wait_for_everyone()
        full_disk_point(name)
        files = {path.name: file_entry(path) for path in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}), encoding="utf-8")
        for path in tmp.iterdir():
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
        fsync_dir(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and not isinstance(err, LayerpruneError):
            raise (write_error(final, err) or err) from err
        raise
    crash_point(site)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)
    if collective:
        wait_for_everyone()


def verify_folder(folder: Path, needed: tuple[str, ...]) -> None:
    """Every file `folder`'s manifest names has the size and sha256 it had when written, and the
    files a reader needs are among them; a one-line error naming the file otherwise."""
    fix = "restore the file, or pass --overwrite to start afresh"
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError(files)
    except FileNotFoundError:
        raise LayerpruneError(f"the checkpoint {folder} has no {MANIFEST} (it is incomplete, or from a layerprune "
                              "before checksums)", fix) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LayerpruneError(f"{folder / MANIFEST} is damaged ({err})", fix) from err
    for name in needed:
        if name not in files:
            raise LayerpruneError(f"the checkpoint {folder} does not list {name}", fix)
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise LayerpruneError(f"the checkpoint file {path} is missing", fix)
        if path.stat().st_size != entry.get("bytes") or sha256(path) != entry.get("sha256"):
            raise LayerpruneError(f"the checkpoint file {path} has changed since it was written (size or sha256 "
                                  "differs from its manifest)", fix)


def remove_folder(out: Path, name: str) -> None:
    """A folder written by `write_folder`, with its temporary and previous versions. Each is
    renamed away first, so a crash mid-removal never leaves half a checkpoint under its name."""
    for folder in (name, f".{name}.tmp", f".{name}.old"):
        path = out / folder
        if path.exists():
            doomed = out / f".{folder.lstrip('.')}.deleting"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
