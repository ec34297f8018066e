"""Interrupts and leftovers: exit 130 means nothing was written, an interrupt after the output is
complete exits 0, interrupts are held while torch imports or traces (where one can abort the process)
and are not lost when a library swallows them; temporary directories of killed runs are removed."""

from __future__ import annotations

import importlib.abc
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from cli_helpers import cli, leftovers, tree_digest

import lowmembp_convert.checkpoint as checkpoint_package
from lowmembp_convert import cli as cli_module
from lowmembp_convert.checkpoint import atomic, conversion, streaming
from lowmembp_convert.checkpoint.atomic import (
    OWNER_FILE,
    atomic_output,
    find_stale_temp_dirs,
    interrupt_guard,
    temp_prefix,
)

CONVERSION = "lowmembp_convert.checkpoint.conversion"


class _InterruptingImport(importlib.abc.MetaPathFinder):
    """Interrupts the import of one module: by raising KeyboardInterrupt, or by a real SIGINT (after
    which the import goes on, as it would while the signal is held)."""

    def __init__(self, name: str, raise_now: bool) -> None:
        self.name, self.raise_now, self.hits = name, raise_now, 0

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name:
            self.hits += 1
            if self.raise_now:
                raise KeyboardInterrupt
            signal.raise_signal(signal.SIGINT)
        return None


@pytest.mark.parametrize("raise_now", [True, False], ids=["raised", "signal-held"])
def test_interrupt_during_heavy_imports(raise_now, saved_llama, tmp_path, capsys, monkeypatch):
    _, src = saved_llama
    monkeypatch.setattr(checkpoint_package, "conversion", sys.modules[CONVERSION])  # restored afterwards
    monkeypatch.delitem(sys.modules, CONVERSION)
    finder = _InterruptingImport(CONVERSION, raise_now)
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    code, _, err = cli([src, tmp_path / "out"], capsys)
    assert finder.hits == 1
    assert code == 130
    lines = err.strip().splitlines()
    assert (
        lines[-1]
        == f"lowmembp-convert: error: {tmp_path / 'out'}: interrupted; nothing was written and ckpt_in is unchanged"
    )
    assert len(lines) == (1 if raise_now else 2), err  # held: one note that it was received
    assert os.listdir(tmp_path) == []


def test_interrupt_while_tracing_is_held_until_the_trace_ends(saved_llama, tmp_path, capsys, monkeypatch):
    """A KeyboardInterrupt inside torch.export's fake-tensor dispatch can abort the process from C++;
    so the planner runs to its end and the interrupt is raised after it."""
    _, src = saved_llama
    finished = []
    real = conversion._default_planner

    def planner(model, config):
        signal.raise_signal(signal.SIGINT)
        plan = real(model, config)
        finished.append(True)
        return plan

    monkeypatch.setattr(conversion, "_default_planner", planner)
    code, _, err = cli([src, tmp_path / "out", "--quiet"], capsys)
    assert finished == [True] and code == 130
    assert "interrupt received; stopping in a moment" in err and "nothing was written" in err
    assert os.listdir(tmp_path) == []


def test_swallowed_interrupt_still_writes_nothing(saved_llama, tmp_path, capsys, monkeypatch):
    """A library that catches the KeyboardInterrupt (torch's import of triton turns it into an
    ImportError) must not let the run commit its output."""
    _, src = saved_llama
    digest = tree_digest(src)
    real = streaming.write_safetensors

    def swallowing(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "write_safetensors", swallowing)
    out = tmp_path / "out"
    code, _, err = cli([src, out, "--quiet"], capsys)
    assert code == 130, err
    assert not out.exists() and leftovers(tmp_path) == []
    assert tree_digest(src) == digest


def test_interrupt_after_the_output_is_complete_exits_0(saved_llama, tmp_path, capsys, monkeypatch):
    _, src = saved_llama

    def interrupted(report, as_json):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "print_report", interrupted)
    out = tmp_path / "out"
    code, _, err = cli([src, out, "--quiet"], capsys)
    assert code == 0
    assert err.strip() == f"lowmembp-convert: interrupted after {out} was complete; the output is valid"
    assert (out / "config.json").exists() and leftovers(tmp_path) == []


