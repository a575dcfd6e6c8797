"""The exception types users see.

Every problem a user can fix (a bad path, a depth out of range, data that is
too short) is raised as `LayerpruneError` with a message that names the
problem and the fix. The CLI prints it as one line and exits non-zero; any
other exception is a bug in layerprune and keeps its traceback.
"""


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
