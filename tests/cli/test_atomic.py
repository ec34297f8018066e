"""Nothing half-written: interrupts and failures leave ckpt_in untouched and no ckpt_out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from cli_helpers import cli, leftovers, tree_digest

from lowmembp_convert.checkpoint import safetensors_file, streaming
from lowmembp_convert.checkpoint.atomic import atomic_output


def test_keyboard_interrupt_mid_conversion(saved_llama, tmp_path, capsys, monkeypatch):
    _, src = saved_llama
    digest = tree_digest(src)
    real = safetensors_file.write_safetensors
    calls = []

    def interrupted(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # two shards are complete, the third is being written
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(streaming, "write_safetensors", interrupted)
    out = tmp_path / "sub" / "out"
    code, _, err = cli([src, out, "--quiet"], capsys)
    assert code == 130
    assert "interrupted; nothing was written" in err
    assert not out.exists() and not out.parent.exists()  # the parent it created is gone too
    assert leftovers(tmp_path) == []
    assert tree_digest(src) == digest


@pytest.mark.slow  # a real subprocess killed mid-write
def test_sigterm_cleans_up(saved_llama, tmp_path):
    """A real process killed with SIGTERM while writing removes its temporary directory."""
    _, src = saved_llama
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import sys, time
        from lowmembp_convert.checkpoint import conversion, streaming
        from lowmembp_convert.plan import Plan
        def slow(*args, **kwargs):
            print("writing", flush=True)
            time.sleep(60)
        streaming.write_safetensors = slow
        conversion._default_planner = lambda model, config: Plan()  # no graph capture: start writing soon
        from lowmembp_convert.cli import main
        sys.exit(main([{str(src)!r}, {str(out)!r}, "--quiet", "--force-copy"]))  # an empty plan folds nothing
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert leftovers(tmp_path), "the temporary directory should exist while writing"
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert not out.exists() and leftovers(tmp_path) == []


def test_atomic_output_commits_and_replaces(tmp_path):
    target = tmp_path / "result"
    with atomic_output(target) as staged:
        staged.mkdir()
        (staged / "a").write_text("1")
        assert not target.exists()
    assert (target / "a").read_text() == "1"
    with atomic_output(target, replace=True) as staged:
        staged.write_text("now a file")
    assert target.read_text() == "now a file"
    assert leftovers(tmp_path) == []


def test_atomic_output_exception_leaves_target(tmp_path):
    target = tmp_path / "result.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target, replace=True) as staged:
            staged.write_text("partial")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_output_refuses_a_target_that_appeared(tmp_path):
    target = tmp_path / "result"
    with pytest.raises(FileExistsError):
        with atomic_output(target) as staged:
            staged.write_text("new")
            target.write_text("someone else")
            time.sleep(0)
    assert target.read_text() == "someone else"
    assert leftovers(tmp_path) == []
