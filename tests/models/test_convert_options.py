"""convert() options and edge cases on tiny models: idempotence, nothing to do, filter_fn, tied embeddings."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from tiny_zoo import FAMILIES, VOCAB, forward, is_activation_module, randomize_affine, relative_error

from lowmembp_convert import convert


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("norms", ["share", "fold"])
@pytest.mark.parametrize("name", ["llama", "timm_vit"])
def test_converting_twice_changes_nothing_the_second_time(name: str, norms: str) -> None:
    family = FAMILIES[name]
    original = family.make()
    model = convert(copy.deepcopy(original), norms=norms)
    first = model.lowmembp_report
    assert first.changed
    state, modules = _state(model), [type(m) for m in model.modules()]
    convert(model, norms=norms)
    second = model.lowmembp_report
    assert second is not first
    assert (second.changed, second.converted_norms, second.converted_activations) == (False, 0, 0)
    assert "nothing to convert" in str(second)
    assert [type(m) for m in model.modules()] == modules
    after = _state(model)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    x = family.inputs(0, 2)
    with torch.no_grad():
        assert relative_error(forward(original, x), forward(model, x)) < 1e-5


def test_a_model_with_nothing_to_convert_gets_a_clear_report() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    state = _state(model)
    assert convert(model) is model
    report = model.lowmembp_report
    assert not report.changed and not report.plan.norms
    # the ReLU is found, and left: it keeps only its output, which the Linear after it keeps anyway
    assert [(s.module, s.action) for s in report.plan.activations] == [("1", "skip")]
    assert "keeps only its output" in report.plan.activations[0].reason
    assert not report.plan.capture.startswith("failed")  # nothing needed the graph: no capture warning
    assert "nothing to convert: no GELU/SiLU module, no foldable LayerNorm/RMSNorm" in str(report)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_a_model_that_cannot_be_traced_stays_stock_with_a_warning() -> None:
    """A plain Sequential says nothing about its inputs: nothing exact can be proven, so the norm and
    the GELU both stay stock (never the 2-bit approximation unasked), each with its reason, and
    convert() warns about it rather than saving nothing silently."""
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    state = _state(model)
    with pytest.warns(UserWarning, match=r"could not capture the graph of Sequential .*2 site\(s\) left stock"):
        convert(model)
    report = model.lowmembp_report
    (site,) = report.plan.norms
    assert site.action == "skip" and "graph capture failed" in site.reason
    (activation,) = report.plan.activations
    assert activation.action == "skip" and activation.reason.startswith("left stock (exact): graph capture failed")
    assert "activations='approx'" in activation.reason, "the reason names the opt-in"
    assert report.plan.capture.startswith("failed: cannot build example inputs for Sequential")
    assert "example_inputs" in report.plan.capture, "the report says how to fix it"
    assert [type(m) for m in model] == [nn.LayerNorm, nn.Linear, nn.GELU, nn.Linear]
    assert (report.converted_norms, report.converted_activations) == (0, 0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_filter_fn_excludes_exactly_what_it_says() -> None:
    family = FAMILIES["llama"]
    original = family.make()
    seen: list[tuple[type, str]] = []

    def not_layer_one(module: nn.Module, fqn: str) -> bool:
        seen.append((type(module), fqn))
        return ".layers.1." not in fqn

    model = convert(copy.deepcopy(original), filter_fn=not_layer_one)
    plan = model.lowmembp_report.plan
    assert (type(original.get_submodule("model.layers.1.mlp.act_fn")), "model.layers.1.mlp.act_fn") in seen
    for site in plan.norms + plan.activations:
        excluded = ".layers.1." in site.module
        assert (site.action == "skip") == excluded, site
        assert (site.reason == "excluded by filter_fn") == excluded, site
    layer1, layer1_orig = model.model.layers[1], original.model.layers[1]
    assert [type(m) for m in layer1.modules()] == [type(m) for m in layer1_orig.modules()]
    assert all(torch.equal(a, b) for a, b in zip(layer1.parameters(), layer1_orig.parameters(), strict=True))
    assert getattr(model.model.layers[0].input_layernorm, "lowmembp_converted", False)
    assert model.lowmembp_report.plan.activations[0].option == "recompute"
    assert getattr(model.model.layers[0].mlp, "lowmembp_recompute", ()), "layer 0's MLP recomputes its activation"
    x = family.inputs(0, 2)
    with torch.no_grad():
        assert relative_error(forward(original, x), forward(model, x)) < 1e-5


def test_filter_fn_receives_modules_so_a_type_filter_works() -> None:
    original = FAMILIES["gpt2"].make()
    model = convert(copy.deepcopy(original), filter_fn=lambda m, fqn: not is_activation_module(m))
    report = model.lowmembp_report
    assert report.converted_activations == 0 and report.converted_norms == 5
    assert all(a.reason == "excluded by filter_fn" for a in report.plan.activations)


# --------------------------------------------------------------------------------------------------
# Tied embeddings
# --------------------------------------------------------------------------------------------------


def _tied(name: str) -> tuple[nn.Module, str, str, str]:
    """(model, final norm, embedding param, lm_head param) with lm_head.weight tied to the embedding."""
    import transformers

    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        model, norm, embedding = transformers.GPT2LMHeadModel(config), "transformer.ln_f", "transformer.wte.weight"
    else:
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
        model, norm, embedding = transformers.LlamaForCausalLM(config), "model.norm", "model.embed_tokens.weight"
    model = randomize_affine(model).eval()
    assert model.lm_head.weight is model.get_parameter(embedding), "the factory ties the weights"
    return model, norm, embedding, "lm_head.weight"


def _logits_only_inputs() -> tuple[tuple, dict]:
    """Inputs under which the final norm's output is not itself a model output (no hidden states)."""
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    return (), {"input_ids": ids, "use_cache": False}


