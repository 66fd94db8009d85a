"""scvi-tools modules: tensors in, :class:`~scvi.module.base.LossOutput` out."""

from ._adapters import STRATEGIES, AdaptableMixin, AdapterSpec
from ._annotator import AnnotatorModule
from ._distill import DistillationModule
from ._keys import MODULE_KEYS
from ._lora import inject_lora, tuner_layers, unwrap_lora
from ._multimodal import MultimodalSCFMModule
from ._perturbation_anchor import LatentAnchor
from ._perturbation_flow import ResponseFlow, fit_response_flow
from ._perturbation_response import (
    PART_POOLS,
    ResponseHead,
    dose_scale,
    fit_response_head,
    mmd2,
)
from ._scfm import ENCODER_RANK, SCFMModule

__all__ = [
    "ENCODER_RANK",
    "MODULE_KEYS",
    "PART_POOLS",
    "STRATEGIES",
    "AdaptableMixin",
    "AdapterSpec",
    "AnnotatorModule",
    "DistillationModule",
    "LatentAnchor",
    "MultimodalSCFMModule",
    "ResponseFlow",
    "ResponseHead",
    "SCFMModule",
    "dose_scale",
    "fit_response_flow",
    "fit_response_head",
    "inject_lora",
    "mmd2",
    "tuner_layers",
    "unwrap_lora",
]
