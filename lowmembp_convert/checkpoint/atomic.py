"""All-or-nothing output, stale leftovers of killed runs, and interrupts that never half-write.

Output: written into a temporary directory beside the target, renamed into place when complete. The
temporary directory lives in the target's parent (same filesystem, so the final rename is atomic)
and is named ``.<target>.lowmembp-tmp-<pid>-XXXX``; it also holds a small owner file (pid, host).
Any exception, KeyboardInterrupt included, removes it and leaves the target as it was.

Stale leftovers: a process killed with SIGKILL (or a power cut) cannot clean up, so the next run
for the same target looks for ``.<target>.lowmembp-tmp-*`` directories and removes those whose
owner is certainly gone: the pid in the name is not running on this host (the owner file names the
host, so a directory made on another machine sharing the filesystem is never removed by pid). A
directory without a pid in its name (older versions) is removed only when untouched for a day.
Anything else is reported and left alone.

Interrupts: :func:`interrupt_guard` turns SIGINT/SIGTERM into KeyboardInterrupt and remembers them,
so an interrupt that some library swallowed (a C extension import turning it into ImportError) still
stops the run before anything is committed. Inside :func:`deferred_interrupts` (graph tracing on
fake tensors, where a KeyboardInterrupt can abort the process from C++; the final renames) the
first interrupt is held until the block ends; a second one is raised at once.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TEMP_MARKER = ".lowmembp-tmp-"
OWNER_FILE = ".lowmembp-owner.json"
# a leftover whose name carries no pid (written by an older version) is removed after this long
UNOWNED_MAX_AGE_S = 24 * 3600
_PID_NAME = re.compile(r"(\d+)-[A-Za-z0-9_]+")


def temp_prefix(target: Path) -> str:
    """Name prefix of every temporary directory made for ``target``."""
    return f".{target.name}{TEMP_MARKER}"


def _make_temp_dir(target: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(target)}{os.getpid()}-", dir=target.parent))
    try:
        with open(tmp / OWNER_FILE, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
    except OSError:
        pass  # the name still carries the pid
    return tmp


def remove_tree(path: Path) -> None:
    """Remove ``path`` (a directory or a file), making read-only directories writable on the way."""

    def _retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=_retry)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


@contextmanager
def atomic_output(
    target: str | os.PathLike, replace: bool = False, on_commit: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """Yield a path to write the output at; move it onto ``target`` when the block completes.

    Write a file or a directory at the yielded path (it does not exist yet). On success it replaces
    ``target`` (only if ``replace``; otherwise ``target`` must not exist) and ``on_commit(target)``
    is called with interrupts held, so a caller always knows whether the output is in place. On any
    exception before that, the temporary directory is removed, directories this call created are
    removed, and ``target`` is untouched.
    """
    target = Path(os.path.abspath(os.fspath(target)))
    created = []
    parent = target.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    committed = False
    tmp: Path | None = None
    try:
        for d in reversed(created):
            d.mkdir()
        tmp = _make_temp_dir(target)
        staged = tmp / target.name
        yield staged
        if not os.path.lexists(staged):
            raise RuntimeError(f"{staged}: nothing was written")
        raise_if_interrupted()  # an interrupt some library swallowed still means: write nothing
        with deferred_interrupts():  # both renames, or neither
            moved = None
            if os.path.lexists(target):
                if not replace:
                    raise FileExistsError(f"{target} appeared while the output was written")
                moved = tmp / (target.name + ".replaced")
                os.rename(target, moved)
            try:
                os.rename(staged, target)
            except BaseException:
                if moved is not None:
                    os.rename(moved, target)
                raise
            committed = True
            if on_commit is not None:
                on_commit(target)
    finally:
        if tmp is not None:
            remove_tree(tmp)
        if not committed:
            for d in created:
                remove_tree(d)


@dataclass(frozen=True)
class StaleTemp:
    """A temporary directory of an earlier run for the same target."""

    path: Path
    nbytes: int
    removable: bool
    reason: str  # why it is (or is not) considered abandoned


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def _owner(path: Path) -> dict:
    try:
        with open(path / OWNER_FILE, encoding="utf-8") as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _judge(path: Path, suffix: str) -> tuple[bool, str]:
    match = _PID_NAME.fullmatch(suffix)
    if match is None:
        age = time.time() - path.lstat().st_mtime
        if age > UNOWNED_MAX_AGE_S:
            return True, f"no owner recorded and untouched for {age / 3600:.0f} h"
        return False, "no owner recorded (written by an older version?); remove it by hand if no conversion is running"
    pid = int(match.group(1))
    owner = _owner(path)
    host = owner.get("host")
    if host is not None and host != socket.gethostname():
        return False, f"made by process {pid} on host {host}; remove it by hand if that run is over"
    if host is None and time.time() - path.lstat().st_mtime < 3600:
        return False, f"made by process {pid}, host unknown; remove it by hand if no conversion is running"
    if pid == os.getpid() or _pid_running(pid):
        return False, f"process {pid} is still running (another conversion writing the same ckpt_out?)"
    return True, f"left by process {pid}, which is no longer running (killed?)"


def find_stale_temp_dirs(target: str | os.PathLike) -> list[StaleTemp]:
    """Temporary directories of earlier runs for ``target`` (see the module docstring for the rules)."""
    target = Path(os.path.abspath(os.fspath(target)))
    prefix = temp_prefix(target)
    try:
        entries = sorted(e for e in os.listdir(target.parent) if e.startswith(prefix))
    except OSError:
        return []
    found = []
    for name in entries:
        path = target.parent / name
        if path.is_symlink() or not path.is_dir():
            continue
        removable, reason = _judge(path, name[len(prefix) :])
        found.append(StaleTemp(path, _tree_bytes(path), removable, reason))
    return found


# ---------------------------------------------------------------------------------------------------
# interrupts


class _Guard:
    def __init__(self, log: Callable[[str], None] | None) -> None:
        self.log = log
        self.received: int | None = None
        self.depth = 0  # nesting of deferred_interrupts blocks

    def handler(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.depth > 0 and self.received is None:
            self.received = signum
            if self.log is not None:
                self.log("interrupt received; stopping in a moment (press Ctrl-C again to stop at once)")
            return
        self.received = signum
        raise KeyboardInterrupt(f"signal {signum}")


_active: _Guard | None = None
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def interrupt_guard(log: Callable[[str], None] | None = None) -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (so cleanup runs on ``kill`` too) and are remembered.

    Nested guards and calls from other threads than the main one do nothing (signals are delivered
    to the main thread only).
    """
    global _active
    if _active is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    guard = _Guard(log)
    previous = {s: signal.signal(s, guard.handler) for s in _SIGNALS}
    _active = guard
    try:
        yield
    finally:
        _active = None
        for s, handler in previous.items():
            signal.signal(s, handler)


# the former name: SIGTERM as KeyboardInterrupt
sigterm_as_interrupt = interrupt_guard


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if an interrupt arrived under the active guard (even if swallowed)."""
    if _active is not None and _active.received is not None:
        raise KeyboardInterrupt(f"signal {_active.received}")


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold the first interrupt until the block ends, then raise it (a second one raises at once)."""
    guard = _active
    if guard is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    guard.depth += 1
    try:
        yield
    finally:
        guard.depth -= 1
    if guard.depth == 0:
        raise_if_interrupted()
