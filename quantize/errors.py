"""The one error type the command line turns into a one-line message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class QuantizeError(Exception):
    """A problem with the user's input or environment, stated as ``<file>: <problem>``.

    ``path`` names the file or folder at fault, ``problem`` says what is wrong and, where
    there is one, what to do about it.  The CLI prints ``str(err)`` alone, never a traceback.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)
