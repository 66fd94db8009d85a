"""``sfa.tl.embed``: the model's cell embedding into ``obsm["X_scfm"]``."""

from __future__ import annotations

import logging

from anndata import AnnData

from .._slots import SLOTS

logger = logging.getLogger(__name__)


def embed(
    adata: AnnData,
    model,
    *,
    key_added: str = SLOTS.embedding,
    tokens: bool = False,
    pooling: str = "concat",
    batch_size: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Write the model's cell embedding into ``adata.obsm[key_added]``.

    Parameters
    ----------
    adata
        AnnData with the model's genes (raw counts where the model was set up to read them).
    model
        A trained :class:`~scfm_adapt.model.SCFM` (or any model with
        ``get_latent_representation``).
    key_added
        Name of the ``obsm`` slot; the parameters go to ``adata.uns[key_added]["params"]``.
    tokens
        Also write the latent tokens, flattened, to ``obsm[key_added + "_tokens"]``.
    pooling
        How the tokens make one embedding: ``"concat"`` (joined, the default) or
        ``"mean"`` (averaged; it loses most of what the tokens hold).
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None`` (or the copy), having written:

    ``obsm[key_added]``
        The posterior means of the tokens, joined: ``(n_cells, n_tokens * token_dim)``
        (``(n_cells, token_dim)`` with ``pooling="mean"``); use it as
        ``sc.pp.neighbors(adata, use_rep=key_added)``.
    ``obsm[key_added + "_tokens"]``
        ``(n_cells, n_tokens * token_dim)``, only when ``tokens=True``.
    ``uns[key_added]["params"]``
        The parameters of this call.
    """
    adata = adata.copy() if copy else adata
    if pooling not in ("concat", "mean"):
        raise ValueError(f"pooling={pooling!r}; choose 'concat' or 'mean'.")
    if tokens:
        tok = model.get_latent_representation(adata, return_tokens=True, batch_size=batch_size)
        flat = tok.reshape(tok.shape[0], -1)
        adata.obsm[f"{key_added}_tokens"] = flat
        # Two slots, two arrays: editing one in place must not change the other.
        adata.obsm[key_added] = flat.copy() if pooling == "concat" else tok.mean(1)
    else:
        # Any model with get_latent_representation will do: the default pooling is not passed.
        extra = {} if pooling == "concat" else {"pooling": pooling}
        adata.obsm[key_added] = model.get_latent_representation(
            adata, batch_size=batch_size, **extra
        )
    adata.uns[key_added] = {
        "params": {"model": type(model).__name__, "tokens": tokens, "pooling": pooling}
    }
    logger.info("added obsm[%r]%s", key_added, f" and obsm[{key_added + '_tokens'!r}]" * tokens)
    return adata if copy else None
