"""Causes 7, 12 and 13: protection of every returnable output whatever the entry point, bad options
refused at the door, and a second convert() keeping the first report."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import transformers
from rule import assert_same_fingerprint, convert_checked, fingerprint, rel
from tiny_zoo import randomize_affine

from lowmembp_convert import ConvertConfig, convert

VOCAB = 64


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return randomize_affine(transformers.LlamaForCausalLM(config)).eval()


class Wrapper(nn.Module):
    """A user's module around an HF model: its forward decides which keywords reach the model."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = _llama()
        self.score = nn.Linear(32, 1)

    def forward(self, input_ids):
        out = self.lm(input_ids=input_ids)
        return self.score(out.logits[..., :32]).squeeze(-1)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def test_a_wrapped_hf_models_hidden_states_stay_exact() -> None:
    model = Wrapper()
    original = copy.deepcopy(model)
    convert_checked(model, ((_ids(),), {}))
    assert model.lowmembp_report.plan.norm("lm.model.norm").action == "keep_affine"
    with torch.no_grad():
        a = original.lm(input_ids=_ids(), output_hidden_states=True).hidden_states
        b = model.lm(input_ids=_ids(), output_hidden_states=True).hidden_states
    assert all(rel(x, y) < 1e-5 for x, y in zip(a, b, strict=True))


def test_user_example_inputs_without_hidden_states_still_protect_them() -> None:
    model = _llama()
    original = copy.deepcopy(model)
    convert(model, example_inputs=((), {"input_ids": _ids()}))  # no output_hidden_states, no use_cache
    assert model.lowmembp_report.plan.norm("model.norm").action == "keep_affine"
    assert "failed" not in model.lowmembp_report.plan.capture, "a decoder traced with its cache on must still trace"
    with torch.no_grad():
        a = original(input_ids=_ids(), output_hidden_states=True).hidden_states[-1]
        b = model(input_ids=_ids(), output_hidden_states=True).hidden_states[-1]
    assert rel(a, b) < 1e-5
    assert model.config.use_cache == original.config.use_cache and not model.config.output_hidden_states


def test_a_failed_trace_is_said_in_the_report() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            if x.sum().item() > 0:  # data-dependent control flow
                return self.fc(self.norm(x))
            return self.fc(self.norm(-x))

    model = convert(Untraceable(), example_inputs=((torch.randn(2, 8),), {}))
    text = str(model.lowmembp_report)
    assert "WARNING: graph capture failed" in text and "example_inputs" in text


BAD_OPTIONS = [
    ({"activations": "no"}, ValueError, "activations"),
    ({"example_inputs": torch.randn(2, 8)}, TypeError, "example_inputs"),
    ({"example_inputs": (torch.randn(2, 8),)}, TypeError, "example_inputs"),
    ({"min_abs_weight": "1e-3"}, TypeError, "min_abs_weight"),
    ({"verify_rtol": -1.0}, ValueError, "verify_rtol"),
    ({"verify": "yes"}, TypeError, "verify"),
    ({"filter_fn": "norm"}, TypeError, "filter_fn"),
]


@pytest.mark.parametrize("options,error,name", BAD_OPTIONS, ids=[str(o) for o, _e, _n in BAD_OPTIONS])
def test_bad_options_are_refused_naming_the_option(options, error, name) -> None:
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
    before = fingerprint(model)
    with pytest.raises(error, match=name):
        convert(model, **options)
    assert_same_fingerprint(before, fingerprint(model))


def test_a_dict_config_and_a_torchscript_module_are_refused() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    with pytest.raises(TypeError, match="ConvertConfig"):
        convert(model, config={"activations": False})
    with pytest.raises(TypeError, match="TorchScript"):
        convert(torch.jit.script(model))
    assert ConvertConfig(activations="approx").activations == "approx"


def test_converting_twice_keeps_the_first_report() -> None:
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    inputs = ((torch.randn(2, 8),), {})
    convert(model, example_inputs=inputs)
    first = model.lowmembp_report
    convert(model, example_inputs=inputs)
    assert model.lowmembp_report.previous is first
    assert "folded" in str(model.lowmembp_report) and str(first) in str(model.lowmembp_report)


def test_report_names_consumers_relative_to_the_norm_and_explains_copies() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.attn = nn.Module()
            self.attn.dense = nn.Linear(8, 8)
            self.mlp = nn.Module()
            self.mlp.dense = nn.Linear(8, 8)

        def forward(self, x):
            y = self.norm(x)
            return self.attn.dense(y) + self.mlp.dense(torch.nn.functional.pad(y, (0, 0, 1, 0))[:, 1:])

    model = nn.Sequential(Block())
    text = str(convert(model, example_inputs=((torch.randn(2, 3, 8),), {})).lowmembp_report)
    assert "attn.dense" in text and "mlp.dense (copy)" in text and "(copy): that consumer receives a copy" in text
    plan_text = str(model.lowmembp_report.plan)
    assert plan_text.startswith("lowmembp_convert plan") and "NormSite(" not in plan_text


def test_verify_accepts_peft_fp32_adapters_on_a_bf16_model() -> None:
    """PEFT's default keeps LoRA weights in fp32 on a bf16 model: lora_dropout sees an fp32 cast of the
    norm output, x_hat once the affine is folded into lora_A. Verification must know that by design."""
    peft = pytest.importorskip("peft")
    model = _llama().to(torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    original = copy.deepcopy(model)
    convert(model, example_inputs=((), {"input_ids": _ids()}))  # verify on: no false alarm
    assert any(n.startswith("verified:") for n in model.lowmembp_report.notes)
    with torch.no_grad():
        a, b = original(input_ids=_ids()).logits.float(), model(input_ids=_ids()).logits.float()
    assert rel(a, b) < 5e-2


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_convert_leaves_no_hook_or_attribute_of_its_own_forwards(family: str) -> None:
    """Capturing and verifying ask for every hidden state, which makes transformers install output-
    capturing hooks (local functions: the model would no longer pickle) the first time: they go."""
    import io

    if family == "llama":
        model = _llama()
    else:
        config = transformers.BertConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=40,
        )  # fmt: skip
        model = transformers.BertForMaskedLM(config)
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    attributes = set(vars(model))
    convert(model)
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    # the loss head sets transformers' own loss_function (its setter stores _loss_function), nothing else
    assert set(vars(model)) - attributes <= {"lowmembp_report", "_loss_function"}
    if "_loss_function" in vars(model):
        assert type(model._loss_function).__name__ == "ExactHeadLoss"
    torch.save(model, io.BytesIO())


def test_a_lazy_module_is_refused_before_anything_changes() -> None:
    model = nn.Sequential(nn.LayerNorm(8), nn.LazyLinear(4))
    before = [(n, type(m), dict(vars(m))) for n, m in model.named_modules()]  # lazy values cannot be cloned
    with pytest.raises(ValueError, match="uninitialized .lazy. parameter.*run one forward pass first"):
        convert(model)
    assert [(n, type(m), dict(vars(m))) for n, m in model.named_modules()] == before
    assert model(torch.randn(2, 8)).shape == (2, 4)


def test_replacements_keep_transformers_initialised_flag() -> None:
    """transformers' init_weights skips modules marked initialised; a replacement without the mark
    could be re-initialised later (resize_token_embeddings)."""
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    marked = {n for n, m in model.named_modules() if getattr(m, "_is_hf_initialized", False)}
    assert marked
    convert(model)
    assert {n for n, m in model.named_modules() if getattr(m, "_is_hf_initialized", False)} >= marked
