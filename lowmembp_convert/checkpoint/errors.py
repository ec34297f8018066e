"""CheckpointError: the one exception the checkpoint converter raises for bad input.

Its message is one line that names the path, says what is wrong and how to fix it, so the CLI can
print it as is and exit non-zero.
"""

from __future__ import annotations

import os


class CheckpointError(Exception):
    """A checkpoint cannot be read, converted or written.

    Attributes:
        path: the file or directory at fault.
        problem: what is wrong with it.
        fix: what the user should do about it.
    """

    def __init__(self, path: str | os.PathLike, problem: str, fix: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}; fix: {fix}")
