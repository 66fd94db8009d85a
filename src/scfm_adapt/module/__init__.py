"""scvi-tools modules: tensors in, :class:`~scvi.module.base.LossOutput` out."""

from ._keys import MODULE_KEYS
from ._scfm import SCFMModule

__all__ = ["MODULE_KEYS", "SCFMModule"]
