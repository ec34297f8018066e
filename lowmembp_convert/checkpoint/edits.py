"""From a plan to tensor edits: which checkpoint tensors change, and how each is computed.

Every edit names the *input* tensors it reads, so a shard is written without holding the others:

- ``FoldScale``: consumer weight W' = W * gamma along its input-channel axis (gamma = w + offset);
- ``FoldShift``: consumer bias b' = b + W @ beta (W is the *original* weight, read from the input);
- ``Fill``: a folded norm's own weight or bias set to identity (1, or 0 for 1+w norms; bias 0).

A fold moves the whole affine: a norm with a bias folds it too (the planner keeps the affine in the
norm when some consumer cannot take the shift), so no bias is ever left behind in a folded norm.

Both halves of a fold read only original tensors, so the order in which shards are written and the
shard each tensor lives in do not matter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..plan import ConsumerLayout, NormSite, Plan
from ..rewrites.folding import fold_affine_into
from ..rewrites.norms import is_identity_affine
from .errors import CheckpointError
from .load import KeyMap
from .store import FOLDABLE_DTYPES, TensorStore


@dataclass(frozen=True)
class FoldScale:
    """W' = W * (gamma + offset), gamma along W's input-channel axis."""

    weight: str  # input key of the consumer weight
    gamma: str  # input key of the norm weight
    offset: float
    layout: ConsumerLayout
    groups: int = 1  # convolution groups ("conv" layout)


@dataclass(frozen=True)
class FoldShift:
    """b' = b + W @ beta with the consumer's original weight W."""

    bias: str
    weight: str
    beta: str
    layout: ConsumerLayout
    groups: int = 1


@dataclass(frozen=True)
class Fill:
    """The tensor ``source`` with every element set to ``value``."""

    source: str
    value: float


TensorEdit = FoldScale | FoldShift | Fill


@dataclass
class EditPlan:
    """The changes to a checkpoint, keyed by output tensor name."""

    edits: dict[str, TensorEdit] = field(default_factory=dict)
    added: dict[str, str] = field(default_factory=dict)  # new output key -> input key whose shard it joins
    folded: list[str] = field(default_factory=list)  # norm modules folded by this run
    already_folded: list[str] = field(default_factory=list)  # norm modules whose affine was identity
    untied: list[str] = field(default_factory=list)  # consumer weights given their own (folded) copy
    sites: list[dict] = field(default_factory=list)  # one entry per norm, for the report


def _key(keymap: KeyMap, store: TensorStore, name: str, what: str) -> str:
    if name in keymap.converted:
        raise CheckpointError(
            store.layout.path,
            f"{what} {name!r} is assembled from several checkpoint tensors when the model loads (fused or "
            "stacked weights), so it cannot be edited in the file",
            "load the model and use lowmembp_convert.convert, then save_pretrained",
        )
    key = keymap(name)
    if key not in store:
        raise CheckpointError(
            store.layout.path,
            f"{what} {name!r} (checkpoint key {key!r}) is not in the checkpoint",
            "pass the --arch this checkpoint was saved from",
        )
    return key


def _foldable(store: TensorStore, key: str) -> None:
    dtype = store.entries[key].dtype
    if dtype not in FOLDABLE_DTYPES:
        raise CheckpointError(
            store.path_of(store.entries[key].shard),
            f"tensor {key!r} has dtype {dtype}, which cannot be folded (only float64/float32/float16/bfloat16)",
            "convert the unquantized floating-point checkpoint",
        )


def _stored_aliases(name: str, keymap: KeyMap, store: TensorStore, tied: dict[str, list[str]], what: str) -> list[str]:
    """Every checkpoint key that holds the parameter ``name`` (a bias tied within a head is stored
    under one of its names; all stored copies must change together)."""
    keys = [keymap(alias) for alias in tied.get(name, [name])]
    found = list(dict.fromkeys(k for k in keys if k in store))
    return found or [_key(keymap, store, name, what)]


def _consumer_source(
    name: str, keymap: KeyMap, store: TensorStore, tied: dict[str, list[str]], untie: bool
) -> tuple[str, str]:
    """(output key, input key) of a consumer weight; they differ when a tied copy is created."""
    if name in keymap.converted:
        _key(keymap, store, name, "consumer weight")  # raises: not editable 1:1
    out_key = keymap(name)
    if name in tied and not untie:
        raise CheckpointError(
            store.layout.path,
            f"consumer weight {name!r} is tied to {[n for n in tied[name] if n != name]} and the plan folds into it",
            "pass --untie-embeddings to give it its own copy",
        )
    if out_key in store:
        return out_key, out_key
    for alias in tied.get(name, []):
        if keymap(alias) in store:
            return out_key, keymap(alias)
    return out_key, _key(keymap, store, name, "consumer weight")


def edits_from_plan(
    plan: Plan, keymap: KeyMap, store: TensorStore, tied: dict[str, list[str]], untie: bool = False
) -> EditPlan:
    """Turn the norm sites of ``plan`` into tensor edits on ``store``'s keys.

    Args:
        plan: the analysis of the model skeleton (parameter names are model-level).
        keymap: model parameter name -> checkpoint key.
        store: the input checkpoint.
        tied: :func:`.load.tied_groups` of the skeleton.
        untie: tied consumer weights may be given their own folded copy.
    Raises:
        CheckpointError: a needed tensor is missing, has a dtype that cannot be folded, two folds
            would write the same tensor (a weight shared by two norms), or the plan breaks the fold
            contract (a fold that leaves the norm's bias behind).
    """
    result = EditPlan()
    for site in plan.norms:
        entry = {
            "module": site.module,
            "action": site.action,
            "already_folded": site.already_folded,
            "reason": site.reason,
            "consumers": [c.module for c in site.consumers],
        }
        result.sites.append(entry)
        if site.action != "fold":
            continue
        _check_fold_contract(site, store)
        for name in (site.weight, site.bias):
            if name:
                _foldable(store, _key(keymap, store, name, "norm parameter"))
        if site.already_folded or _is_identity(site, keymap, store):
            result.already_folded.append(site.module)
            entry["already_folded"] = True
            continue
        _fold_site(site, keymap, store, tied, untie, result)
        result.folded.append(site.module)
    if result.untied:
        _materialize_tied_copies(keymap, store, tied, result)
    return result


def _materialize_tied_copies(keymap: KeyMap, store: TensorStore, tied: dict[str, list[str]], result: EditPlan) -> None:
    """With ``tie_word_embeddings=false`` the library stops filling tied names the file omits
    (e.g. BERT's ``cls.predictions.decoder.bias``), so store each of them, with its group's edit."""
    for group in {tuple(names) for names in tied.values()}:
        keys = list(dict.fromkeys(keymap(name) for name in group))
        stored = [k for k in keys if k in store]
        if not stored:
            continue
        edited = next((result.edits[k] for k in stored if k in result.edits), None)
        for key in keys:
            if key in store or key in result.added:
                continue
            result.added[key] = stored[0]
            if edited is not None:
                result.edits[key] = edited


def _check_fold_contract(site: NormSite, store: TensorStore) -> None:
    """A fold carries the norm's whole affine: its bias moves into the consumers with its weight.

    Folding the weight alone would leave a bias that must become beta / gamma in the norm (ill-
    conditioned for small gamma); the planner keeps the affine instead, so such a plan is a bug.
    """
    if site.bias and not site.fold_bias:
        raise CheckpointError(
            store.layout.path,
            f"internal error: the plan folds norm {site.module} but leaves its bias {site.bias!r} behind "
            "(action 'fold' with fold_bias False); a fold must move the bias too",
            "report this as a bug in lowmembp_convert; a planner must choose 'keep_affine' for this norm",
        )


def _is_identity(site: NormSite, keymap: KeyMap, store: TensorStore) -> bool:
    """True when the checkpoint's own values make the affine identity already (a converted checkpoint).

    The analysis cannot tell on a meta-device skeleton, so the (small) norm vectors are read here.
    """
    weight = store.get(_key(keymap, store, site.weight, "norm weight")) if site.weight else None
    bias = store.get(_key(keymap, store, site.bias, "norm bias")) if site.bias else None
    return is_identity_affine(weight, bias, site.weight_offset)


def _claim(result: EditPlan, key: str, edit: TensorEdit, site: NormSite, store: TensorStore) -> None:
    if key in result.edits:
        raise CheckpointError(
            store.layout.path,
            f"tensor {key!r} would be changed twice (norm {site.module} shares it with another fold)",
            "convert this model in Python with lowmembp_convert.convert, which keeps shared weights intact",
        )
    result.edits[key] = edit


def _fold_site(
    site: NormSite, keymap: KeyMap, store: TensorStore, tied: dict[str, list[str]], untie: bool, result: EditPlan
) -> None:
    gamma = _key(keymap, store, site.weight, "norm weight") if site.weight else None
    beta = _key(keymap, store, site.bias, "norm bias") if site.bias else None
    for key in (gamma, beta):
        if key is not None:
            _foldable(store, key)
    for consumer in site.consumers:
        out_key, source = _consumer_source(consumer.weight, keymap, store, tied, untie)
        _foldable(store, source)
        groups = int(getattr(consumer, "groups", 1))
        _check_channels(store, site, source, consumer.layout, groups, [k for k in (gamma, beta) if k is not None])
        if out_key != source:
            result.added[out_key] = source
        if consumer.weight in tied and consumer.weight not in result.untied:
            result.untied.append(consumer.weight)
        if gamma is not None:
            _claim(result, out_key, FoldScale(source, gamma, site.weight_offset, consumer.layout, groups), site, store)
        if beta is not None:
            if consumer.bias is None:
                raise CheckpointError(
                    store.layout.path,
                    f"plan folds the bias of {site.module} into {consumer.module}, which has no bias",
                    "report this as a bug in lowmembp_convert",
                )
            for bias_key in _stored_aliases(consumer.bias, keymap, store, tied, "consumer bias"):
                _foldable(store, bias_key)
                _claim(result, bias_key, FoldShift(bias_key, source, beta, consumer.layout, groups), site, store)
    if gamma is not None:
        _claim(result, gamma, Fill(gamma, 0.0 if site.weight_offset else 1.0), site, store)
    if beta is not None:
        _claim(result, beta, Fill(beta, 0.0), site, store)


def _check_channels(
    store: TensorStore, site: NormSite, weight: str, layout: ConsumerLayout, groups: int, vectors: list[str]
) -> None:
    shape = store.entries[weight].shape
    if layout == "conv":
        channels = shape[1] * groups if len(shape) >= 2 else None
    else:
        channels = shape[1 if layout == "linear" else 0] if len(shape) == 2 else None
    for key in vectors:
        if channels is None or store.entries[key].shape != (channels,):
            raise CheckpointError(
                store.layout.path,
                f"norm {site.module}: {key!r} has shape {list(store.entries[key].shape)} but consumer weight "
                f"{weight!r} has shape {list(shape)} ({layout} layout)",
                "pass the --arch (and --model-kwargs) this checkpoint was saved with",
            )


# rows per block are chosen so one block holds about this many elements (64 MiB in float64)
BLOCK_ELEMENTS = 1 << 23


def _row_blocks(rows: int, row_elements: int) -> Iterator[tuple[int, int]]:
    step = max(1, BLOCK_ELEMENTS // max(1, row_elements))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def edit_blocks(edit: TensorEdit, store: TensorStore) -> Iterator[torch.Tensor]:
    """The new value of one edited tensor as consecutive row blocks, in row-major order.

    A 2-D consumer weight is read, folded and yielded one block of rows at a time (``linear``: rows
    are output channels, every row scaled by gamma; ``conv1d``: rows are input channels, row i
    scaled by gamma[i]), so folding an [11008, 4096] weight needs memory for a block, not the weight.
    The math is ``fold_affine_into``'s (float64, one rounding to the input dtype).
    """
    if isinstance(edit, Fill):
        entry = store.entries[edit.source]
        yield torch.full(entry.shape, edit.value, dtype=store.torch_dtype(edit.source))
        return
    shape = store.entries[edit.weight].shape
    blockwise = edit.layout in ("linear", "conv1d") and len(shape) == 2
    if isinstance(edit, FoldScale):
        gamma = store.get(edit.gamma).to(torch.float64) + edit.offset  # 1+w summed in float64, not bf16
        if not blockwise:
            yield fold_affine_into(store.get(edit.weight), None, gamma, None, edit.layout, edit.groups)[0]
            return
        for start, stop in _row_blocks(shape[0], shape[1]):
            rows = store.get_rows(edit.weight, start, stop)
            row_gamma = gamma if edit.layout == "linear" else gamma[start:stop]
            yield fold_affine_into(rows, None, row_gamma, None, edit.layout)[0]
        return
    bias, beta = store.get(edit.bias), store.get(edit.beta)
    if not blockwise:
        new_bias = fold_affine_into(store.get(edit.weight), bias, None, beta, edit.layout, edit.groups)[1]
        assert new_bias is not None
        yield new_bias
        return
    if edit.layout == "linear":  # b'[rows] = b[rows] + W[rows] @ beta
        for start, stop in _row_blocks(shape[0], shape[1]):
            rows = store.get_rows(edit.weight, start, stop)
            new_bias = fold_affine_into(rows, bias[start:stop], None, beta, "linear")[1]
            assert new_bias is not None
            yield new_bias
        return
    shift = torch.zeros(shape[1], dtype=torch.float64)  # conv1d: b' = b + sum over row blocks of beta @ W
    for start, stop in _row_blocks(shape[0], shape[1]):
        rows = store.get_rows(edit.weight, start, stop)
        shift = fold_affine_into(rows, shift, None, beta[start:stop], "conv1d")[1]
    yield (bias.to(torch.float64) + shift).to(bias.dtype)


def compute_edit(edit: TensorEdit, store: TensorStore) -> torch.Tensor:
    """The whole new value of one edited tensor (for writers that need it in one piece)."""
    blocks = list(edit_blocks(edit, store))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def edit_inputs(edit: TensorEdit) -> list[str]:
    """The input keys an edit reads."""
    if isinstance(edit, Fill):
        return []
    if isinstance(edit, FoldScale):
        return [edit.weight, edit.gamma]
    return [edit.bias, edit.weight, edit.beta]
