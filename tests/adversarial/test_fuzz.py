"""The seeded fuzzer: random small models, each converted and held to the rule (see rule.py).

Every seed is a test id (``test_random_model_keeps_the_rule[norms-seed]``), so a failure names the
seed that reproduces it: ``FuzzModel(seed)``. Bugs it found are kept as named tests in this folder.
Every seed converts twice: with the default ``norms="share"`` (the stock parameters: the rule also
checks the stock state dict, forward hooks added on every module after converting, and a few SGD
steps next to stock) and with ``norms="fold"`` (the folds
through towers, loops and shared weights). A third of the seeds leave the activations alone, a third
take the default ``activations="auto"`` (exact: input and parameter gradients are compared in both
cases), a third the paper's ``"approx"`` (forward compared; its backward is approximate by design).
Three seeds in four run with ``verify=False``: the analysis alone must be right (verification would
turn its mistakes into refusals, which is the safety net, not the proof); the fourth checks the net.
"""

from __future__ import annotations

import pytest
from fuzz_models import FuzzModel, example_inputs, with_lora
from rule import convert_checked

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/adversarial/conftest.py

SEEDS = range(300)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norms", ["share", "fold"])
def test_random_model_keeps_the_rule(norms: str, seed: int) -> None:
    model = FuzzModel(seed)
    activations = (False, True, "approx")[seed % 3]
    result = convert_checked(model, example_inputs(seed), norms=norms, activations=activations, verify=seed % 4 == 0)
    # with verify off nothing may be refused; with it on, a refusal would mean the analysis was wrong
    assert not isinstance(result, Exception), f"seed {seed}: convert() raised {type(result).__name__}: {result}"


@pytest.mark.parametrize("seed", range(0, 300, 5))
def test_random_model_with_lora_adapters_keeps_the_rule(seed: int) -> None:
    """The same models with PEFT LoRA injected (wider adapters, dropout, shared and frozen layers),
    converted exactly (activations off, or the exact recompute through LoRA consumers): outputs,
    input and parameter gradients as before. Even seeds fold (into lora_A too), odd seeds keep the
    affine (the default) or leave norms alone."""
    pytest.importorskip("peft")
    model = with_lora(FuzzModel(seed), seed)
    activations = "recompute" if seed % 10 == 5 else False  # exact either way: gradients are compared
    norms = "fold" if seed % 2 == 0 else ("share" if seed % 4 == 1 else False)
    result = convert_checked(
        model, example_inputs(seed), activations=activations, norms=norms, verify=False, grad_exact=True
    )
    assert not isinstance(result, Exception), f"seed {seed}: convert() raised {type(result).__name__}: {result}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(300, 1200))
def test_more_random_models_with_lora_recompute_and_verify(seed: int) -> None:
    """The slow set's wider sweep (it found the verify refusal of seed 882): LoRA on every third
    seed, the exact recompute on LoRA seeds and every fifth, verify on every seventh; even seeds fold,
    odd ones keep the affine (the default; LoRA seeds: every other one leaves norms alone)."""
    lora = seed % 3 == 0
    if lora:
        pytest.importorskip("peft")
    model = with_lora(FuzzModel(seed), seed) if lora else FuzzModel(seed)
    activations = "recompute" if lora or seed % 5 == 0 else (False, True, "approx")[(seed // 3) % 3]
    norms = "fold" if seed % 2 == 0 else ("share" if not lora or seed % 4 == 1 else False)
    result = convert_checked(
        model,
        example_inputs(seed),
        activations=activations,
        norms=norms,
        verify=seed % 7 == 0,
        grad_exact=activations != "approx",
    )
    assert not isinstance(result, Exception), f"seed {seed}: convert() raised {type(result).__name__}: {result}"
