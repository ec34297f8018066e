"""The conversion report: what changed, what was skipped and why, and bytes saved when measured."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field

from .plan import Plan


def _relative(consumer: str, norm: str) -> str:
    """The consumer's name relative to the norm's parent ("self_attn.q_proj" for a decoder layer's
    input norm), so the same leaf name in two places is never ambiguous."""
    parent = norm.rpartition(".")[0]
    if parent and consumer.startswith(parent + "."):
        return consumer[len(parent) + 1 :]
    return consumer


@dataclass
class Report:
    """Printable summary of one ``convert()`` call (``print(model.lowmembp_report)``)."""

    model: str
    plan: Plan
    notes: list[str] = field(default_factory=list)
    bytes_before: int | None = None  # bytes saved for backward in one step, before conversion
    bytes_after: int | None = None
    trainable_before: int | None = None  # trainable parameter tensors before / after
    trainable_after: int | None = None
    previous: Report | None = None  # the report of an earlier convert() of the same model

    @property
    def converted_norms(self) -> int:
        return sum(s.action != "skip" for s in self.plan.norms)

    @property
    def converted_activations(self) -> int:
        return sum(s.action == "convert" for s in self.plan.activations)

    @property
    def changed(self) -> bool:
        return bool(self.converted_norms or self.converted_activations)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        plan = self.plan
        actions = Counter(s.action for s in plan.norms)
        kinds = Counter(f"{s.kind} {s.option}" for s in plan.activations if s.action == "convert")
        lines = []
        if self.previous is not None:
            lines += [str(self.previous), ""]
            lines.append(f"lowmembp_convert report for {self.model} (converted again)")
        else:
            lines.append(f"lowmembp_convert report for {self.model}")
        if plan.capture.startswith("failed"):
            lines.append(f"  WARNING: graph capture {plan.capture}")
            lines.append(
                "  -> no norm could be converted; pass example_inputs=((args...), {kwargs...}) that the model accepts"
            )
        else:
            lines.append(f"  graph capture: {plan.capture or 'n/a'}")
        lines.append(
            f"  activations: {self.converted_activations} converted"
            + (f" ({', '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))})" if kinds else "")
            + f", {sum(s.action == 'skip' for s in plan.activations)} skipped"
        )
        lines.append(
            f"  norms: {actions['fold']} folded, {actions['keep_affine']} memory-sharing with own affine, "
            f"{actions['skip']} skipped"
        )
        if self.bytes_before is not None and self.bytes_after is not None and self.bytes_before:
            saved = 1 - self.bytes_after / self.bytes_before
            lines.append(
                f"  saved for backward (one step, example batch): {self.bytes_before / 2**20:.2f} MiB -> "
                f"{self.bytes_after / 2**20:.2f} MiB ({-saved:+.1%})"
            )
        if self.trainable_before is not None and self.trainable_after != self.trainable_before:
            folded = self.trainable_before - (self.trainable_after or 0)
            lines.append(
                f"  trainable parameter tensors: {self.trainable_before} -> {self.trainable_after} "
                f"({folded} norm affine tensor(s) folded into trainable consumers, which now carry them)"
            )
        if not self.changed:
            lines.append("  nothing to convert: no GELU/SiLU module and no foldable LayerNorm/RMSNorm found")
        if plan.norms:
            width = max(len(s.module) for s in plan.norms)
            lines.append("  norm sites:")
            for s in plan.norms:
                consumers = ", ".join(
                    _relative(c.module, s.module) + ("" if c.shares_output else " (copy)") for c in s.consumers
                )
                detail = f"{s.kind} -> {consumers}" if consumers else s.kind
                lines.append(f"    {s.module:<{width}}  {s.action:<11}  {detail}")
                if s.reason:
                    lines.append(f"    {'':<{width}}  {'':<11}  ({s.reason})")
            if any(not c.shares_output for s in plan.norms for c in s.consumers):
                lines.append(
                    "    (copy): that consumer receives a copy of the norm output (a cast, a pad...), so it keeps "
                    "a tensor of its own for backward"
                )
        planned = [a for a in plan.activations if a.estimate or a.action == "skip"]
        if planned:
            from .rewrites.planner import describe

            width = max(len(a.module) for a in planned)
            lines.append("  activation sites (bytes kept for backward on the example batch):")
            for a in planned:
                choice = a.option if a.action == "convert" else "stock"
                lines.append(f"    {a.module:<{width}}  {choice:<9}  {describe(a.estimate) if a.estimate else ''}")
                if a.reason:
                    lines.append(f"    {'':<{width}}  {'':<9}  ({a.reason})")
        for note in plan.notes + self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)
