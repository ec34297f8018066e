"""The autocast twin of a post-norm MS norm: exact forward, stock-close gradients, one saved tensor."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowmembp_convert.memory import activation_memory
from lowmembp_convert.nn import MSLayerNorm
from lowmembp_convert.ops import ms_norm_with_twin


class PostNormBlock(nn.Module):
    """norm output -> Linear and -> residual add, as in BERT's post-norm blocks."""

    def __init__(self, norm: nn.Module, d: int):
        super().__init__()
        self.norm, self.fc = norm, nn.Linear(d, d)

    def forward(self, x):
        y = self.norm(x)
        return self.fc(y) + y


def _blocks(d=48):
    torch.manual_seed(0)
    stock = nn.LayerNorm(d)
    with torch.no_grad():
        stock.weight.uniform_(0.5, 1.5)
        stock.bias.normal_()
    ref = PostNormBlock(stock, d)
    weight = nn.Parameter(stock.weight.detach().clone())
    bias = nn.Parameter(stock.bias.detach().clone())
    ms_norm = MSLayerNorm(d, stock.eps, weight=weight, bias=bias, affine_weight=True, affine_bias=True)
    new = PostNormBlock(ms_norm, d)
    new.fc.load_state_dict(ref.fc.state_dict())
    ms_norm.feed_twin_to(new.fc)
    return ref, new


def test_twin_forward_exact_and_gradients_match_stock_under_autocast():
    ref, new = _blocks()
    x = torch.randn(4, 9, 48) * 3 + 1
    grads = []
    for block in (ref, new):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(xi)
        out.float().pow(2).sum().backward()
        grads.append((out.detach().float(), xi.grad, block.norm.weight.grad, block.fc.weight.grad))
    (o_ref, *g_ref), (o_new, *g_new) = grads
    assert torch.allclose(o_ref, o_new, rtol=1e-5, atol=1e-5)  # same forward, up to fp32 rounding
    for a, b in zip(g_ref, g_new, strict=True):
        assert F.cosine_similarity(a.flatten().double(), b.flatten().double(), 0) > 0.999


def test_twin_gradient_against_float64_oracle():
    torch.manual_seed(1)
    x = torch.randn(6, 32, dtype=torch.float64, requires_grad=True)
    w = torch.rand(32, dtype=torch.float64) + 0.5
    b = torch.randn(32, dtype=torch.float64)
    g_y, g_twin = torch.randn(6, 32, dtype=torch.float64), torch.randn(6, 32, dtype=torch.float64)
    y, twin = ms_norm_with_twin(x.float(), w.float(), b.float(), 1e-5, 0.0, False, torch.float32)
    dx = torch.autograd.grad((y * g_y.float()).sum() + (twin * g_twin.float()).sum(), x)[0]
    ref_y = F.layer_norm(x, (32,), w, b, 1e-5)
    ref_dx = torch.autograd.grad((ref_y * (g_y + g_twin)).sum(), x)[0]
    assert torch.allclose(dx.double(), ref_dx, rtol=1e-4, atol=1e-5)


def test_twin_is_the_only_saved_activation_shared_with_the_linear():
    _, new = _blocks()
    x = torch.randn(4, 9, 48)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            new(x.requires_grad_(True)).float().sum()

    saved = activation_memory(run, params=new)
    rows = 4 * 9
    # bf16 twin (shared by the norm and fc) + fp32 rstd per row + fc's bf16 weight copy (autocast);
    # no fp32 copy of y and no cast copy of it
    assert saved.total == rows * 48 * 2 + rows * 4 + 48 * 48 * 2
    assert saved.storages == 3
