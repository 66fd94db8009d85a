"""Pure torch building blocks: no AnnData, no scvi-tools, no noise schedule."""

from ._attention import MLP, Attention, TransformerBlock, graph_mask, graph_neighbors
from ._attribution import integrated_gradients
from ._bottleneck_adapter import AdapterHost, BottleneckAdapter
from ._count_decoder import TokenDecoder
from ._dit import DiT, DiTBlock, FinalLayer, modulate
from ._embedding import (
    CategoricalEmbedder,
    ContinuousEmbedder,
    ExtendableEmbedding,
    TimestepEmbedder,
)
from ._part_pool import PartAttentionPool
from ._pathway_tokens import PathwayTokenEncoder
from ._query_pool import PooledEncoder, QueryPool
from ._rank_tokens import RankTokenEncoder
from ._token_encoder import PosteriorEncoder, TokenEncoder

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
    "PartAttentionPool",
    "PathwayTokenEncoder",
    "PooledEncoder",
    "PosteriorEncoder",
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
