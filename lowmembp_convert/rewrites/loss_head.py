"""Rewrite: the loss head of transformers' causal and masked LMs (``lm_head`` + ``loss_function``).

Sites: every module with a transformers ``loss_function`` that is the library's ``ForCausalLM`` or
``ForMaskedLM`` loss and an output embedding (``get_output_embeddings()``) that is a plain
``nn.Linear`` (tied to the input embedding or not). The captured graph (when there is one) shows
what the model does to the head's output before returning it as its logits: nothing, or a chain of
elementwise ops with constant operands (Gemma 2/3's ``final_logit_softcapping``: div, tanh, mul),
which becomes the site's recipe; anything else leaves the site stock.

Options per site, with what each keeps for backward and its head GEMMs (stock: three):
- stock: the float32 log-probabilities, rows x vocabulary;
- exact (the default): nothing of rows x vocabulary; backward recomputes the logits in chunks of
  rows (one more head GEMM). Exact forward (the loss up to the order of a float32 sum, the logits
  untouched), exact backward, no reparameterization;
- fused (only when asked, ``loss_head="fused"``; needs the graph, to know the recipe): the float32
  dh (rows x hidden) and dW (vocab x hidden when the head is trainable), no extra GEMM, and no logits
  while training (a placeholder that raises on use). Fewer bytes than stock from about ``hidden``
  rows per step; the report gives the estimates of all three and that break-even.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture import Capture
from ..config import ConvertConfig, loss_head_mode
from ..nn.loss_head import ExactHeadLoss, install
from ..ops.fused_linear_cross_entropy import kept_dtype
from ..ops.linear_cross_entropy import chunk_rows_for
from ..plan import LossHeadSite, Plan
from .pipeline import ApplyOptions, Context, Stage

_VIEWS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.alias.default}


def _stock_losses() -> dict[object, str]:
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except Exception:  # transformers missing or without its loss table: nothing to rewrite
        return {}
    return {LOSS_MAPPING[k]: k for k in ("ForCausalLM", "ForMaskedLM") if k in LOSS_MAPPING}


def find_loss_heads(model: nn.Module, plan: Plan) -> list[tuple[nn.Module, nn.Linear | None]]:
    """Modules whose loss function is transformers' causal/masked LM loss, with their head."""
    losses = _stock_losses()
    found = []
    for fqn, module in model.named_modules():
        get_head = getattr(module, "get_output_embeddings", None)
        if not callable(get_head) or "loss_function" not in dir(type(module)):
            continue
        try:
            loss = module.loss_function
            head = get_head()
        except Exception:
            continue
        if isinstance(loss, ExactHeadLoss) or head is None:
            continue
        kind = losses.get(loss)
        if kind is None:
            continue
        head_fqn = next((n for n, m in model.named_modules() if m is head), "")
        site = LossHeadSite(module=fqn, head=head_fqn, loss=kind)
        if not _calls_loss_function(module):
            site.reason = (
                f"left stock: {type(module).__name__}.forward computes its loss without self.loss_function "
                "(nothing to hand over to)"
            )
        elif type(head) is not nn.Linear:
            site.reason = (
                f"left stock: the output layer {head_fqn or '?'} is {type(head).__name__}, not a plain nn.Linear "
                "(a PEFT-wrapped lm_head keeps its own path)"
            )
        elif getattr(head, "_forward_hooks", None) or getattr(head, "_forward_pre_hooks", None):
            site.reason = f"left stock: {head_fqn} has hooks registered on it"
        else:
            site.action = "exact"
        plan.loss_heads.append(site)
        found.append((module, head))
    return found


def _calls_loss_function(module: nn.Module) -> bool:
    """Whether the model's forward calls ``self.loss_function`` (transformers' causal LMs do; BERT's
    masked LM builds a CrossEntropyLoss of its own)."""
    import inspect

    try:
        return "self.loss_function(" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


def _op_name(target) -> str:
    return str(target)  # "aten.div.Tensor": resolvable again through torch.ops


