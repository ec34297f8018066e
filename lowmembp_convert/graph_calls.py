"""Where a module's calls sit in the captured graph: their nodes, inputs and outputs.

``torch.export`` tags every node with the stack of modules that ran it (``nn_module_stack``), so one
call of a module is the set of nodes carrying that call's key. Its inputs are the tensors it reads
from outside (parameters and buffers aside), its outputs the tensors read outside it, less no-op
aliases of an input (``x.float()`` on a float32 x is x itself, which the caller keeps using).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx


def module_calls(graph: fx.Graph, names: set[str]) -> list[tuple[set[fx.Node], list[fx.Node]]]:
    """Each call of the module known under ``names``: (its nodes, its output tensors)."""
    regions: dict[str, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        for key, (path, _type) in (node.meta.get("nn_module_stack") or {}).items():
            if path in names:
                regions[key].append(node)
    calls = []
    for nodes in regions.values():
        inside = set(nodes)
        outputs = [
            n
            for n in nodes
            if isinstance(n.meta.get("val"), torch.Tensor)
            and any(u not in inside for u in n.users)
            and not _is_input_alias(n, inside)
        ]
        calls.append((inside, outputs))
    return calls


def call_inputs(region: set[fx.Node], state: set[fx.Node]) -> set[fx.Node]:
    """Tensors a call reads from outside itself, other than parameters and buffers."""
    found = set()
    for node in region:
        for arg in node.all_input_nodes:
            if arg not in region and arg not in state and isinstance(arg.meta.get("val"), torch.Tensor):
                found.add(arg)
    return found


_NO_OP_TARGETS = {"to", "_to_copy", "alias", "detach", "contiguous", "type_as"}


def is_no_op_alias(node: fx.Node) -> bool:
    """A same-dtype ``to``/``alias``/``detach``-style node: the very tensor of its input."""
    name = getattr(node.target, "__name__", "").split(".")[0]
    src = node.args[0] if node.args else None
    if node.op != "call_function" or name not in _NO_OP_TARGETS or not isinstance(src, fx.Node):
        return False
    out, inp = node.meta.get("val"), src.meta.get("val")
    return isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor) and out.dtype == inp.dtype


def _is_input_alias(node: fx.Node, inside: set[fx.Node]) -> bool:
    """True for a same-dtype ``x.to(...)``-style no-op on the module's input (e.g. ``x.float()`` in an
    fp32 model), which the caller may keep using as its residual: it is not the norm's output."""
    while node in inside:
        name = getattr(node.target, "__name__", "").split(".")[0]
        src = node.args[0] if node.args else None
        if name not in _NO_OP_TARGETS or not isinstance(src, fx.Node):
            return False
        out, inp = node.meta.get("val"), src.meta.get("val")
        if not (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor)) or out.dtype != inp.dtype:
            return False
        node = src
    return True
