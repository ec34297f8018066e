"""PEFT adapters wider than their input keep the narrow input (rewrites/adapter_inputs.py).

Oracles: the stock PeftModel (a deep copy run the same way) for forward and gradients, bit for bit;
saved-tensor hooks (``activation_memory``) for the bytes; PEFT's own behaviour (disable_adapter,
merge_and_unload, extra adapters, dropout) applied to both models alike.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

from lowmembp_convert import activation_memory, convert
from lowmembp_convert.nn import UpcastInputLinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ONLY = {"norms": False, "activations": False}  # the adapter rewrite alone
TOKENS = (2, 12)


def _llama(dtype: torch.dtype, adapter_dtype: torch.dtype | None = None, layers: int = 2, **lora) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(dtype)
    options = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False) | lora
    model = peft.get_peft_model(model, peft.LoraConfig(**options), autocast_adapter_dtype=True)
    if adapter_dtype is not None:
        for name, module in model.named_modules():
            if ".lora_" in name and isinstance(module, nn.Linear):
                module.to(adapter_dtype)
    return model.train()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, TOKENS, generator=torch.Generator().manual_seed(seed))


def _step(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_bitwise(stock: nn.Module, model: nn.Module, seed: int = 0) -> None:
    ids = _ids(seed)
    (out_a, grads_a), (out_b, grads_b) = _step(stock, ids), _step(model, ids)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize(
    "dtype, adapter_dtype",
    [(torch.bfloat16, None), (torch.float16, None), (torch.float32, torch.float64)],
    ids=["bf16-peft-default", "fp16-peft-default", "fp32-fp64-adapters"],
)
def test_forward_and_gradients_are_the_stock_ones_bit_for_bit(dtype, adapter_dtype) -> None:
    stock = _llama(dtype, adapter_dtype)
    model = convert(copy.deepcopy(stock), **ONLY)
    plan = model.lowmembp_report.plan
    assert [s.action for s in plan.adapters] == ["share"] * 4
    q = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert type(q.lora_A["default"]) is UpcastInputLinear
    assert list(model.state_dict()) == list(stock.state_dict())
    _assert_bitwise(stock, model)


def test_lora_a_keeps_the_narrow_input_so_the_upcast_copies_are_gone() -> None:
    stock = _llama(torch.bfloat16)
    off = convert(copy.deepcopy(stock), adapter_inputs=False)
    on = convert(copy.deepcopy(stock))
    ids = _ids()

    def saved(model):
        return activation_memory(lambda: model(input_ids=ids).logits.float().sum().backward(), params=model).total

    # two layers x (q, v): each lora_A kept an fp32 copy of the [2, 12, 32] input. Layer 1's MS norm
    # keeps that input anyway, so there the rewrite keeps nothing new; layer 0's norm keeps nothing
    # (the frozen embedding needs no gradient), so its q and v share one new bf16 tensor
    elements = TOKENS[0] * TOKENS[1] * 32
    assert saved(off) - saved(on) == 2 * 2 * elements * 4 - elements * 2
    assert saved(on) < saved(stock)
    for site in on.lowmembp_report.plan.adapters:  # on the example batch: an fp32 copy against the bf16 input
        assert site.estimate["stock"] == 2 * site.estimate["share"] > 0
    text = str(on.lowmembp_report)
    assert "PEFT adapter inputs: 4 layer(s)" in text and "(upcast inside)" in text


def test_peft_controls_after_converting_behave_as_on_the_stock_model() -> None:
    stock = _llama(torch.bfloat16)
    model = convert(copy.deepcopy(stock), **ONLY)
    ids = _ids(1)
    with stock.disable_adapter(), model.disable_adapter():
        assert torch.equal(stock(input_ids=ids).logits, model(input_ids=ids).logits)
    from peft.helpers import disable_input_dtype_casting

    with torch.no_grad():
        expected = stock(input_ids=ids).logits
        with disable_input_dtype_casting(stock), disable_input_dtype_casting(model):
            with pytest.raises(RuntimeError):  # stock: bf16 into an fp32 Linear
                stock(input_ids=ids)
            # converted: lora_A upcasts inside, so the result is the one with PEFT's cast (not an error)
            assert torch.equal(model(input_ids=ids).logits, expected)
    _assert_bitwise(stock, model, seed=2)
    merged_a = copy.deepcopy(stock).merge_and_unload()
    merged_b = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():
        assert torch.equal(merged_a(input_ids=ids).logits, merged_b(input_ids=ids).logits)


@pytest.mark.parametrize("change", ["dropout", "second_adapter", "dora_adapter"])
def test_a_layer_changed_after_converting_falls_back_to_the_stock_cast(change: str) -> None:
    """The override re-checks every call: a dropout, another adapter or a variant added later makes
    the layer cast as PEFT does (the narrow input would change their results)."""
    stock = _llama(torch.bfloat16)
    model = convert(copy.deepcopy(stock), **ONLY)
    for m in (stock, model):
        if change == "dropout":
            for name, module in m.named_modules():
                if name.endswith("lora_dropout"):
                    module["default"] = nn.Dropout(0.3)
        else:
            config = peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=change == "dora_adapter")
            torch.manual_seed(5)
            m.add_adapter("extra", config)
            m.base_model.set_adapter(["default", "extra"])
    _assert_bitwise(stock, model, seed=3)


def test_skipped_sites_say_why_and_same_dtype_adapters_are_no_site() -> None:
    dropped = convert(_llama(torch.bfloat16, lora_dropout=0.1), **ONLY).lowmembp_report.plan.adapters
    assert dropped and all(s.action == "skip" and "lora_dropout" in s.reason for s in dropped)
    dora = convert(_llama(torch.bfloat16, use_dora=True), **ONLY).lowmembp_report.plan.adapters
    assert dora and all(s.action == "skip" and "variant" in s.reason for s in dora)
    assert convert(_llama(torch.float32), **ONLY).lowmembp_report.plan.adapters == []
    off = convert(_llama(torch.bfloat16), adapter_inputs=False)
    assert off.lowmembp_report.plan.adapters == []


def test_converted_layer_pickles_and_deep_copies_as_a_converted_layer() -> None:
    stock = _llama(torch.bfloat16, layers=1)
    model = convert(copy.deepcopy(stock), **ONLY)
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for again in (torch.load(buffer, weights_only=False), copy.deepcopy(layer)):
        assert type(again).lowmembp_adapter_inputs and type(again.lora_A["default"]) is UpcastInputLinear
        x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
        assert torch.equal(again(x), layer(x))


def test_a_second_convert_finds_nothing_new_and_a_failure_restores_the_classes(monkeypatch) -> None:
    stock = _llama(torch.bfloat16, layers=1)
    model = convert(copy.deepcopy(stock), **ONLY)
    assert convert(model, **ONLY).lowmembp_report.plan.adapters == []
    _assert_bitwise(stock, model)

    from lowmembp_convert.rewrites import adapter_inputs

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    fresh = copy.deepcopy(stock)
    classes = [type(m) for m in fresh.modules()]
    monkeypatch.setattr(adapter_inputs, "_subclass", boom)  # after the lora_A swaps: they must be undone
    with pytest.raises(RuntimeError, match="injected"):
        convert(fresh, **ONLY)
    assert [type(m) for m in fresh.modules()] == classes


def _timm_vit_lora() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=5)
    with torch.no_grad():  # random norm affines: 1 and 0 would hide a fold
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p) * 0.3)
    config = peft.LoraConfig(r=4, target_modules=["qkv"], init_lora_weights=False)
    return peft.get_peft_model(model, config).train()


def test_fp32_model_under_bf16_autocast_lora_a_keeps_the_norm_output() -> None:
    """No cast in the captured graph, one at run time: under autocast the MS norm emits bf16, PEFT
    upcasts it to the fp32 adapters and autocast casts it back inside lora_A, which kept that copy."""
    stock = _timm_vit_lora()
    off = convert(copy.deepcopy(stock), adapter_inputs=False)
    on = convert(copy.deepcopy(stock))
    sites = on.lowmembp_report.plan.adapters
    assert [s.action for s in sites] == ["share", "share"] and "under autocast" in sites[0].reason
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def step(model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (out_a, grads_a), (out_b, grads_b) = step(off), step(on)
    assert torch.equal(out_a, out_b) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    out_s, _ = step(stock)
    assert (out_s - out_b).abs().max() <= 5e-2 * out_s.abs().max()  # against the unconverted model: bf16 rounding

    def saved(model):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            out.float().sum().backward()

        return activation_memory(run, params=model).total

    # block 1's lora_A kept its own bf16 [2 x 5 tokens, 192] copy; now it keeps norm1's output. Block 0's
    # norm1 keeps nothing (the frozen patch embedding needs no gradient), so its lora_A keeps a tensor either way
    assert saved(off) - saved(on) == 2 * 5 * 192 * 2
    with torch.no_grad():  # and outside autocast nothing changes: fp32 in, plain Linear
        assert torch.equal(off(x), on(x))


def test_a_hook_on_lora_a_sees_what_peft_hands_it() -> None:
    stock = _llama(torch.bfloat16)
    model = convert(copy.deepcopy(stock), **ONLY)
    seen = {"stock": set(), "model": set()}
    for key, m in (("stock", stock), ("model", model)):
        for name, module in m.named_modules():
            if name.endswith("lora_A.default"):
                module.register_forward_pre_hook(lambda mod, args, key=key: seen[key].add(args[0].dtype))
    _assert_bitwise(stock, model)
    assert seen["stock"] == seen["model"] == {torch.float32}


def test_a_class_put_on_top_of_the_converted_layer_does_not_loop() -> None:
    """FSDP2's fully_shard and parametrize swap in a subclass of the current class: PEFT's own cast
    must still be reachable from the override."""
    stock = _llama(torch.bfloat16, layers=1)
    model = convert(copy.deepcopy(stock), **ONLY)
    for m in (stock, model):
        layer = m.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
        layer.__class__ = type("Wrapped", (type(layer),), {})
    _assert_bitwise(stock, model)
    for m in (stock, model):  # a dropout makes the override call PEFT's cast
        m.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").lora_dropout["default"] = nn.Dropout(0.2)
    _assert_bitwise(stock, model)


def test_gpt2_conv1d_base_layers_share_too() -> None:
    """PEFT over transformers' Conv1D (fan_in_fan_out): the base layer stays PEFT's to call."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    lora = peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False, fan_in_fan_out=True)
    stock = peft.get_peft_model(transformers.GPT2LMHeadModel(config).to(torch.bfloat16), lora).train()
    model = convert(copy.deepcopy(stock), **ONLY)
    assert [s.action for s in model.lowmembp_report.plan.adapters] == ["share"] * 4
    _assert_bitwise(stock, model)