def _head_to_logits(graph: fx.Graph, weight_placeholder: str) -> tuple[list | None, str]:
    """The elementwise ops between the head's output and the logits the model returns, as a recipe
    ``[(op name, args with "$x" for the running tensor, kwargs), ...]`` ([] when the head's output is
    returned itself, views aside), or (None, why not) when the path is not a chain of elementwise ops
    with constant operands (Gemma 2's softcapping is: div, tanh, mul)."""
    linear = [
        n
        for n in graph.nodes
        if n.op == "call_function"
        and n.target is torch.ops.aten.linear.default
        and any(getattr(a, "name", None) == weight_placeholder for a in n.args)
    ]
    if len(linear) != 1:
        return None, "the output layer is not called once in the captured forward"
    (output,) = [n for n in graph.nodes if n.op == "output"]
    outputs = set(output.all_input_nodes)
    node, recipe = linear[0], []
    while node not in outputs:
        users = [u for u in node.users if u.op == "call_function"]
        if len(users) != 1:
            return None, "the logits have several readers before the model returns them"
        user = users[0]
        if user.target not in _VIEWS:
            others = [a for a in (*user.args, *user.kwargs.values()) if a is not node]
            pointwise = torch.Tag.pointwise in getattr(user.target, "tags", ())
            if not pointwise or any(isinstance(a, fx.Node) for a in others) or len(recipe) >= 8:
                return None, f"the logits pass through {_op_name(user.target)} after the output layer"
            args = ["$x" if a is node else a for a in user.args]
            recipe.append((_op_name(user.target), args, dict(user.kwargs)))
        node = user
    return recipe, ""


def plan_loss_heads(
    model: nn.Module, plan: Plan, capture: Capture | None, example_rows: int | None, mode: str = "exact"
) -> None:
    """Check each site against the graph, fill in the estimates and choose: exact, or fused when
    ``mode`` is "fused" and the graph shows what lies between the head and the loss."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    placeholder_of = {v: k for k, v in (capture.param_of_placeholder.items() if capture else ())}
    for site in plan.loss_heads:
        if site.action != "exact":
            continue
        head = model.get_submodule(site.head)
        proven = False  # the graph shows the path from the head to the returned logits
        if capture is not None:
            weight_name = names.get(id(head.weight))
            placeholder = placeholder_of.get(weight_name)
            recipe, why = _head_to_logits(capture.graph, placeholder) if placeholder else ([], "")
            if recipe is None:
                site.action = "skip"
                site.reason = f"left stock: {why}, so the loss does not receive a function of the head's output alone"
                continue
            site.recipe, proven = recipe, placeholder is not None
        _estimate(site, head, example_rows)
        between = " then " + ", ".join(op.split(".")[1] for op, _a, _k in site.recipe) if site.recipe else ""
        if mode == "fused" and proven:
            site.action = "fused"
            site.reason = (
                "fused (asked): while training, no logits (a placeholder that raises on use); the loss computes "
                f"{site.head}'s GEMM{between} and its gradients chunk by chunk in one pass, keeping {site.fused_keeps} "
                "for backward; head GEMMs as stock"
            )
            continue
        asked = (
            "fused was asked, but without the head in a captured graph the ops between the head and the loss are "
            "unknown: exact instead; "
            if mode == "fused"
            else ""
        )
        site.reason = (
            f"exact: {asked}keeps nothing of rows x vocabulary (stock keeps the float32 log-probabilities, 4 bytes per "
            f"row and vocabulary entry); backward recomputes {site.head}'s GEMM{between} in chunks of rows (one more "
            "head GEMM: head FLOPs x 4/3)"
        )


def _estimate(site: LossHeadSite, head: nn.Linear, example_rows: int | None) -> None:
    """Bytes each option keeps for backward (example batch), extra head GEMMs, chunk rows and the rows
    per step from which the fused head keeps fewer bytes than stock."""
    vocab, hidden = head.out_features, head.in_features
    trainable = head.weight.requires_grad
    bias = head.bias is not None and head.bias.requires_grad
    kept = kept_dtype(head.weight.dtype)  # the fused head keeps its gradients in this dtype
    size = torch.empty((), dtype=kept).element_size()
    fixed = size * (vocab * hidden * trainable + vocab * bias)
    site.extra_head_gemms = {"stock": 0, "exact": 1, "fused": 0}
    keeps = ["dh [rows, hidden]"] + ["dW [vocab, hidden]"] * trainable + ["db [vocab]"] * bias
    site.fused_keeps = f"{str(kept).removeprefix('torch.')} " + ", ".join(keeps)
    site.fused_keeps += "" if trainable else " (frozen head: no dW)"
    # stock keeps 4 * rows * vocab, fused size * rows * hidden + fixed: fused is smaller above this many rows
    per_row = 4 * vocab - size * hidden
    site.fused_breakeven_rows = fixed // per_row + 1 if per_row > 0 else 0
    site.max_chunk_rows = chunk_rows_for(1 << 40, vocab)
    if example_rows:
        site.estimate = {"stock": 4 * example_rows * vocab, "exact": 0, "fused": size * example_rows * hidden + fixed}
        site.chunk_rows = chunk_rows_for(example_rows, vocab)


def apply_loss_heads(model: nn.Module, plan: Plan) -> None:
    for site in plan.loss_heads:
        if site.action not in ("exact", "fused"):
            continue
        owner = model.get_submodule(site.module)
        install(
            owner, model.get_submodule(site.head), owner.loss_function, site.loss == "ForCausalLM", site.recipe,
            fused=site.action == "fused", name=site.head,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The stage (rewrites.pipeline)
# --------------------------------------------------------------------------------------------------


def _find_stage(ctx: Context) -> bool:
    ctx.found["loss_head"] = bool(ctx.config.loss_head and find_loss_heads(ctx.model, ctx.plan))
    return ctx.found["loss_head"]


def _plan_stage(ctx: Context) -> None:
    if not ctx.found.get("loss_head"):
        return
    # without a graph the loss is still checked at run time: the exact path is taken only given the
    # head's own output
    rows = _rows(ctx.config, ctx.model) if ctx.capture is not None else None
    plan_loss_heads(ctx.model, ctx.plan, ctx.capture, rows, loss_head_mode(ctx.config))


def _apply_stage(model: nn.Module, plan: Plan, options: ApplyOptions) -> list[str]:
    apply_loss_heads(model, plan)
    return []


def _rows(config: ConvertConfig, model: nn.Module) -> int | None:
    """Token rows of the example batch (batch x sequence of its ids), for the loss head's estimate."""
    from ..capture import example_inputs_for

    try:
        args, kwargs = config.example_inputs or example_inputs_for(model, flags=False)
    except Exception:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    return int(ids.numel()) if hasattr(ids, "numel") and ids.dim() == 2 else None


