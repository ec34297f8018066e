"""Families no issue names: each converts exactly, judged against the stock model, and converts something.

A broad net for the generic mechanism: every model is built from a tiny config with randomised norm
weights and biases and converted with the exact options (norms, both the default ``"share"`` and
``"fold"``, and ``activations="recompute"``);
the test then compares, itself, every output and the gradient reaching the input embedding with a
deep copy of the original (the package's own ``verify`` is on too, but is not the oracle). Each
must end with at least one site converted. Architecture-specific expectations: test_families.py.
"""

import copy

import pytest
import torch
import transformers as tr
from tiny_zoo import assert_exact_conversion, randomize_affine

import lowmembp_convert as lc
from lowmembp_convert.capture import example_inputs_for

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
            max_position_embeddings=64)  # fmt: skip

CASES = {
    "opt": lambda: tr.OPTForCausalLM(tr.OPTConfig(word_embed_proj_dim=64, ffn_dim=128, **TINY)),
    "phi": lambda: tr.PhiForCausalLM(tr.PhiConfig(num_key_value_heads=2, **TINY)),
    "phi3": lambda: tr.Phi3ForCausalLM(tr.Phi3Config(num_key_value_heads=2, pad_token_id=0, **TINY)),
    "mixtral": lambda: tr.MixtralForCausalLM(
        tr.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **TINY)
    ),
    "gpt_neox": lambda: tr.GPTNeoXForCausalLM(tr.GPTNeoXConfig(**TINY)),
    "stablelm": lambda: tr.StableLmForCausalLM(tr.StableLmConfig(num_key_value_heads=2, **TINY)),
    "gemma2": lambda: tr.Gemma2ForCausalLM(tr.Gemma2Config(num_key_value_heads=2, head_dim=16, **TINY)),
    "gptj": lambda: tr.GPTJForCausalLM(tr.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=128)),
    "gpt_bigcode": lambda: tr.GPTBigCodeForCausalLM(
        tr.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=128)
    ),
    "t5": lambda: tr.T5ForConditionalGeneration(
        tr.T5Config(
            d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=128, feed_forward_proj="gated-gelu"
        )
    ),
    "bart": lambda: tr.BartForConditionalGeneration(
        tr.BartConfig(
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            vocab_size=128,
            max_position_embeddings=64,
        )  # fmt: skip
    ),
    "distilbert": lambda: tr.DistilBertForSequenceClassification(
        tr.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=128)
    ),
    "albert": lambda: tr.AlbertForMaskedLM(tr.AlbertConfig(embedding_size=32, **TINY)),
    "deberta_v2": lambda: tr.DebertaV2ForSequenceClassification(tr.DebertaV2Config(**TINY)),
    "dinov2": lambda: tr.Dinov2Model(tr.Dinov2Config(image_size=32, patch_size=8, **TINY)),
    "beit": lambda: tr.BeitForImageClassification(tr.BeitConfig(image_size=32, patch_size=8, **TINY)),
    "swin_hf": lambda: tr.SwinForImageClassification(
        tr.SwinConfig(embed_dim=32, depths=[1, 1], num_heads=[2, 2], window_size=2, image_size=32, patch_size=4)
    ),
}


@pytest.mark.parametrize("norms", ["share", "fold"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_converts_with_identical_outputs(name, norms):
    torch.manual_seed(0)
    original = randomize_affine(CASES[name]())
    model = lc.convert(copy.deepcopy(original), activations="recompute", norms=norms, verify_rtol=1e-5)
    report = model.lowmembp_report
    assert report.changed, str(report)
    if norms == "share":  # the default reparameterizes nothing
        before, after = original.state_dict(), model.state_dict()
        assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    for site in report.plan.norms + report.plan.activations:
        assert site.action != "skip" or site.reason, f"{site.module} skipped without a reason"
    assert_exact_conversion(original, model, example_inputs_for(original, flags=False))
