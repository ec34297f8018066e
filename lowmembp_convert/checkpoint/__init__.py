"""Converting checkpoints on disk, shard by shard, without loading the model (``lowmembp-convert``).

``convert_checkpoint(ckpt_in, ckpt_out, ...)`` is the entry point; the CLI is a thin wrapper. It is
imported on first use, so ``lowmembp_convert.checkpoint.errors`` and friends stay light to import.
"""

from .errors import CheckpointError
from .metadata import METADATA_KEY


def __getattr__(name: str):
    if name == "convert_checkpoint":
        from .conversion import convert_checkpoint

        return convert_checkpoint
    raise AttributeError(f"module 'lowmembp_convert.checkpoint' has no attribute {name!r}")


__all__ = ["METADATA_KEY", "CheckpointError", "convert_checkpoint"]
