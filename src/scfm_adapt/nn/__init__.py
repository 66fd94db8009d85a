"""Pure torch building blocks: no AnnData, no scvi-tools, no noise schedule."""

from ._adapters import AdapterHost, BottleneckAdapter, ExtendableEmbedding
from ._attention import MLP, Attention, TransformerBlock
from ._dit import DiT, DiTBlock, FinalLayer, modulate
from ._embedding import CategoricalEmbedder, ContinuousEmbedder, TimestepEmbedder
from ._tokens import TokenDecoder, TokenEncoder

__all__ = [
    "MLP",
    "AdapterHost",
    "Attention",
    "BottleneckAdapter",
    "CategoricalEmbedder",
    "ContinuousEmbedder",
    "DiT",
    "DiTBlock",
    "ExtendableEmbedding",
    "FinalLayer",
    "TimestepEmbedder",
    "TokenDecoder",
    "TokenEncoder",
    "TransformerBlock",
    "modulate",
]
