"""Sharded checkpoints: shards and index written like the input's, folds that cross shards, tied
embeddings kept or untied on request, and PyTorch .bin shards."""

from __future__ import annotations

import json

import torch
from cli_helpers import cli, first_output, hf_model, model_inputs, rel_err, tree_digest
from safetensors import safe_open


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def test_sharded_round_trip_with_cross_shard_fold(saved_llama, tmp_path, capsys):
    original, src = saved_llama
    digest = tree_digest(src)
    dst = tmp_path / "out"
    code, out, err = cli([src, dst, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)

    index_in, index_out = _index(src), _index(dst)
    shards = sorted(set(index_in["weight_map"].values()))
    assert len(shards) >= 3
    assert sorted(p.name for p in dst.glob("*.safetensors")) == shards
    assert index_out["weight_map"] == index_in["weight_map"]
    assert index_out["metadata"] == index_in["metadata"]

    where = index_in["weight_map"]
    crossing = [
        (site["module"], consumer)
        for site in report["checkpoint"]["norms"]
        if site["module"] in report["checkpoint"]["folded"]
        for consumer in site["consumers"]
        if where[f"{site['module']}.weight"] != where[f"{consumer}.weight"]
    ]
    assert crossing, "the fixture must have a fold whose norm and Linear sit in different shards"

    for shard in shards:
        with safe_open(str(dst / shard), "pt") as f:
            assert json.loads(f.metadata()["lowmembp_convert"])["folded"] == sorted(report["checkpoint"]["folded"])
    assert (dst / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    assert (dst / "extra" / "notes.txt").read_text() == "carried over"

    reloaded = type(original).from_pretrained(dst).eval()
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5
    # tied by default: the embedding (and so the output layer) is never touched
    assert reloaded.config.tie_word_embeddings is True
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert "model.norm" not in report["checkpoint"]["folded"]
    assert tree_digest(src) == digest


def test_untie_embeddings_roberta_sharded(tmp_path, capsys):
    """A masked-LM head's LayerNorm feeds only the decoder, whose weight is tied to the word
    embeddings: with --untie-embeddings it folds, and the decoder gets its own (folded) copy."""
    original = hf_model("roberta", tie=True)
    src, dst = tmp_path / "in", tmp_path / "out"
    original.save_pretrained(src, max_shard_size="40KB")
    index_in = _index(src)
    assert len(set(index_in["weight_map"].values())) >= 2
    assert "lm_head.decoder.weight" not in index_in["weight_map"]  # tied: stored once, as the embedding

    code, out, err = cli([src, dst, "--json", "--untie-embeddings"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert "lm_head.layer_norm" in report["checkpoint"]["folded"], report["checkpoint"]["norms"][-1]
    assert report["checkpoint"]["untied"] == ["lm_head.decoder.weight"]
    # the decoder's bias is tied to lm_head.bias; untied, the library no longer fills it, so it is stored
    assert report["checkpoint"]["added_tensors"] == ["lm_head.decoder.bias", "lm_head.decoder.weight"]

    index_out = _index(dst)
    embed_shard = index_in["weight_map"]["roberta.embeddings.word_embeddings.weight"]
    assert index_out["weight_map"]["lm_head.decoder.weight"] == embed_shard
    assert index_out["weight_map"]["lm_head.decoder.bias"] == index_in["weight_map"]["lm_head.bias"]
    assert {k: v for k, v in index_out["weight_map"].items() if not k.startswith("lm_head.decoder.")} == (
        index_in["weight_map"]
    )
    added = (original.lm_head.decoder.weight.numel() + original.lm_head.decoder.bias.numel()) * 4
    assert index_out["metadata"]["total_size"] == index_in["metadata"]["total_size"] + added
    config = json.loads((dst / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["lowmembp_convert"]["untied"] == ["lm_head.decoder.weight"]

    reloaded = type(original).from_pretrained(dst).eval()
    embeddings = reloaded.roberta.embeddings.word_embeddings.weight
    assert reloaded.lm_head.decoder.weight is not embeddings
    assert torch.equal(embeddings, original.roberta.embeddings.word_embeddings.weight)
    assert torch.all(reloaded.lm_head.layer_norm.weight == 1) and torch.all(reloaded.lm_head.layer_norm.bias == 0)
    assert torch.equal(reloaded.lm_head.decoder.bias, reloaded.lm_head.bias)
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5


def test_untie_embeddings_llama_keeps_final_norm(saved_llama, tmp_path, capsys):
    """A decoder's final norm produces the last hidden state, which the model returns, so it keeps
    its affine even with --untie-embeddings: nothing is untied and the checkpoint stays tied."""
    original, src = saved_llama
    dst = tmp_path / "out"
    code, out, err = cli([src, dst, "--json", "--untie-embeddings"], capsys)
    assert code == 0, err
    report = json.loads(out)
    final = next(site for site in report["checkpoint"]["norms"] if site["module"] == "model.norm")
    assert final["action"] == "keep_affine", final
    assert "returned from the model's forward" in final["reason"]
    assert "model.norm" not in report["checkpoint"]["folded"] and report["checkpoint"]["folded"]
    assert report["checkpoint"]["untied"] == [] and report["checkpoint"]["added_tensors"] == []
    assert _index(dst)["weight_map"] == _index(src)["weight_map"]
    config = json.loads((dst / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["lowmembp_convert"]["untied"] == []
    reloaded = type(original).from_pretrained(dst).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.model.norm.weight, original.model.norm.weight)
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5


def test_untie_embeddings_bert_keeps_tied_bias_consistent(tmp_path, capsys):
    original = hf_model("bert")
    src, dst = tmp_path / "in", tmp_path / "out"
    original.save_pretrained(src)
    code, out, err = cli([src, dst, "--json", "--untie-embeddings"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert "cls.predictions.transform.LayerNorm" in report["checkpoint"]["folded"]
    reloaded = type(original).from_pretrained(dst).eval()
    embeddings = reloaded.bert.embeddings.word_embeddings.weight
    assert torch.equal(embeddings, original.bert.embeddings.word_embeddings.weight)
    assert not torch.equal(reloaded.cls.predictions.decoder.weight, embeddings)
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5


def test_sharded_pytorch_bin(tmp_path, capsys):
    """pytorch_model-0000i-of-0000n.bin + index: converted shard by shard, names kept, loads."""
    original = hf_model("qwen2")
    src, dst = tmp_path / "in", tmp_path / "out"
    original.save_pretrained(src)
    (src / "model.safetensors").unlink()
    state = original.state_dict()
    keys = sorted(state)
    parts = [keys[i::3] for i in range(3)]  # interleaved: norms and their Linears land apart
    weight_map = {}
    for i, part in enumerate(parts, start=1):
        name = f"pytorch_model-{i:05d}-of-00003.bin"
        torch.save({k: state[k].clone() for k in part}, src / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))

    code, out, err = cli([src, dst, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["checkpoint"]["folded"]
    assert sorted(p.name for p in dst.glob("*.bin")) == sorted(set(weight_map.values()))
    assert json.loads((dst / "pytorch_model.bin.index.json").read_text())["weight_map"] == weight_map
    reloaded = type(original).from_pretrained(dst).eval()
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5