@pytest.mark.parametrize("norms", ["share", "fold"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_tied_embedding_is_never_touched_by_default(name: str, norms: str) -> None:
    """Without untie_embeddings: the default folds nothing at all; norms="fold" keeps the final norm's
    affine (its output is a model output), so the tied head is not folded into either."""
    model, norm, embedding, head = _tied(name)
    original = copy.deepcopy(model)
    # default example inputs return every hidden state, the last one being the final norm's output
    convert(model, norms=norms)
    site = model.lowmembp_report.plan.norm(norm)
    assert site.action == "keep_affine"
    if norms == "fold":
        assert "returned from the model's forward" in site.reason
    # user inputs asking for logits only: hidden states are still protected (a user may ask for them later)
    convert(original_copy := copy.deepcopy(original), example_inputs=_logits_only_inputs(), norms=norms)
    site = original_copy.lowmembp_report.plan.norm(norm)
    assert site.action == "keep_affine"
    if norms == "fold":
        assert "returned from the model's forward" in site.reason
    for converted in (model, original_copy):
        assert converted.get_parameter(head) is converted.get_parameter(embedding)
        assert torch.equal(converted.get_parameter(embedding), original.get_parameter(embedding))
        assert converted.config.tie_word_embeddings
        if norms == "share":  # nothing reparameterized anywhere
            assert _state(converted).keys() == _state(original).keys()
            assert all(torch.equal(v, original.state_dict()[k]) for k, v in _state(converted).items())


def _roberta_mlm() -> nn.Module:
    import transformers

    config = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = randomize_affine(transformers.RobertaForMaskedLM(config)).eval()
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight
    return model


def test_untie_embeddings_folds_into_a_copy_of_the_head() -> None:
    """A masked-LM head's norm feeds only the tied decoder: untying lets it fold, the embedding untouched."""
    model = _roberta_mlm()
    original = copy.deepcopy(model)
    embedding, head = "roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight"
    convert(model, untie_embeddings=True, norms="fold")
    report = model.lowmembp_report
    site = report.plan.norm("lm_head.layer_norm")
    assert site.action == "fold" and [c.module for c in site.consumers] == ["lm_head.decoder"]
    assert model.get_parameter(head) is not model.get_parameter(embedding)
    assert torch.equal(model.get_parameter(embedding), original.get_parameter(embedding)), "embedding untouched"
    assert model.config.tie_word_embeddings is False
    assert any(note.startswith("untied lm_head.decoder.weight") for note in report.notes)
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert relative_error(original(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-5


@pytest.mark.parametrize("norms", ["share", "fold"])
def test_tied_masked_lm_head_is_not_untied_by_default(norms: str) -> None:
    model = _roberta_mlm()
    original = copy.deepcopy(model)
    convert(model, norms=norms)
    site = model.lowmembp_report.plan.norm("lm_head.layer_norm")
    assert site.action == "keep_affine"
    if norms == "fold":  # it would fold but for the tie
        assert "(tied or reused weights)" in site.reason
    assert not any(note.startswith("untied") for note in model.lowmembp_report.notes)
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight
    assert torch.equal(model.lm_head.decoder.weight, original.lm_head.decoder.weight)


def test_untie_embeddings_does_not_override_a_returned_hidden_state() -> None:
    """With the default example inputs (all hidden states returned) the final norm stays exact."""
    model, norm, embedding, head = _tied("gpt2")
    convert(model, untie_embeddings=True, norms="fold")
    assert model.lowmembp_report.plan.norm(norm).action == "keep_affine"
    assert model.get_parameter(head) is model.get_parameter(embedding)
