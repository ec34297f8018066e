"""The README's first command: `lowmembp-convert --demo` converts, verifies and measures."""

import re

from lowmembp_convert.cli import main


def test_demo_converts_verifies_and_saves_memory(capsys):
    assert main(["--demo"]) == 0
    out = capsys.readouterr().out
    assert out.count("verified: max relative output error") == 2
    reductions = [float(v) for v in re.findall(r"MiB \((-\d+\.\d)%\)", out)]
    assert len(reductions) == 2 and all(r < -20 for r in reductions), out
