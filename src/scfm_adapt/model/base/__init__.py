"""What every model class shares: :class:`BaseModel` (registry, input shells, training
plumbing, one save / load) and the checkpoint folder format it writes."""

from ._checkpoint import (
    FORMAT_VERSION,
    MIGRATIONS,
    atomic_dir,
    migrate_config,
    read_checkpoint,
    read_json,
    recover_interrupted_save,
    write_checkpoint,
    write_json,
)
from ._inputs import input_shell, transfer_errors
from ._model import QUANTIZED_ERROR, BaseModel, inference_only, seeded

__all__ = [
    "FORMAT_VERSION",
    "MIGRATIONS",
    "QUANTIZED_ERROR",
    "BaseModel",
    "atomic_dir",
    "inference_only",
    "input_shell",
    "migrate_config",
    "read_checkpoint",
    "read_json",
    "recover_interrupted_save",
    "seeded",
    "transfer_errors",
    "write_checkpoint",
    "write_json",
]
