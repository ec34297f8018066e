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
        for site in report["norms"]
        if site["module"] in report["folded"]
        for consumer in site["consumers"]
        if where[f"{site['module']}.weight"] != where[f"{consumer}.weight"]
    ]
    assert crossing, "the fixture must have a fold whose norm and Linear sit in different shards"

    for shard in shards:
        with safe_open(str(dst / shard), "pt") as f:
            assert json.loads(f.metadata()["lowmembp_convert"])["folded"] == sorted(report["folded"])
    assert (dst / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    assert (dst / "extra" / "notes.txt").read_text() == "carried over"

    reloaded = type(original).from_pretrained(dst).eval()
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5
    # tied by default: the embedding (and so the output layer) is never touched
    assert reloaded.config.tie_word_embeddings is True
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert "model.norm" not in report["folded"]
    assert tree_digest(src) == digest


def test_untie_embeddings_llama(saved_llama, tmp_path, capsys):
    original, src = saved_llama
    dst = tmp_path / "out"
    code, out, err = cli([src, dst, "--json", "--untie-embeddings"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert "model.norm" in report["folded"], report["norms"][-1]
    assert report["untied"] == ["lm_head.weight"]
    assert report["added_tensors"] == ["lm_head.weight"]

    index_in, index_out = _index(src), _index(dst)
    embed_shard = index_in["weight_map"]["model.embed_tokens.weight"]
    assert index_out["weight_map"]["lm_head.weight"] == embed_shard
    added = original.lm_head.weight.numel() * 4
    assert index_out["metadata"]["total_size"] == index_in["metadata"]["total_size"] + added
    config = json.loads((dst / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["lowmembp_convert"]["untied"] == ["lm_head.weight"]

    reloaded = type(original).from_pretrained(dst).eval()
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert torch.all(reloaded.model.norm.weight == 1)
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5


def test_untie_embeddings_bert_keeps_tied_bias_consistent(tmp_path, capsys):
    original = hf_model("bert")
    src, dst = tmp_path / "in", tmp_path / "out"
    original.save_pretrained(src)
    code, out, err = cli([src, dst, "--json", "--untie-embeddings"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert "cls.predictions.transform.LayerNorm" in report["folded"]
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
    assert json.loads(out)["folded"]
    assert sorted(p.name for p in dst.glob("*.bin")) == sorted(set(weight_map.values()))
    assert json.loads((dst / "pytorch_model.bin.index.json").read_text())["weight_map"] == weight_map
    reloaded = type(original).from_pretrained(dst).eval()
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5
