"""The pipeline runs whatever the registry lists: a new rewrite is one Stage and one entry.

A toy stage (it tags every nn.Linear it is shown) is added to ``registry.STAGES`` and must be found,
planned on the captured graph, applied and reported by ``convert()`` with no other change; and the
stages really listed must each be reached (an empty registry converts nothing).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lowmembp_convert import convert
from lowmembp_convert.rewrites import registry
from lowmembp_convert.rewrites.pipeline import Stage


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.norm(x))


def _toy_stage(calls: list[str]) -> Stage:
    def find(ctx):
        calls.append("find")
        ctx.found["toy"] = [n for n, m in ctx.model.named_modules() if isinstance(m, nn.Linear)]
        return True  # asks for the graph

    def plan(ctx):
        calls.append(f"plan with graph={ctx.capture is not None}")
        ctx.plan.notes.append(f"toy: would tag {', '.join(ctx.found['toy'])}")

    def apply(model, plan, options):
        calls.append("apply")
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.lowmembp_toy = True
        return ["toy: tagged fc"]

    return Stage(
        name="toy",
        find=find,
        plan=plan,
        apply=apply,
        summary=lambda plan: ["  toy: 1 Linear tagged"],
        converted=lambda plan: 1,
    )


def test_a_registered_stage_is_found_planned_applied_and_reported(monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(registry, "STAGES", (*registry.STAGES, _toy_stage(calls)))
    model = convert(_Toy(), example_inputs=((torch.randn(2, 8),), {}))
    assert calls == ["find", "plan with graph=True", "apply"]
    assert getattr(model.fc, "lowmembp_toy", False)
    report = str(model.lowmembp_report)
    assert "  toy: 1 Linear tagged" in report and "toy: tagged fc" in report and "toy: would tag fc" in report


def test_an_empty_registry_converts_nothing(monkeypatch) -> None:
    monkeypatch.setattr(registry, "STAGES", ())
    model = convert(_Toy(), example_inputs=((torch.randn(2, 8),), {}))
    assert type(model.norm) is nn.LayerNorm and not model.lowmembp_report.changed
    assert model.lowmembp_report.plan.capture.startswith("not needed")
