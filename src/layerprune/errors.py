"""The exception types users see.

Every problem a user can fix (a bad path, a depth out of range, data that is
too short) is raised as `LayerpruneError` with a message that names the
problem and the fix. The CLI prints it as one line and exits non-zero; any
other exception is a bug in layerprune and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class LayerpruneError(Exception):
    """A problem with the user's input or environment, with its fix in the message."""

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem}; {fix}"
        super().__init__(message)
        self.problem = problem
        self.fix = fix


class NonFiniteError(LayerpruneError):
    """NaN or inf in scores, states or a healing loss: the run stops and names where."""


class WriteError(LayerpruneError):
    """The file system refused a write (no space, read-only, a file in the path): fatal wherever
    it happens, even where other problems of an optional output are only reported."""


def write_error(path: Path, err: BaseException) -> WriteError | None:
    """`err` as a one-line error naming `path` and the fix, if it is a failure of the file system
    (torch and safetensors report a full disk as RuntimeError or SafetensorError); None else."""
    code = err.errno if isinstance(err, OSError) else None
    text = str(err)
    if code is None and not any(sign in text for sign in ("No space left", "os error", "write failed",
                                                          "Read-only file system", "Permission denied")):
        return None
    if code is None:
        code = (errno.ENOSPC if "No space left" in text or "write failed" in text else
                errno.EROFS if "Read-only" in text else errno.EACCES)
    reason = os.strerror(code)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = ("free disk space or choose another --out, then rerun the same command: it resumes from the last "
               "checkpoint")
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "make the folder writable or choose another --out"
    elif code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        fix = "a part of the path is a file, not a folder: choose another --out"
    else:
        fix = "check the folder and rerun the same command"
    return WriteError(f"cannot write {path} ({reason})", fix)
