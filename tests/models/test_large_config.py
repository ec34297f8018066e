"""A LLaMA-7B-shaped model on the meta device: analysis and conversion run on shapes alone, in seconds.

torch.export traces on fake tensors and norm detection probes a small CPU copy of each norm, so no
weight is ever materialised; the converted model stays on meta, ready for a checkpoint to be loaded
into it (the stock one under the default ``norms="share"``, a converted one under ``norms="fold"``).
The 32-layer time is printed for BENCHMARKS.md.
"""

from __future__ import annotations

import time

import pytest
import torch
from tiny_zoo import FAMILIES, forward, relative_error

from lowmembp_convert import convert, plan_conversion

transformers = pytest.importorskip("transformers")

SHAPE_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32
)
SECONDS_2_LAYERS = 60.0  # generous for a loaded 2-core CI runner; about 7 s unloaded


def _meta_llama(layers: int):
    config = transformers.LlamaConfig(**SHAPE_7B, num_hidden_layers=layers)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def _all_meta(model) -> bool:
    return all(t.is_meta for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("norms", ["share", "fold"])
def test_7b_shaped_llama_converts_on_meta_in_seconds(norms: str) -> None:
    model = _meta_llama(2)
    names = [n for n, _ in model.named_parameters()]
    start = time.perf_counter()
    plan = plan_conversion(model, norms=norms)
    planned = time.perf_counter() - start
    convert(model, norms=norms)
    total = time.perf_counter() - start
    print(
        f"\n7B-shaped LLaMA, 2 layers on meta (norms={norms!r}): plan_conversion {planned:.1f} s, "
        f"+ convert {total - planned:.1f} s"
    )
    assert total < SECONDS_2_LAYERS
    assert _all_meta(model), "nothing was materialised"
    assert sum(p.numel() for p in model.parameters()) > 0.6e9  # 2 x 202M per layer + 2 x 131M embeddings
    if norms == "share":  # nothing reparameterized (a fold turns the folded affines into identity buffers)
        assert [n for n, _ in model.named_parameters()] == names
    # the final norm's output is returned (hidden states): it keeps its affine under "fold" too
    actions = [s.action for s in plan.norms]
    assert actions == (["keep_affine"] * 5 if norms == "share" else ["fold"] * 4 + ["keep_affine"])
    report = model.lowmembp_report
    assert (report.converted_norms, report.converted_activations) == (5, 2)
    assert getattr(model.model.layers[1].post_attention_layernorm, "lowmembp_converted", False)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4096, 4096)


@pytest.mark.slow  # a timing, not a correctness check
def test_7b_shaped_llama_32_layers_time_for_benchmarks() -> None:
    model = _meta_llama(32)
    start = time.perf_counter()
    convert(model)
    seconds = time.perf_counter() - start
    report = model.lowmembp_report
    print(f"\n7B-shaped LLaMA, 32 layers on meta: convert (analysis + apply) {seconds:.1f} s; {report.plan.capture}")
    assert (report.converted_norms, report.converted_activations) == (65, 32)
    assert _all_meta(model)


@pytest.mark.parametrize("norms", ["share", "fold"])
def test_a_stock_checkpoint_loaded_into_a_meta_converted_model_is_not_silently_wrong(norms: str) -> None:
    """The default changes no parameter: the stock checkpoint loads and is exact. A folded model may
    refuse it instead, if it says what to do."""
    family = FAMILIES["llama"]
    stock = family.make()
    with torch.device("meta"):
        model = family.build()
    convert(model, norms=norms)
    try:
        model.load_state_dict(stock.state_dict(), assign=True)
    except (RuntimeError, ValueError) as exc:  # refusing is fine, if it says what to do
        assert norms == "fold", f"the default must load the stock checkpoint: {exc}"
        assert "converted" in str(exc)
        return
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # meta buffers of the stock class
    with torch.no_grad():
        assert relative_error(forward(stock, family.inputs(0, 2)), forward(model.eval(), family.inputs(0, 2))) < 1e-5
