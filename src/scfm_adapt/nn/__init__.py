"""Pure torch building blocks: no AnnData, no scvi-tools, no noise schedule."""

from ._adapters import AdapterHost, BottleneckAdapter, ExtendableEmbedding
from ._attention import MLP, Attention, TransformerBlock, graph_mask, graph_neighbors
from ._attribution import integrated_gradients
from ._dit import DiT, DiTBlock, FinalLayer, modulate
from ._embedding import CategoricalEmbedder, ContinuousEmbedder, TimestepEmbedder
from ._tokenizers import PathwayTokenEncoder, QueryPool, RankTokenEncoder
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
    "PathwayTokenEncoder",
    "QueryPool",
    "RankTokenEncoder",
    "TimestepEmbedder",
    "TokenDecoder",
    "TokenEncoder",
    "TransformerBlock",
    "graph_mask",
    "graph_neighbors",
    "integrated_gradients",
    "modulate",
]
