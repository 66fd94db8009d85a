"""scvi-tools modules: tensors in, :class:`~scvi.module.base.LossOutput` out."""

from ._adapt import STRATEGIES, AdaptableMixin, AdapterSpec
from ._annotator import AnnotatorModule
from ._distill import DistillationModule
from ._keys import MODULE_KEYS
from ._multimodal import MultimodalSCFMModule
from ._scfm import SCFMModule

__all__ = [
    "MODULE_KEYS",
    "STRATEGIES",
    "AdaptableMixin",
    "AdapterSpec",
    "AnnotatorModule",
    "DistillationModule",
    "MultimodalSCFMModule",
    "SCFMModule",
]
