"""The model skeleton a checkpoint belongs to, built on the ``meta`` device (no weights, no memory).

The analysis (``plan_conversion``) needs the model's structure only, so the converter builds it
from ``config.json`` (transformers) or a timm model name with every parameter on ``meta``; a
7B-parameter model costs nothing to build. This module also maps the model's parameter names to the
checkpoint's keys (a checkpoint saved from the base model lacks the ``model.`` prefix, a DDP one has
``module.``) and lists which parameters are tied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from ..optional import optional_import
from .errors import CheckpointError
from .formats import CONFIG_FILE, CheckpointLayout, read_json

Library = Literal["transformers", "timm"]


@dataclass
class MetaModel:
    """A model skeleton on the meta device and how it was built (to rebuild it for --verify)."""

    model: nn.Module
    library: Library
    arch: str  # transformers class name or timm model name
    config_dir: Path | None = None  # transformers config directory
    # timm: create_model kwargs; transformers (--arch config directory): config attribute overrides
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def _unknown_arch(path: Path | str, what: str) -> CheckpointError:
    return CheckpointError(
        path,
        f"unknown architecture {what}",
        "pass --arch with a timm model name (see timm.list_models()) or a transformers config directory "
        "whose architecture this transformers version supports (trust_remote_code models: convert in "
        "Python with lowmembp_convert.convert)",
    )


def build_meta_model(
    layout: CheckpointLayout,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    checkpoint_keys: set[str] | None = None,
) -> MetaModel:
    """Build the skeleton for ``layout``: from its config.json, or from ``arch`` for a bare state dict.

    A transformers config without ``architectures`` gets the Auto class whose parameter names best
    match ``checkpoint_keys`` (causal LM, masked LM, image classification, base model...).

    Raises:
        CheckpointError: no architecture given for a bare state dict, or an unknown one.
    """
    model_kwargs = dict(model_kwargs or {})
    if layout.kind == "transformers" and arch is None:
        if model_kwargs:
            raise CheckpointError(
                layout.path,
                f"--model-kwargs {json.dumps(model_kwargs)} does not apply to a transformers model directory: "
                "its config.json defines the model, and the output keeps that config",
                "drop --model-kwargs (edit config.json in a copy of the directory if it is wrong); "
                "--model-kwargs sets timm create_model arguments, or config attributes with --arch CONFIG_DIR",
            )
        return _build_transformers(layout.path, layout.path, checkpoint_keys)
    if layout.kind == "timm" and arch is None:
        config = layout.config or {}
        kwargs = dict(config.get("model_args") or {})
        if "num_classes" in config:
            kwargs.setdefault("num_classes", config["num_classes"])
        kwargs.update(model_kwargs)
        return _build_timm(layout.path, str(config["architecture"]), kwargs)
    if arch is None:
        raise CheckpointError(
            layout.path,
            "a bare state dict does not say which model it belongs to",
            "pass --arch NAME (a timm model name such as vit_base_patch16_224, or a transformers config directory)",
        )
    if os.path.isdir(arch):
        if not os.path.isfile(os.path.join(arch, CONFIG_FILE)):
            raise CheckpointError(arch, "--arch directory has no config.json", "pass a transformers config directory")
        return _build_transformers(Path(arch), layout.path, checkpoint_keys, model_kwargs)
    return _build_timm(layout.path, arch, model_kwargs)


_AUTO_CLASSES = (
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForImageClassification",
    "AutoModelForSequenceClassification",
    "AutoModel",
)


def _best_auto_model(config: Any, checkpoint_keys: set[str] | None) -> nn.Module:
    import transformers

    best, best_score = None, -1
    for name in _AUTO_CLASSES:
        try:
            with torch.device("meta"):
                model = getattr(transformers, name).from_config(config)
        except (ValueError, KeyError, AttributeError):
            continue
        if checkpoint_keys is None:
            return model
        score = sum(k in checkpoint_keys for k in model.state_dict())
        if score > best_score:
            best, best_score = model, score
    if best is None:
        raise ValueError("no Auto class accepts this config")
    return best


def load_transformers_config(config_dir: Path, ckpt_path: Path, overrides: dict[str, Any] | None = None) -> Any:
    """``AutoConfig.from_pretrained(config_dir)`` with ``overrides`` set as config attributes.

    Raises:
        CheckpointError: unknown model type, or an override that names no attribute of the config.
    """
    from transformers import AutoConfig

    overrides = dict(overrides or {})
    if isinstance(overrides.get("num_labels"), int) and "id2label" not in overrides:
        # the saved id2label would contradict the new head size: default names, as transformers gives them
        overrides["id2label"] = {i: f"LABEL_{i}" for i in range(overrides["num_labels"])}
        overrides.setdefault("label2id", {v: k for k, v in overrides["id2label"].items()})
    try:
        config, unused = AutoConfig.from_pretrained(str(config_dir), return_unused_kwargs=True, **overrides)
    except (ValueError, KeyError, OSError) as exc:
        model_type = read_json(config_dir / CONFIG_FILE).get("model_type", "?")
        raise _unknown_arch(ckpt_path, f"(model_type {model_type!r} unknown to transformers)") from exc
    if unused:
        raise CheckpointError(
            ckpt_path,
            f"--model-kwargs {json.dumps(unused)}: no such attribute in the {type(config).__name__} of {config_dir}",
            "pass config attributes only (e.g. '{\"num_labels\": 10}')",
        )
    return config


def _build_transformers(
    config_dir: Path,
    ckpt_path: Path,
    checkpoint_keys: set[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> MetaModel:
    import transformers

    config = load_transformers_config(config_dir, ckpt_path, overrides)
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if names and cls is None:
        raise _unknown_arch(ckpt_path, f"{names[0]!r} (not a transformers class)")
    if cls is None:
        try:
            model = _best_auto_model(config, checkpoint_keys)
        except ValueError as exc:
            raise _unknown_arch(ckpt_path, f"(config.json names no architectures and {exc})") from exc
    else:
        with torch.device("meta"):
            model = cls._from_config(config)
    return MetaModel(
        model, "transformers", type(model).__name__, config_dir=config_dir, model_kwargs=dict(overrides or {})
    )


def _build_timm(ckpt_path: Path, name: str, kwargs: dict[str, Any]) -> MetaModel:
    timm = optional_import("timm")  # installed but broken: raises with the cause, never "needs timm"
    if timm is None:
        raise CheckpointError(ckpt_path, f"--arch {name!r} needs timm", "pip install timm")
    if not timm.is_model(name):
        raise _unknown_arch(ckpt_path, f"{name!r} (neither a timm model name nor a directory)")
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise CheckpointError(ckpt_path, f"timm {name!r} rejects {kwargs} ({exc})", "fix --model-kwargs") from exc
    sync_timm_input_size(model, kwargs)
    return MetaModel(model, "timm", name, model_kwargs=kwargs)


def sync_timm_input_size(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Make ``pretrained_cfg['input_size']`` follow an ``img_size`` override (timm keeps the default),
    so example inputs built from it fit the model."""
    size = kwargs.get("img_size")
    cfg = getattr(model, "pretrained_cfg", None)
    if size is None or not isinstance(cfg, dict) or "input_size" not in cfg:
        return
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    channels = int(kwargs.get("in_chans", cfg["input_size"][0]))
    model.pretrained_cfg = {**cfg, "input_size": (channels, h, w)}


def tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """For every parameter shared under several names: name -> all its names (itself included)."""
    from ..naming import param_names

    return {name: names for names in param_names(model).values() if len(names) > 1 for name in names}


@dataclass(frozen=True)
class KeyMap:
    """Model parameter name -> checkpoint key.

    ``table`` holds every model tensor found in the checkpoint; other names (a tied weight the
    checkpoint omits) go through ``fallback``. ``converted`` lists model tensors that the library
    assembles from several checkpoint tensors on load (fused or stacked): those cannot be edited 1:1.
    """

    rule: str
    table: dict[str, str]
    fallback: Callable[[str], str]
    converted: frozenset[str] = frozenset()
    model_keys: int = 0

    @property
    def matched(self) -> int:
        return len(self.table)

    def __call__(self, name: str) -> str:
        return self.table.get(name) or self.fallback(name)


def _prefix_rules(model: nn.Module) -> list[tuple[str, Callable[[str], str]]]:
    prefixes = {"module.", "_orig_mod."}
    base = getattr(model, "base_model_prefix", "") or ""
    if base:
        prefixes.add(base + ".")
    rules: list[tuple[str, Callable[[str], str]]] = [("identity", lambda k: k)]
    for prefix in sorted(prefixes):
        rules.append((f"strip {prefix!r}", lambda k, p=prefix: k[len(p) :] if k.startswith(p) else k))
        rules.append((f"add {prefix!r}", lambda k, p=prefix: p + k))
    return rules