def _loss_head_line(h) -> str:
    """One line per loss head: the choice, the estimates of stock / exact / fused (bytes kept for
    backward on the example batch, extra head GEMMs), the chunk rows and where fused pays off."""
    what = f"{h.module or '<model>'} ({h.loss}, {h.head})"
    if h.action not in ("exact", "fused"):
        return f"  loss head: {what} {h.reason}"
    mib = {k: f"{v / 2**20:.1f} MiB" for k, v in h.estimate.items()}
    chunk = f"chunks of {h.chunk_rows} rows" if h.chunk_rows else "chunks of rows"
    if h.max_chunk_rows:
        chunk += f" (at most {h.max_chunk_rows}: 64 MiB of float32 logits)"
    recipe = (" then " + ", ".join(op.split(".")[1] for op, _a, _k in h.recipe)) if h.recipe else ""
    pays = ""
    if h.fused_breakeven_rows > 1:
        pays = f"; fused keeps fewer bytes than stock from {h.fused_breakeven_rows} rows per step"
    elif h.fused_breakeven_rows == 1:
        pays = "; fused keeps fewer bytes than stock at any batch"
    if h.action == "exact":
        stock = f"; stock keeps {mib['stock']} there on the example batch" if h.estimate else ""
        fused = f"; loss_head='fused' would keep {mib['fused']} ({h.fused_keeps}), no extra GEMM" if h.estimate else ""
        return (
            f"  loss head: {what} exact, keeps nothing of rows x vocabulary{stock}; backward recomputes the "
            f"head's GEMM{recipe}, {chunk} (head FLOPs x 4/3){fused}{pays}"
        )
    kept = (
        f"; keeps {mib['fused']} for backward on the example batch ({h.fused_keeps}; exact 0 MiB with +1 head "
        f"GEMM, stock {mib['stock']})"
        if h.estimate
        else f"; keeps {h.fused_keeps} for backward (exact: nothing, +1 head GEMM)"
    )
    return (
        f"  loss head: {what} fused (asked): no logits while training (FusedLogits, raises on use); loss and "
        f"gradients in one pass over the head's GEMM{recipe}, {chunk}, head GEMMs as stock{kept}{pays}"
    )


STAGE = Stage(
    name="loss_head",
    find=_find_stage,
    plan=_plan_stage,
    apply=_apply_stage,
    summary=lambda plan: [_loss_head_line(h) for h in plan.loss_heads],
    converted=lambda plan: sum(s.action in ("exact", "fused") for s in plan.loss_heads),
)
