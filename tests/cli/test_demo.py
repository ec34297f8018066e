"""The README's first command: `lowmembp-convert --demo` converts, verifies and measures."""

import re

import pytest

from lowmembp_convert.cli import main


def test_demo_converts_verifies_and_saves_memory(capsys):
    assert main(["--demo"]) == 0
    out = capsys.readouterr().out
    assert out.count("verified: max relative output error") == 2
    reductions = [float(v) for v in re.findall(r"MiB \((-\d+\.\d)%\)", out)]
    assert len(reductions) == 2 and all(r < -20 for r in reductions), out


def test_demo_fails_loudly_when_a_part_fails(monkeypatch, capsys):
    """A part that cannot run makes the demo exit non-zero, naming the part and the reason."""
    from lowmembp_convert import demo

    def broken():
        raise ImportError("cannot import name 'CUDAProperties' from 'kernels'")

    monkeypatch.setattr(demo, "DEMO_PARTS", [("broken part", broken), demo.DEMO_PARTS[1]])
    assert main(["--demo"]) == 1
    err = capsys.readouterr().err
    assert "broken part" in err and "CUDAProperties" in err and "1 of 2" in err


def test_optional_import_tells_absent_from_broken(tmp_path, monkeypatch):
    """Not installed -> None; installed but failing to import -> an error naming the cause."""
    from lowmembp_convert.optional import BrokenDependencyError, optional_import

    package = tmp_path / "lowmembp_fake_dependency"
    package.mkdir()
    (package / "__init__.py").write_text("from lowmembp_missing_inner import thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert optional_import("lowmembp_not_installed_anywhere") is None
    with pytest.raises(BrokenDependencyError, match="lowmembp_fake_dependency is installed but fails to import"):
        optional_import("lowmembp_fake_dependency")
