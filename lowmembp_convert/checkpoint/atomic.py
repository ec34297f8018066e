"""All-or-nothing output: write into a temporary directory beside the target, rename when complete.

The temporary directory lives in the target's parent (same filesystem, so the final rename is
atomic) and is named ``.<target>.lowmembp-tmp-XXXX`` so a leftover from a killed process is easy to
recognise. Any exception, KeyboardInterrupt included, removes it and leaves the target as it was.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_MARKER = ".lowmembp-tmp-"


@contextmanager
def atomic_output(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a path to write the output at; move it onto ``target`` when the block completes.

    Write a file or a directory at the yielded path (it does not exist yet). On success it replaces
    ``target`` (only if ``replace``; otherwise ``target`` must not exist). On any exception the
    temporary directory is removed, directories this call created are removed, and ``target`` is
    untouched.
    """
    target = Path(os.path.abspath(os.fspath(target)))
    created = []
    parent = target.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for d in reversed(created):
        d.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TEMP_MARKER}", dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if not os.path.lexists(staged):
            raise RuntimeError(f"{staged}: nothing was written")
        if os.path.lexists(target):
            if not replace:
                raise FileExistsError(f"{target} appeared while the output was written")
            os.rename(target, tmp / (target.name + ".replaced"))
        os.rename(staged, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:
            shutil.rmtree(d, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the duration, so cleanup runs on ``kill`` too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
