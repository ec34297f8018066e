"""The conversion report, one type for ``convert()`` and for checkpoints (``convert_checkpoint``, the CLI).

What changed, what was skipped and why, bytes saved when measured; for a checkpoint also the files
read and written (:class:`CheckpointSummary`). ``str(report)`` is the human-readable form (the
CLI's output), ``report.to_json()`` the machine-readable one (the CLI's ``--json``).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .plan import Plan


def _relative(consumer: str, norm: str) -> str:
    """The consumer's name relative to the norm's parent ("self_attn.q_proj" for a decoder layer's
    input norm), so the same leaf name in two places is never ambiguous."""
    parent = norm.rpartition(".")[0]
    if parent and consumer.startswith(parent + "."):
        return consumer[len(parent) + 1 :]
    return consumer


def _copy_mark(shares_output: bool, upcast_inside: bool) -> str:
    if shares_output:
        return ""
    return " (upcast inside)" if upcast_inside else " (copy)"


@dataclass
class CheckpointSummary:
    """What a checkpoint conversion read, changed and wrote (``Report.checkpoint``)."""

    input: str
    output: str | None  # None for a dry run without ckpt_out
    dry_run: bool
    kind: str  # "transformers", "timm" or "state_dict"
    format: str  # "safetensors", "torch"...
    architecture: str
    shards: list[str]
    index: str | None
    tensors: int
    bytes: int
    key_rule: str  # how state-dict keys map to the model's parameter names
    norms: list[dict[str, Any]]  # per norm: module, action, consumers, reason, already_folded
    folded: list[str]
    already_folded: list[str]
    untied: list[str]
    changed_tensors: list[str]
    added_tensors: list[str]
    carried_files: list[str]
    skipped_files: list[str]
    unconverted_state_dicts: list[str]
    record: dict[str, Any]  # the conversion record written into the output's metadata
    stale_temp_dirs: list[dict[str, Any]] = field(default_factory=list)
    nothing_to_fold: str | None = None  # why a post-norm model has nothing to fold
    written: bool = False
    seconds: float = 0.0
    verify: dict[str, Any] | None = None

    def lines(self, model: str) -> list[str]:
        lines = [
            f"{'plan for' if self.dry_run else 'converted'} {self.input}",
            f"  model: {model}; {self.format}, {len(self.shards)} shard(s), {self.bytes / 2**30:.2f} GiB",
        ]
        width = max((len(s["module"]) for s in self.norms), default=0)
        for site in self.norms:
            action = "folded" if site["action"] == "fold" and site["already_folded"] else site["action"]
            detail = f"-> {', '.join(site['consumers'])}" if site["action"] == "fold" else site["reason"]
            lines.append(f"  {action:<12} {site['module']:<{width}}  {detail}")
        lines.append(
            f"  {len(self.folded)} norm(s) folded now, {len(self.already_folded)} already folded; "
            f"{len(self.changed_tensors)} tensor(s) changed, {len(self.added_tensors)} added"
        )
        if self.nothing_to_fold and (self.dry_run or self.written):
            lines.append(f"  {self.nothing_to_fold}")  # a run that writes nothing says it on stderr
        if self.untied:
            lines.append(f"  untied from the input embedding: {', '.join(self.untied)}")
        if self.skipped_files:
            lines.append(f"  not carried over (unconverted weights): {', '.join(self.skipped_files)}")
        if self.unconverted_state_dicts:
            names = ", ".join(repr(k) for k in self.unconverted_state_dicts)
            lines.append(f"  carried over unconverted (another state dict in the file): {names}")
        if self.verify:
            err = self.verify.get("max_rel_error")
            rtol = self.verify.get("rtol")
            detail = f"max relative error {err:.3g} (rtol {rtol:.3g})" if err is not None else self.verify["reason"]
            lines.append(f"  verify: {self.verify['status']}, {detail}")
        if self.dry_run:
            where = "(nothing written: --dry-run)"
        elif not self.written:
            where = "(nothing written: nothing to fold; --force-copy writes an unchanged copy)"
        else:
            where = f"in {self.seconds:.1f} s"
        lines.append(f"  output: {self.output or '-'} {where}")
        return lines


@dataclass
class Report:
    """Printable summary of one conversion: ``print(model.lowmembp_report)`` after ``convert()``, or
    what ``convert_checkpoint`` returns (then ``checkpoint`` is set)."""

    model: str
    plan: Plan
    notes: list[str] = field(default_factory=list)
    bytes_before: int | None = None  # bytes saved for backward in one step, before conversion
    bytes_after: int | None = None
    trainable_before: int | None = None  # trainable parameter tensors before / after
    trainable_after: int | None = None
    previous: Report | None = None  # the report of an earlier convert() of the same model
    checkpoint: CheckpointSummary | None = None  # set for a checkpoint conversion

    @property
    def converted_norms(self) -> int:
        return sum(s.action != "skip" for s in self.plan.norms)

    @property
    def converted_activations(self) -> int:
        return sum(s.action == "convert" for s in self.plan.activations)

    @property
    def converted_adapters(self) -> int:
        return sum(s.action == "share" for s in self.plan.adapters)

    @property
    def converted_loss_heads(self) -> int:
        return sum(s.action in ("exact", "fused") for s in self.plan.loss_heads)

    @property
    def changed(self) -> bool:
        from .rewrites.registry import STAGES

        return any(stage.converted(self.plan) for stage in STAGES)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        if self.checkpoint is not None:  # the plan's notes are in to_json()
            return "\n".join(self.checkpoint.lines(self.model))
        from .rewrites.registry import STAGES

        plan = self.plan
        actions = Counter(s.action for s in plan.norms)
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
        approx = [s.module for s in plan.activations if s.action == "convert" and s.option == "approx"]
        folded = actions["fold"] - sum(s.already_folded for s in plan.norms if s.action == "fold")
        lines.append(
            "  gradients: "
            + (f"APPROXIMATE (2-bit, activations='approx') at {len(approx)} site(s), e.g. {approx[0]}" if approx
               else "exact (the stock ones up to rounding)")
            + (f"; parameters: {folded} norm affine(s) folded into consumers (norms='fold' reparameterizes)" if folded
               else "; parameters: the stock ones")
        )  # fmt: skip
        for stage in STAGES:
            lines += stage.summary(plan)
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
            lines.append(
                "  nothing to convert: no GELU/SiLU module, no foldable LayerNorm/RMSNorm "
                "and no upcast PEFT adapter input"
            )
        shared = {f"{a.module}.lora_A.{n}" for a in plan.adapters if a.action == "share" for n in a.adapters}
        if plan.norms:
            width = max(len(s.module) for s in plan.norms)
            lines.append("  norm sites:")
            for s in plan.norms:
                consumers = ", ".join(
                    _relative(c.module, s.module) + _copy_mark(c.shares_output, c.module in shared) for c in s.consumers
                )
                detail = f"{s.kind} -> {consumers}" if consumers else s.kind
                lines.append(f"    {s.module:<{width}}  {s.action:<11}  {detail}")
                if s.reason:
                    lines.append(f"    {'':<{width}}  {'':<11}  ({s.reason})")
            if any(not c.shares_output and c.module not in shared for s in plan.norms for c in s.consumers):
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
        if plan.adapters:
            from .rewrites.planner import describe

            width = max(len(a.module) for a in plan.adapters)
            lines.append("  PEFT adapter sites (bytes lora_A keeps for backward on the example batch):")
            for a in plan.adapters:
                lines.append(f"    {a.module:<{width}}  {a.action:<5}  {describe(a.estimate) if a.estimate else ''}")
                if a.reason:
                    lines.append(f"    {'':<{width}}  {'':<5}  ({a.reason})")
        for note in plan.notes + self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)
