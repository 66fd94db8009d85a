"""Keys of the dictionaries passed between inference, generative and loss."""

from typing import NamedTuple


class _ModuleKeys(NamedTuple):
    X: str = "x"
    LIBRARY: str = "library"
    BATCH: str = "batch_index"
    LABELS: str = "labels"
    CAT_COVS: str = "cat_covs"
    CONT_COVS: str = "cont_covs"
    QZ: str = "qz"
    Z: str = "z"
    PX: str = "px"
    DIFF_OUT: str = "diffusion_output"
    DIFF_TARGET: str = "diffusion_target"


MODULE_KEYS = _ModuleKeys()
