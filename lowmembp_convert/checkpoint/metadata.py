"""The conversion record a converted checkpoint carries, and where it is written.

The record (one JSON object under the key ``lowmembp_convert``)::

    {"version": "0.1.0",            # lowmembp_convert version that wrote it
     "format": 1,                   # version of this record's layout
     "architecture": "LlamaForCausalLM",   # class (transformers) or model name (timm) of the plan
     "folded": ["model.layers.0.input_layernorm", ...],   # norm modules whose affine is identity
     "untied": ["lm_head.weight"]}  # consumer weights that got their own copy (tie removed)

It is written to ``config.json`` (read back as ``model.config.lowmembp_convert``), to every
safetensors shard's ``__metadata__`` (as a JSON string; safetensors metadata holds strings only),
and, for PyTorch pickles, to the state dict's ``_metadata`` mapping. Module names are the
model-level names of ``architecture`` (``model.state_dict()`` keys without the parameter suffix).
"""

from __future__ import annotations

import json
from importlib import metadata as importlib_metadata

METADATA_KEY = "lowmembp_convert"
RECORD_FORMAT = 1


def package_version() -> str:
    try:
        return importlib_metadata.version("lowmembp-convert")
    except importlib_metadata.PackageNotFoundError:
        return "0.0.0"


def conversion_record(architecture: str, folded: list[str], untied: list[str], previous: dict | None = None) -> dict:
    """The record for this run, merged with the record the input already carried (if any)."""
    previous = previous or {}
    all_folded = sorted(set(previous.get("folded", [])) | set(folded))
    all_untied = sorted(set(previous.get("untied", [])) | set(untied))
    return {
        "version": package_version(),
        "format": RECORD_FORMAT,
        "architecture": architecture,
        "folded": all_folded,
        "untied": all_untied,
    }


def describe_record(record: dict, limit: int = 3) -> str:
    """The record in one short line: counts and the first few names, not every folded module.

    E.g. ``lowmembp-convert 0.1.0, LlamaForCausalLM: 24 norms folded (model.layers.0.input_layernorm,
    model.layers.0.post_attention_layernorm, model.layers.1.input_layernorm and 21 more)``.
    """

    def some(names: list[str]) -> str:
        shown = ", ".join(names[:limit])
        return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

    folded = [str(n) for n in record.get("folded") or []]
    untied = [str(n) for n in record.get("untied") or []]
    head = f"lowmembp-convert {record.get('version', '?')}"
    if record.get("architecture"):
        head += f", {record['architecture']}"
    text = f"{head}: {len(folded)} norm{'s' if len(folded) != 1 else ''} folded"
    if folded:
        text += f" ({some(folded)})"
    if untied:
        text += f"; untied: {some(untied)}"
    return text


def record_from_config(config: dict | None) -> dict | None:
    record = (config or {}).get(METADATA_KEY)
    return record if isinstance(record, dict) else None


def record_from_safetensors_metadata(metadata: dict[str, str] | None) -> dict | None:
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def safetensors_metadata(input_metadata: dict[str, str] | None, record: dict) -> dict[str, str]:
    """The input shard's metadata, plus ``format: pt`` (transformers requires it) and the record."""
    out = dict(input_metadata or {})
    out.setdefault("format", "pt")
    out[METADATA_KEY] = json.dumps(record, separators=(",", ":"))
    return out


def updated_config(config: dict, record: dict, untied: bool) -> dict:
    """config.json with the record, and the embedding tie switched off when a tied weight was split."""
    out = dict(config)
    out[METADATA_KEY] = record
    if untied:
        out["tie_word_embeddings"] = False
        for sub in ("text_config", "decoder"):
            if isinstance(out.get(sub), dict) and "tie_word_embeddings" in out[sub]:
                out[sub] = {**out[sub], "tie_word_embeddings": False}
    return out
