"""Converting checkpoints on disk, shard by shard, without loading the model (``lowmembp-convert``).

``convert_checkpoint(ckpt_in, ckpt_out, ...)`` is the entry point; the CLI is a thin wrapper.
"""

from .conversion import convert_checkpoint
from .errors import CheckpointError
from .metadata import METADATA_KEY

__all__ = ["METADATA_KEY", "CheckpointError", "convert_checkpoint"]
