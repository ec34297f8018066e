"""The streaming converter against hand-written plans (independent of the graph analysis).

Each plan exercises one rule of turning a plan into tensor edits: untying a tied output layer, a
norm's weight and bias folded together into a conv1d consumer, folds that would write a tensor
twice, tied weights without permission, and a fold that would leave the norm's bias behind.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import first_output, hf_model, model_inputs, rel_err

from lowmembp_convert.checkpoint import CheckpointError, convert_checkpoint
from lowmembp_convert.plan import Consumer, NormSite, Plan


def _linear(module: str) -> Consumer:
    return Consumer(module, f"{module}.weight", None, "linear", True)


def llama_plan(model, config) -> Plan:
    """Fold every norm of the tiny LLaMA, the final one into the (tied) lm_head."""
    plan = Plan(capture="hand-written")
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}"
        attn = tuple(_linear(f"{p}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj"))
        mlp = tuple(_linear(f"{p}.mlp.{n}") for n in ("gate_proj", "up_proj"))
        for norm, consumers in (("input_layernorm", attn), ("post_attention_layernorm", mlp)):
            plan.norms.append(
                NormSite(
                    f"{p}.{norm}", "rms_norm", 1e-6, f"{p}.{norm}.weight", None, consumers=consumers, action="fold"
                )
            )
    action = "fold" if config.untie_embeddings else "keep_affine"
    plan.norms.append(
        NormSite(
            "model.norm", "rms_norm", 1e-6, "model.norm.weight", None, consumers=(_linear("lm_head"),), action=action
        )
    )
    return plan


def test_untie_with_a_hand_written_plan(saved_llama, tmp_path):
    original, src = saved_llama
    report = convert_checkpoint(src, tmp_path / "out", untie_embeddings=True, progress=False, planner=llama_plan)
    assert report.checkpoint.added_tensors == ["lm_head.weight"] and report.checkpoint.untied == ["lm_head.weight"]
    reloaded = type(original).from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.tie_word_embeddings is False
    assert torch.equal(reloaded.model.embed_tokens.weight, original.model.embed_tokens.weight)
    expected = original.lm_head.weight.double() * original.model.norm.weight.double()
    assert torch.equal(reloaded.lm_head.weight, expected.float())
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5


def test_tied_consumer_needs_untie(saved_llama, tmp_path):
    _, src = saved_llama

    def folds_tied(model, config):
        plan = llama_plan(model, config)
        plan.norms[-1].action = "fold"
        return plan

    with pytest.raises(CheckpointError, match="untie-embeddings"):
        convert_checkpoint(src, tmp_path / "out", progress=False, planner=folds_tied)
    assert not (tmp_path / "out").exists()


def test_same_tensor_folded_twice_is_refused(saved_llama, tmp_path):
    _, src = saved_llama

    def clash(model, config):
        plan = llama_plan(model, config)
        first = plan.norms[0]
        plan.norms[1].consumers = first.consumers  # two norms claiming the same q/k/v
        return plan

    with pytest.raises(CheckpointError, match="changed twice"):
        convert_checkpoint(src, tmp_path / "out", progress=False, planner=clash)


def gpt2_ln_1_plan(fold_bias: bool):
    """A planner folding each ln_1 into c_attn (conv1d layout), its bias too only if ``fold_bias``."""

    def planner(model, config) -> Plan:
        plan = Plan(capture="hand-written")
        for i in range(len(model.transformer.h)):
            p = f"transformer.h.{i}"
            consumer = Consumer(f"{p}.attn.c_attn", f"{p}.attn.c_attn.weight", f"{p}.attn.c_attn.bias", "conv1d", True)
            plan.norms.append(
                NormSite(f"{p}.ln_1", "layer_norm", 1e-5, f"{p}.ln_1.weight", f"{p}.ln_1.bias",
                         consumers=(consumer,), action="fold", fold_bias=fold_bias)
            )  # fmt: skip
        return plan

    return planner


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory: pytest.TempPathFactory):
    original = hf_model("gpt2")
    src = tmp_path_factory.mktemp("gpt2") / "in"
    original.save_pretrained(src)
    return original, src


def test_weight_and_bias_fold_into_conv1d(saved_gpt2, tmp_path):
    original, src = saved_gpt2
    report = convert_checkpoint(src, tmp_path / "out", progress=False, planner=gpt2_ln_1_plan(fold_bias=True))
    assert report.checkpoint.folded == ["transformer.h.0.ln_1", "transformer.h.1.ln_1"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["lowmembp_convert"]["folded"] == ["transformer.h.0.ln_1", "transformer.h.1.ln_1"]
    reloaded = type(original).from_pretrained(tmp_path / "out").eval()
    assert torch.all(reloaded.transformer.h[0].ln_1.weight == 1)
    assert torch.all(reloaded.transformer.h[0].ln_1.bias == 0)
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5


def test_fold_leaving_the_bias_in_the_norm_is_an_internal_error(saved_gpt2, tmp_path):
    """The planner folds a norm's bias whenever it folds its weight (else it keeps the affine), so
    a weight-only fold is a broken plan: refused, never written as bias / gamma."""
    _, src = saved_gpt2
    with pytest.raises(CheckpointError, match=r"internal error: .*transformer\.h\.0\.ln_1.*fold_bias False"):
        convert_checkpoint(src, tmp_path / "out", progress=False, planner=gpt2_ln_1_plan(fold_bias=False))
    assert not (tmp_path / "out").exists()


def test_dry_run_writes_nothing(saved_llama, tmp_path):
    _, src = saved_llama
    report = convert_checkpoint(src, tmp_path / "out", dry_run=True, planner=llama_plan)
    assert report.checkpoint.dry_run and report.checkpoint.changed_tensors
    assert list(tmp_path.iterdir()) == []
    # one Report type for convert() and checkpoints: the same class, its text and its JSON
    from lowmembp_convert.report import Report

    assert isinstance(report, Report) and str(report).startswith(f"plan for {src}")
    assert json.loads(report.to_json())["checkpoint"]["changed_tensors"] == report.checkpoint.changed_tensors


class _Entry:
    def __init__(self, shape):
        self.shape = shape


class _Store:
    """The two reads ``edit_blocks`` makes, over a dict of tensors."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.entries = {k: _Entry(tuple(t.shape)) for k, t in tensors.items()}

    def get(self, key):
        return self.tensors[key]

    def get_rows(self, key, start, stop):
        return self.tensors[key][start:stop]


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_blockwise_fold_equals_whole_tensor_fold(layout, monkeypatch):
    from lowmembp_convert.checkpoint import edits
    from lowmembp_convert.rewrites.folding import fold_affine_into

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(41, 9, generator=gen).to(torch.bfloat16)
    channels, outputs = (9, 41) if layout == "linear" else (41, 9)
    gamma, beta = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)
    bias = torch.randn(outputs, generator=gen).to(torch.bfloat16)
    store = _Store({"w": weight, "g": gamma, "b": bias, "beta": beta})
    monkeypatch.setattr(edits, "BLOCK_ELEMENTS", 50)  # several blocks of rows
    assert len(list(edits.edit_blocks(edits.FoldScale("w", "g", 0.0, layout), store))) > 3
    new_weight = edits.compute_edit(edits.FoldScale("w", "g", 0.0, layout), store)
    new_bias = edits.compute_edit(edits.FoldShift("b", "w", "beta", layout), store)
    expected_weight, expected_bias = fold_affine_into(weight, bias, gamma, beta, layout)
    assert torch.equal(new_weight, expected_weight)
    assert torch.equal(new_bias, expected_bias)


def test_failed_capture_is_an_error(saved_llama, tmp_path):
    _, src = saved_llama

    def fails(model, config):
        return Plan(capture="failed: torch.export failed: Unsupported: data-dependent control flow")

    with pytest.raises(CheckpointError, match="could not be traced"):
        convert_checkpoint(src, tmp_path / "out", progress=False, planner=fails)
    assert not (tmp_path / "out").exists()