def _transformers_key_map(model: nn.Module, checkpoint_keys: set[str], model_keys: list[str]) -> KeyMap | None:
    """The mapping ``from_pretrained`` itself applies (transformers >= 5 renames legacy keys on load)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:  # transformers itself imported already: an older version without this API
        return None
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # private API: any change there falls back to the prefix rules
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = dict.fromkeys(model_keys, True)
    prefix = getattr(model, "base_model_prefix", None)
    table: dict[str, str] = {}
    converted: set[str] = set()
    for key in sorted(checkpoint_keys, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, pattern = key, None
        if renamed not in meta_state:
            continue
        if pattern is not None:
            converted.add(renamed)
        elif renamed not in table:
            table[renamed] = key
    if not transforms:
        return None if not table else KeyMap("transformers loading", table, lambda k: k, frozenset(), len(model_keys))
    return KeyMap("transformers key mapping", table, lambda k: k, frozenset(converted), len(model_keys))


def match_keys(model: nn.Module, checkpoint_keys: set[str], path: Path, library: Library = "timm") -> KeyMap:
    """Map model parameter names to checkpoint keys the way the stock library would load them.

    transformers: its own load-time key mapping (legacy names, base-model prefix). Otherwise the
    prefix rule (none, strip/add ``module.`` / base-model prefix) that finds the most tensors.

    Raises:
        CheckpointError: fewer than half of the model's tensors are found in the checkpoint.
    """
    model_keys = list(model.state_dict().keys())
    candidates: list[KeyMap] = []
    if library == "transformers":
        hf = _transformers_key_map(model, checkpoint_keys, model_keys)
        if hf is not None:
            candidates.append(hf)
    for name, fn in _prefix_rules(model):
        table = {k: fn(k) for k in model_keys if fn(k) in checkpoint_keys}
        candidates.append(KeyMap(name, table, fn, frozenset(), len(model_keys)))
    best = max(candidates, key=lambda m: m.matched + len(m.converted))  # first wins ties: library mapping
    if (best.matched + len(best.converted)) * 2 < max(1, len(model_keys)):
        missing = [k for k in model_keys if k not in best.table][:3]
        raise CheckpointError(
            path,
            f"does not match the architecture: only {best.matched} of {len(model_keys)} model tensors found "
            f"(missing e.g. {', '.join(missing)})",
            "pass the --arch the checkpoint was saved from",
        )
    return best


def _classifier_names(meta: MetaModel) -> set[str]:
    """Parameter names of the classification head (timm's ``pretrained_cfg['classifier']``)."""
    cfg = getattr(meta.model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") if isinstance(cfg, dict) else None
    heads = [heads] if isinstance(heads, str) else list(heads or [])
    return {f"{h}.{p}" for h in heads for p in ("weight", "bias")}


def _shape_fix(meta: MetaModel, kind: str, mismatches: list[tuple[str, tuple, tuple]]) -> str:
    """What to pass so the architecture matches: the head size when only a classifier's rows differ."""
    rows_only = all(len(want) == len(got) >= 1 and want[1:] == got[1:] for _, want, got in mismatches)
    sizes = {got[0] for _, _, got in mismatches}
    if rows_only and len(sizes) == 1:
        n = sizes.pop()
        names = {name for name, _, _ in mismatches}
        if meta.library == "timm" and names <= _classifier_names(meta):
            kwargs = {**meta.model_kwargs, "num_classes": n}
            return f"pass --model-kwargs '{json.dumps(kwargs)}' (the checkpoint's head size)"
        num_labels = getattr(getattr(meta.model, "config", None), "num_labels", None)
        if meta.library == "transformers" and all(want[0] == num_labels for _, want, _ in mismatches):
            if kind == "transformers":
                return f"config.json does not describe these weights: set num_labels to {n} there (or restore it)"
            kwargs = {**meta.model_kwargs, "num_labels": n}
            return f"pass --model-kwargs '{json.dumps(kwargs)}' (the checkpoint's head size)"
    if kind == "transformers":
        return "restore the config.json these weights were saved with"
    return "pass the --arch and --model-kwargs this checkpoint was saved with"


def check_shapes(meta: MetaModel, keymap: KeyMap, shapes: dict[str, tuple[int, ...]], path: Path, kind: str) -> None:
    """Every checkpoint tensor must have the shape the architecture gives it (the stock loaders refuse
    anything else), so a wrong head size or --arch is reported here, before any work.

    Args:
        shapes: checkpoint key -> shape.
        kind: the checkpoint kind (``transformers`` directories are fixed in config.json).
    Raises:
        CheckpointError: naming the first mismatches and, for a classifier head, the --model-kwargs to pass.
    """
    mismatches = []
    for name, tensor in meta.model.state_dict().items():
        key = keymap.table.get(name)
        if key is None or name in keymap.converted or key not in shapes:
            continue
        if tuple(tensor.shape) != tuple(shapes[key]):
            mismatches.append((name, tuple(tensor.shape), tuple(shapes[key])))
    if not mismatches:
        return
    shown = "; ".join(
        f"{n} is {list(got)} in the checkpoint but {list(want)} in the model" for n, want, got in mismatches[:2]
    )
    more = f" (and {len(mismatches) - 2} more)" if len(mismatches) > 2 else ""
    raise CheckpointError(
        path,
        f"does not match {describe_model(meta)}: {shown}{more}",
        _shape_fix(meta, kind, mismatches),
    )


def describe_model(meta: MetaModel) -> str:
    """One line for reports: library, architecture, parameter count."""
    n = sum(p.numel() for p in meta.model.parameters())
    extra = f" {json.dumps(meta.model_kwargs)}" if meta.model_kwargs else ""
    return f"{meta.library} {meta.arch}{extra} ({n / 1e6:.1f}M parameters)"
