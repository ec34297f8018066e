"""What the analysis found, site by site: the plan that ``apply`` carries out and the report shows.

Analysis changes nothing; it produces a :class:`Plan`. Every site carries its action and, when it is
skipped or only partly converted, the reason in words a user can act on.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

NormKind = Literal["layer_norm", "rms_norm"]
# "elementwise": no known function, but proven pure and elementwise (recompute re-runs the module)
ActivationKind = Literal["gelu", "gelu_tanh", "silu", "elementwise"]
# fold:        the norm's weight and bias move into the consumers (every consumer has a bias when the
#              norm does); the MS norm then emits x_hat and backward needs no division.
# keep_affine: consumers keep the norm output as-is (post-norm residual, tied weights...); the MS
#              norm applies its own affine and backward recovers x_hat = (y - bias) / weight.
# skip:        left untouched; `reason` says why.
NormAction = Literal["fold", "keep_affine", "skip"]
ActivationAction = Literal["convert", "skip"]
# linear: weight [out, in] (nn.Linear, PEFT LoRA base/lora_A);  conv1d: weight [in, out] (HF Conv1D);
# conv: weight [out, in / groups, *kernel] (nn.Conv1d/2d/3d; the norm's channels are the input channels)
ConsumerLayout = Literal["linear", "conv1d", "conv"]


@dataclass(frozen=True)
class Consumer:
    """A layer whose input is the norm's output (possibly through affine-commuting ops)."""

    module: str  # fully qualified module name, e.g. "model.layers.0.self_attn.q_proj"
    weight: str  # fully qualified parameter name of the weight
    bias: str | None  # fully qualified parameter name of the bias, None if the layer has none
    layout: ConsumerLayout
    shares_output: bool  # True when it receives the norm's output tensor itself (or a view of it)
    groups: int = 1  # convolution groups (layout "conv")


@dataclass
class NormSite:
    """One normalization module and what happens to it."""

    module: str
    kind: NormKind
    eps: float | None  # None: the input dtype's machine epsilon (nn.RMSNorm(eps=None))
    weight: str | None  # parameter names of the norm's own affine (None when absent)
    bias: str | None
    weight_offset: float = 0.0  # 1.0 for Gemma-style norms that scale by (1 + w)
    channel_dim: int = -1  # the normalized dim as the module sees its input (-1, or 1 for NCHW)
    consumers: tuple[Consumer, ...] = ()
    action: NormAction = "skip"
    fold_bias: bool = False  # fold with a norm bias: it moves into the consumers' biases too
    autocast_output: bool = False  # may emit the autocast dtype (all users cast it anyway)
    already_folded: bool = False  # affine is identity already (a converted checkpoint)
    # fold with a shift: the dropout modules passed on the way as identities (p = 0), watched after
    dropouts: tuple[str, ...] = ()
    reason: str = ""


# approx:    the module becomes ReGELU2/ReSiLU2 (2-bit approximate backward; the paper).
# recompute: the consumer's backward rebuilds its input from the activation's input (exact).
ActivationOption = Literal["approx", "recompute"]


@dataclass
class ActivationSite:
    module: str
    kind: ActivationKind
    inplace: bool = False  # the module writes its result into its input; the replacement does too
    bitwise: bool = False  # the module's output is torch's op bit for bit (a recompute rebuilds it exactly)
    elementwise: bool = False  # proven pure and elementwise: a recompute may re-run the module itself
    # what the stock module keeps for backward: its input, its output, other tensors (multiples of the input)
    stock_keeps: tuple[bool, bool, float] = (True, False, 0.0)
    action: ActivationAction = "convert"
    option: ActivationOption | None = "approx"  # None: left stock (the planner decided against converting)
    # bytes kept for backward on the example batch per option ("stock", "approx", "recompute"), when planned
    estimate: dict[str, int] = field(default_factory=dict)
    recompute: object | None = None  # the proven RecomputeSite when option == "recompute"
    reason: str = ""


# share: the PEFT layer hands its narrow input to lora_A, which upcasts inside (exact) and keeps it narrow.
AdapterAction = Literal["share", "skip"]


@dataclass
class AdapterSite:
    """A PEFT LoRA layer whose adapters (wider than its input) keep an upcast copy of the input."""

    module: str  # the PEFT layer, e.g. "base_model.model.model.layers.0.self_attn.q_proj"
    adapters: tuple[str, ...] = ()  # adapter names whose lora_A input is the upcast
    action: AdapterAction = "skip"
    # bytes lora_A keeps for backward on the example batch: "stock" (the upcast copy), "share" (the input)
    estimate: dict[str, int] = field(default_factory=dict)
    reason: str = ""


# exact: the model's loss_function becomes ExactHeadLoss over the same lm_head (class swapped);
# fused (only when asked, loss_head="fused"): the same, and the head returns FusedLogits while training.
LossHeadAction = Literal["exact", "fused", "skip"]


@dataclass
class LossHeadSite:
    """A transformers model whose loss (lm_head + cross-entropy) can keep nothing of rows x vocabulary."""

    module: str  # the model owning ``loss_function`` ("" for the converted model itself)
    head: str  # its output layer, e.g. "lm_head"
    loss: str  # "ForCausalLM" or "ForMaskedLM"
    action: LossHeadAction = "skip"
    # bytes the loss keeps for backward on the example batch: "stock" (float32 log-probabilities), "exact"
    # (nothing), "fused" (float32 dh, rows x hidden, and dW, vocab x hidden when the head is trainable)
    estimate: dict[str, int] = field(default_factory=dict)
    # head GEMMs of forward-GEMM size beyond stock's three: "exact" recomputes the logits in backward
    extra_head_gemms: dict[str, int] = field(default_factory=dict)
    fused_breakeven_rows: int = 0  # rows per step from which "fused" keeps fewer bytes than stock (0: never)
    fused_keeps: str = ""  # what "fused" keeps, in words (no dW when the head is frozen)
    chunk_rows: int = 0  # rows per chunk of the recomputed / fused logits (example batch)
    max_chunk_rows: int = 0  # rows per chunk on a long batch: float32 logits of at most 64 MiB
    # elementwise ops from the head's output to the logits the loss gets (softcapping), from the graph:
    # [(op name, args with "$x" for the running tensor, kwargs)]; [] when the head's output goes as is
    recipe: list = field(default_factory=list)
    reason: str = ""


@dataclass
class Plan:
    """Everything the analysis decided, before anything is changed."""

    norms: list[NormSite] = field(default_factory=list)
    activations: list[ActivationSite] = field(default_factory=list)
    adapters: list[AdapterSite] = field(default_factory=list)
    loss_heads: list[LossHeadSite] = field(default_factory=list)
    capture: str = ""  # how the graph was captured, or why it could not be
    notes: list[str] = field(default_factory=list)

    def norm(self, module: str) -> NormSite:
        for site in self.norms:
            if site.module == module:
                return site
        raise KeyError(module)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        """The same site-by-site table as the conversion report (the plan changes nothing)."""
        from .report import Report

        return str(Report(model="(plan only: nothing changed)", plan=self)).replace(
            "lowmembp_convert report for", "lowmembp_convert plan"
        )

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)