def test_replacing_is_never_split_by_an_interrupt(tmp_path, monkeypatch):
    """--force moves the old output aside, then the new one in: an interrupt between the two renames
    is held, so the target is never missing; the caller learns the output is in place."""
    target = tmp_path / "result"
    target.mkdir()
    (target / "a").write_text("old")
    real_rename = os.rename
    renames = []

    def rename(src, dst):
        renames.append(dst)
        if len(renames) == 1:
            signal.raise_signal(signal.SIGINT)  # after the old output was moved aside
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    committed = []
    with pytest.raises(KeyboardInterrupt), interrupt_guard():
        with atomic_output(target, replace=True, on_commit=committed.append) as staged:
            staged.mkdir()
            (staged / "a").write_text("new")
    assert len(renames) == 2 and committed == [target]
    assert (target / "a").read_text() == "new" and leftovers(tmp_path) == []


def test_temp_dir_names_its_owner(tmp_path):
    target = tmp_path / "out.safetensors"
    with atomic_output(target) as staged:
        (tmp,) = leftovers(tmp_path)
        assert tmp.startswith(f"{temp_prefix(target)}{os.getpid()}-")
        owner = json.loads((staged.parent / OWNER_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        assert find_stale_temp_dirs(target)[0].removable is False  # this process is alive
        staged.write_bytes(b"x")
    assert leftovers(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(target, pid: int | None, host: str | None = None, age_s: float = 0.0, size: int = 4096):
    """A temporary directory as a run killed with SIGKILL leaves it (pid None: an older version's name)."""
    name = f"{temp_prefix(target)}{pid}-k1ll3d" if pid is not None else f"{temp_prefix(target)}k1ll3d"
    path = target.parent / name
    (path / target.name).mkdir(parents=True)
    (path / target.name / "model-00001-of-00002.safetensors").write_bytes(b"\0" * size)
    if host is not None:
        (path / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": host}))
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


def test_stale_temp_dir_of_a_killed_run_is_removed(saved_llama, tmp_path, capsys):
    _, src = saved_llama
    out = tmp_path / "out"
    stale = _leftover(out, _dead_pid(), socket.gethostname(), size=1 << 20)

    code, _, err = cli([src, out, "--dry-run"], capsys)  # a dry run only says what it would do
    assert code == 0 and stale.exists()
    assert f"would remove stale temporary directory {stale} (1.0 MiB): left by process" in err

    code, stdout, err = cli([src, out, "--json"], capsys)
    assert code == 0, err
    assert not stale.exists() and leftovers(tmp_path) == []
    assert f"lowmembp-convert: removed stale temporary directory {stale} (1.0 MiB)" in err
    assert "which is no longer running" in err
    (entry,) = json.loads(stdout)["checkpoint"]["stale_temp_dirs"]
    assert entry["path"] == str(stale) and entry["action"] == "removed" and entry["bytes"] >= 1 << 20


def test_doubtful_temp_dirs_are_reported_and_kept(tmp_path):
    target = tmp_path / "out"
    alive = _leftover(target, os.getpid(), socket.gethostname())
    other_host = _leftover(target, _dead_pid(), "another-machine")
    young_unowned = _leftover(target, None)
    found = {s.path: s for s in find_stale_temp_dirs(target)}
    assert set(found) == {alive, other_host, young_unowned}
    assert not any(s.removable for s in found.values())
    assert "is still running" in found[alive].reason
    assert "on host another-machine" in found[other_host].reason
    assert "no owner recorded" in found[young_unowned].reason
    assert find_stale_temp_dirs(tmp_path / "other-target") == []  # only the same ckpt_out's


def test_old_unowned_temp_dir_is_removable(tmp_path):
    target = tmp_path / "out"
    old = _leftover(target, None, age_s=2 * 24 * 3600)
    (stale,) = find_stale_temp_dirs(target)
    assert stale.path == old and stale.removable and "untouched for 48 h" in stale.reason
    assert conversion.clear_stale_temp_dirs(target, False, None)[0]["action"] == "removed"
    assert not old.exists()
