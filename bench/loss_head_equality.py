"""Loss head equality table: loss, logits and every gradient of the converted model against stock.

For each case the loss head must cover (shifted labels, ``shift_labels``, ``ignore_index``,
``num_items_in_batch``, ``logits_to_keep``, tied embeddings, Gemma 2's final-logit softcapping, the
user's own loss on the logits), on small transformers models built from configs with random norm
weights, for the exact head (the default) and the fused head (``loss_head="fused"``; where the user
reads the logits, the fused head raises by design: "n/a"):

- float32: |loss - stock| / |stock|, logits bit for bit (exact head), max relative gradient difference
  over every parameter (max |g - g_stock| / max |g_stock|, per parameter);
- bfloat16: the same model in bf16 against a float64 copy (the oracle): the loss's relative error, ours
  and stock's (both a few bf16 roundings of the hidden states: the converted blocks round differently
  from stock's, so either may land closer), and the gradient error divided by stock's own (~1: within
  stock's rounding).

    python bench/loss_head_equality.py [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
import warnings

import torch
import transformers as tr

from lowmembp_convert import convert

VOCAB, SEQ = 2000, 24


def _model(family: str, dtype=torch.float32, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=VOCAB)  # fmt: skip
    if family == "gemma2":
        cfg = tr.Gemma2Config(**common, head_dim=8, final_logit_softcapping=30.0, **kwargs)
        model = tr.Gemma2ForCausalLM(cfg)
    else:
        model = tr.LlamaForCausalLM(tr.LlamaConfig(**common, **kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
        if family == "gemma2":  # logits near the cap, so the softcap's tanh matters
            model.lm_head.weight.mul_(40.0)
    return model.to(dtype).train()


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # prompt tokens
    return ids, labels


def _own_loss(out):
    return out.loss + 0.1 * out.logits.float().square().mean()


# name: (family, model kwargs, forward kwargs (from ids, labels), loss from outputs, reads logits)
CASES = {
    "shifted labels": ("llama", {}, lambda i, y: {"labels": y}, None, False),
    # labels must be given for transformers to call the loss; shift_labels then replaces their shift
    "shift_labels": ("llama", {}, lambda i, y: {"labels": y, "shift_labels": torch.roll(y, -2, 1)}, None, False),
    "ignore_index rows": ("llama", {}, lambda i, y: {"labels": y.masked_fill(y % 3 == 0, -100)}, None, False),
    "num_items_in_batch": ("llama", {}, lambda i, y: {"labels": y, "num_items_in_batch": 64}, None, False),
    "logits_to_keep=8": ("llama", {}, lambda i, y: {"labels": y[:, -8:], "logits_to_keep": 8}, None, False),
    "tied embeddings": ("llama", {"tie_word_embeddings": True}, lambda i, y: {"labels": y}, None, False),
    "Gemma 2 softcap": ("gemma2", {}, lambda i, y: {"labels": y}, None, False),
    "user's own loss on logits": ("llama", {}, lambda i, y: {"labels": y}, _own_loss, True),
}


def _step(model, ids, extra, loss_of):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, **extra)
    loss = loss_of(out) if loss_of else out.loss
    loss.backward()
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
    logits = None if type(out.logits).__name__ == "FusedLogits" else out.logits.detach().double()
    return loss.detach().double(), logits, grads


def _rel_grads(g, ref) -> float:
    assert g.keys() == ref.keys(), sorted(g.keys() ^ ref.keys())
    return max(float((g[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)) for n in ref)


def _grad_err(g, oracle) -> float:
    """Max over parameters of max |g - oracle| / max |oracle| (g cast to float64)."""
    return _rel_grads(g, oracle)


def run_case(name: str, mode: str) -> dict:
    family, model_kwargs, forward, loss_of, reads_logits = CASES[name]
    if mode == "fused" and reads_logits:
        return {"case": name, "mode": mode, "na": "the fused head returns no logits while training (raises)"}
    ids, labels = _batch()
    extra = forward(ids, labels)
    row = {"case": name, "mode": mode}
    # float32
    stock = _model(family, **model_kwargs)
    ours = convert(copy.deepcopy(stock), loss_head=mode)
    site = ours.lowmembp_report.plan.loss_heads[0]
    row["taken"] = site.action
    l0, y0, g0 = _step(stock, ids, extra, loss_of)
    l1, y1, g1 = _step(ours, ids, extra, loss_of)
    row["fp32_loss"] = float((l1 - l0).abs() / l0.abs())
    row["fp32_logits_equal"] = None if y1 is None else bool(torch.equal(y0, y1))
    row["fp32_grads"] = _rel_grads(g1, g0)
    # bfloat16 against a float64 oracle
    oracle = _model(family, torch.float64, **model_kwargs)
    stock16 = _model(family, torch.bfloat16, **model_kwargs)
    ours16 = convert(copy.deepcopy(stock16), loss_head=mode)
    lo, _yo, go = _step(oracle, ids, extra, loss_of)
    ls, _ys, gs = _step(stock16, ids, extra, loss_of)
    lc, _yc, gc = _step(ours16, ids, extra, loss_of)
    stock_loss_err, ours_loss_err = float((ls - lo).abs()), float((lc - lo).abs())
    row["bf16_loss_err"] = (ours_loss_err / float(lo.abs()), stock_loss_err / float(lo.abs()))
    row["bf16_grad_ratio"] = _grad_err(gc, go) / max(_grad_err(gs, go), 1e-30)
    return row


def markdown(rows: list[dict]) -> str:
    out = [
        "| case | loss_head | path taken | fp32: loss rel. diff | fp32: logits bit for bit | fp32: max grad rel. diff "
        "| bf16 vs float64: loss rel. error, ours / stock | bf16 vs float64: grad error / stock's |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        if "na" in r:
            out.append(f"| {r['case']} | {r['mode']} | n/a: {r['na']} | | | | | |")
            continue
        logits = "n/a (no logits)" if r["fp32_logits_equal"] is None else ("yes" if r["fp32_logits_equal"] else "NO")
        out.append(
            f"| {r['case']} | {r['mode']} | {r['taken']} | {r['fp32_loss']:.1e} | {logits} | {r['fp32_grads']:.1e} "
            f"| {r['bf16_loss_err'][0]:.1e} / {r['bf16_loss_err'][1]:.1e} | {r['bf16_grad_ratio']:.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    start = time.time()
    rows = [run_case(name, mode) for name in CASES for mode in ("exact", "fused")]
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, transformers "
          f"{tr.__version__}, CPU, 1 thread; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"{time.time() - start:.0f} s")  # fmt: skip
    print("command: python bench/loss_head_equality.py --markdown\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
