"""Random small models for the fuzzer: norms, Linears, activations and the ways real code wires them.

A model is a random program over one running tensor ``h`` ([batch, tokens, D]). Each step is one
block drawn from the patterns that broke conversions before: pre-norm and post-norm blocks, MLPs
with module / functional / in-place activations (and MLP modules with their own forward, plain or
gated, which the exact recompute rewrites), a norm output read by several consumers (shared
Linears, views, token slices, casts, ``x @ W.T``, Dropout), blocks applied again (loops, towers),
norm weights read elsewhere, Parameters shared by two modules or two Parameters over one storage,
extra outputs. Parameters are random (norm scales of both signs, biases; in some norms a channel or
two ill-conditioned: scale zero or tiny, or bias large against it), some are frozen.
Everything is drawn from ``random.Random(seed)``: a seed is the whole model.
"""

from __future__ import annotations

import enum
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

D = 8
TOKENS = 3


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaling by (1 + w), computed in float32 as Gemma does."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class Kind(enum.Enum):
    LAYER = 1
    RMS = 2


class EnumNorm(nn.Module):
    """One class, two behaviours chosen by an Enum (a per-class verdict cache would mix them up)."""

    def __init__(self, dim: int, kind: Kind) -> None:
        super().__init__()
        self.kind, self.eps = kind, 1e-5
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if self.kind is Kind.LAYER:
            return F.layer_norm(x, (x.shape[-1],), self.weight, None, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


NORMS = (nn.LayerNorm, nn.RMSNorm, GemmaRMSNorm, EnumNorm)


class FnAct(nn.Module):
    """An activation whose function is a stored callable."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _norm(rng: random.Random) -> nn.Module:
    choice = rng.randrange(7)
    if choice == 0:
        return nn.LayerNorm(D, elementwise_affine=rng.random() < 0.85, bias=rng.random() < 0.7)
    if choice == 1:
        return nn.RMSNorm(D, eps=rng.choice([None, 1e-6, 1e-5]), elementwise_affine=rng.random() < 0.85)
    if choice == 2:
        return GemmaRMSNorm(D)
    if choice == 3:
        return EnumNorm(D, rng.choice([Kind.LAYER, Kind.RMS]))
    return nn.LayerNorm(D)


def _activation(rng: random.Random) -> tuple[nn.Module | None, str]:
    """(module or None for a functional call, how it is called)."""
    choice = rng.randrange(9)
    if choice == 0:
        return nn.GELU(), "module"
    if choice == 1:
        return nn.GELU(approximate="tanh"), "module"
    if choice == 2:
        return nn.SiLU(), "module"
    if choice == 3:
        return nn.SiLU(inplace=True), rng.choice(["module", "mutation"])
    if choice == 4:
        return nn.ReLU(inplace=rng.random() < 0.5), "module"
    if choice == 5:
        return FnAct(rng.choice([F.gelu, F.relu, torch.tanh, F.silu])), "module"
    if choice == 6:
        return None, "functional"
    return nn.GELU(), "module"


class FuzzMLP(nn.Module):
    """An MLP module with its own forward (what the exact recompute rewrites): plain
    ``fc2(drop(act(fc1(x))))`` or gated ``fc2(drop(act(gate(x)) * fc1(x)))``."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D, bias=rng.random() < 0.8)
        self.gate = nn.Linear(D, 2 * D, bias=rng.random() < 0.5) if rng.random() < 0.5 else None
        self.act = rng.choice([nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()])
        self.drop = rng.choice([nn.Identity(), nn.Dropout(0.0), nn.Dropout(0.2)])
        self.fc2 = nn.Linear(2 * D, D, bias=rng.random() < 0.8)

    def forward(self, x):
        if self.gate is None:
            return self.fc2(self.drop(self.act(self.fc1(x))))
        return self.fc2(self.drop(self.act(self.gate(x)) * self.fc1(x)))


class FuzzModel(nn.Module):
    """Runs ``self.program``: a list of (block kind, names of its modules, options)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.seed = seed
        self.blocks = nn.ModuleDict()
        self.program: list[tuple[str, str, dict]] = []
        self.pool = nn.ModuleList([nn.Linear(D, D, bias=rng.random() < 0.8) for _ in range(2)])
        self.free = nn.Parameter(torch.randn(D, D) * 0.3)
        for i in range(rng.randint(1, 3)):
            self._add_block(rng, f"b{i}")
        if rng.random() < 0.3 and self.program:  # apply an earlier block again (a loop / tower)
            self.program.append(rng.choice(self.program))
        self.final = _norm(rng) if rng.random() < 0.5 else None
        self.head = nn.Linear(D, D, bias=rng.random() < 0.5)
        self.return_extra = rng.random() < 0.3
        self._share(rng)
        self._randomize(rng)

    def _add_block(self, rng: random.Random, name: str) -> None:
        kind = rng.choice(["pre", "pre", "post", "mlp", "mlp", "mlp_module", "weight_read"])
        block = nn.Module()
        block.norm = _norm(rng)
        options: dict = {}
        if kind == "mlp_module":
            block.mlp = FuzzMLP(rng)
        elif kind == "mlp":
            block.fc1 = nn.Linear(D, 2 * D, bias=rng.random() < 0.8)
            block.fc2 = nn.Linear(2 * D, D, bias=rng.random() < 0.8)
            act, how = _activation(rng)
            if act is not None:
                block.act = act
            options["how"] = how
            options["dropout"] = rng.choice([None, 0.0, 0.2])  # None: no dropout call at all
        else:
            count = rng.randint(1, 3)
            options["consumers"] = [self._consumer(rng, block, j) for j in range(count)]
            options["residual_uses_norm"] = rng.random() < 0.2
        self.blocks[name] = block
        self.program.append((kind, name, options))

    def _consumer(self, rng: random.Random, block: nn.Module, j: int) -> tuple[str, str]:
        how = rng.choice(["linear", "linear", "pool", "view", "slices", "cast", "matmul", "dropout0", "dropout"])
        target = f"fc{j}"
        if how == "pool":
            target = f"pool{rng.randrange(len(self.pool))}"
        elif how != "matmul":
            setattr(block, target, nn.Linear(D, D, bias=rng.random() < 0.8))
        return how, target

    def _share(self, rng: random.Random) -> None:
        linears = [m for m in self.modules() if isinstance(m, nn.Linear) and m.in_features == D and m.out_features == D]
        if len(linears) >= 2 and rng.random() < 0.2:  # one Parameter in two modules
            a, b = rng.sample(linears, 2)
            b.weight = a.weight
        elif len(linears) >= 2 and rng.random() < 0.15:  # two Parameters over one storage
            a, b = rng.sample(linears, 2)
            b.weight = nn.Parameter(a.weight.data)

    def _randomize(self, rng: random.Random) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for module in self.modules():
                for name, p in module.named_parameters(recurse=False):
                    if isinstance(module, nn.Linear) or module is self:
                        continue
                    if name == "weight":
                        sign = torch.randn(p.shape, generator=gen).sign()
                        scale = (torch.rand(p.shape, generator=gen) + 0.5) * sign
                        p.copy_(scale - 1.0 if isinstance(module, GemmaRMSNorm) else scale)
                    else:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            for module in self.modules():
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.3)
        for p in self.parameters():
            if rng.random() < 0.15:
                p.requires_grad_(False)
        self._ill_condition(rng)

    def _ill_condition(self, rng: random.Random) -> None:
        """Some norms get a channel or two whose x_hat cannot be recovered from the output (drawn last,
        so the rest of each seed's model is what it was): a scale of exactly zero, a tiny one, one just
        above ``min_abs_weight``, or a bias large against the scale. The default keeps x_hat for those
        channels; a fold puts the scale into the consumers as it is."""
        with torch.no_grad():
            for module in self.modules():
                weight = getattr(module, "weight", None)
                if not isinstance(module, NORMS) or not isinstance(weight, nn.Parameter) or rng.random() >= 0.2:
                    continue
                offset = 1.0 if isinstance(module, GemmaRMSNorm) else 0.0
                bias = getattr(module, "bias", None)
                for c in rng.sample(range(D), rng.randint(1, 2)):
                    case = rng.choice(["zero", "tiny", "threshold", "bias"])
                    sign = rng.choice([-1.0, 1.0])
                    if case == "bias" and isinstance(bias, nn.Parameter):
                        bias[c] = sign * 10.0 * abs(weight[c].item() + offset)
                        continue
                    scale = {"zero": 0.0, "tiny": 1e-4, "threshold": 2e-3}.get(case, 1e-4) * sign
                    weight[c] = scale - offset

    def _linear(self, block: nn.Module, target: str) -> nn.Module:
        if target.startswith("pool"):
            return self.pool[int(target[4:])]
        return getattr(block, target)

    def forward(self, x):
        h = x
        extras = []
        for kind, name, options in self.program:
            block = self.blocks[name]
            if kind == "mlp_module":
                h = h + block.mlp(block.norm(h))
                continue
            if kind == "mlp":
                a = block.fc1(block.norm(h))
                if options["how"] == "functional":
                    a = F.gelu(a)
                elif options["how"] == "mutation":
                    block.act(a)
                else:
                    a = block.act(a)
                if options["dropout"] is not None:
                    a = F.dropout(a, options["dropout"], self.training)
                h = h + block.fc2(a)
                continue
            y = block.norm(h)
            z = sum(self._consume(y, how, self._linear(block, target) if how != "matmul" else None)
                    for how, target in options["consumers"])  # fmt: skip
            if kind == "post":
                h = block.norm(h + z)
            elif kind == "weight_read" and getattr(block.norm, "weight", None) is not None:
                h = h + z * block.norm.weight
            else:
                h = h + z + (y if options["residual_uses_norm"] else 0)
            if self.return_extra:
                extras.append(y)
        if self.final is not None:
            h = self.final(h)
        out = self.head(h)
        return (out, *extras) if extras else out

    def _consume(self, y: torch.Tensor, how: str, linear: nn.Module | None) -> torch.Tensor:
        if how in ("linear", "pool"):
            return linear(y)
        if how == "view":
            return linear(y.reshape(-1, D)).reshape(y.shape)
        if how == "slices":
            return torch.cat([linear(y[:, :1]), linear(y[:, 1:])], dim=1)
        if how == "cast":
            return linear(y.float())
        if how == "matmul":
            return y @ self.free.T
        if how == "dropout0":
            return linear(F.dropout(y, 0.0, self.training))
        return linear(F.dropout(y, 0.1, self.training))


def with_lora(model: nn.Module, seed: int) -> nn.Module:
    """PEFT LoRA injected into a random subset of the Linears (in place), each wrapped layer's adapters
    in float64 with probability 0.8 (wider than the float32 input, as PEFT's fp32 adapters on a bf16
    model) and random lora_dropout."""
    import peft

    rng = random.Random(seed + 10_000)
    names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n})
    targets = rng.sample(names, rng.randint(1, len(names)))
    config = peft.LoraConfig(
        r=2, target_modules=targets, lora_dropout=rng.choice([0.0, 0.0, 0.1]), init_lora_weights=False
    )
    torch.manual_seed(seed)
    peft.inject_adapter_in_model(config, model)
    for module in model.modules():
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and rng.random() < 0.8:
            module.lora_A.double()
            module.lora_B.double()
    return model


def example_inputs(seed: int, batch: int = 2) -> tuple[tuple, dict]:
    return (torch.randn(batch, TOKENS, D, generator=torch.Generator().manual_seed(seed + 7)),), {}
