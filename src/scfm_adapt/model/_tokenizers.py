"""How an :class:`~scfm_adapt.model.SCFM` reads cells: the tokenizer, its data, attributions.

The model resolves a tokenizer's data once, when it is built on an AnnData: gene sets and
graphs fitted to the genes, gene medians of the training cells, an external backbone's
vocabulary and weights. What shapes the module (set names, counts, the backbone's config)
goes into the JSON init arguments; the arrays themselves are module buffers and weights, so a
saved model reloads without the GO tables, the GMT file or the backbone folder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import SCFMInputError
from ..module import SCFMModule
from ._attributions import pathway_attributions

logger = logging.getLogger(__name__)

TOKENIZER_KWARGS = {
    "pathway": (
        "n_residual",
        "min_size",
        "max_size",
        "max_sets",
        "max_overlap",
        "n_ranked",
        "gene_scores",
        "go_propagate",
        "n_channels",
        "member_init",
        "min_jaccard",
        "min_edge_share",
        "sparse_threshold",
    ),
    "rank": ("top_k",),
    "geneformer": (
        "gene_id_key",
        "min_vocab_fraction",
        "token_dictionary",
        "gene_medians",
        "backbone_dropout",
    ),
    "scgpt": (
        "gene_id_key",
        "min_vocab_fraction",
        "max_len",
        "cls_value",
        "tie_break",
        "backbone_dropout",
    ),
    "latent": (),
}
GRAPH_KWARGS = ("go_max_term_size",)
#: Tokenizers that read cells with an external backbone loaded from ``backbone=``.
BACKBONE_TOKENIZERS = ("geneformer", "scgpt")


def random_rows(n: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Up to ``max_rows`` random row indices of ``n``, sorted (a random subset: the first
    rows of a file are often one batch or type)."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_rows])


def cp10k_sample(matrix, max_cells: int = 20000, seed: int = 0):
    """Counts per 10k (``counts / library * 1e4``) of up to ``max_cells`` random cells
    (CSR, float64, in the cells' order)."""
    from scipy import sparse

    n = matrix.shape[0]
    rows = random_rows(n, max_cells, seed)
    x = sparse.csr_matrix(matrix[rows] if n > max_cells else matrix[:], dtype=np.float64)
    lib = np.asarray(x.sum(1)).ravel()
    return sparse.csr_matrix(sparse.diags(1e4 / np.maximum(lib, 1.0)) @ x)


def gene_medians(matrix, max_cells: int = 20000, seed: int = 0) -> np.ndarray:
    """Median of each gene's normalised expression (counts per 10k) over the cells that
    express it, from up to ``max_cells`` cells; 1 for genes never expressed."""
    from scipy import sparse

    x = sparse.csc_matrix(cp10k_sample(matrix, max_cells, seed))
    med = np.ones(x.shape[1])
    for j in range(x.shape[1]):
        vals = x.data[x.indptr[j] : x.indptr[j + 1]]
        vals = vals[vals > 0]
        if vals.size:
            med[j] = float(np.median(vals))
    return med


def lognorm_sample(matrix, max_cells: int = 20000, seed: int = 0):
    """``log1p`` of :func:`cp10k_sample` (CSR, float64)."""
    x = cp10k_sample(matrix, max_cells, seed)
    x.data = np.log1p(x.data)
    return x


def log_norm_variance(x) -> np.ndarray:
    """Variance of each gene over the cells of a (sparse) log-normalised matrix."""
    mean = np.asarray(x.mean(0)).ravel()
    return np.asarray(x.multiply(x).mean(0)).ravel() - mean**2


#: Training cells whose expression groups the genes in no set into programmes.
PROGRAMME_CELLS = 5000
#: Default number of catch-all programme tokens of the pathway tokenizer (one token could
#: hold hundreds of genes and dominate the attributions; benchmarks/README.md, "Pathway
#: tokens").
N_RESIDUAL = 8
#: Default number of the pathway tokenizer's sets chosen by their members' scores (gene
#: variance; a perturbation model's response) before the rest are chosen by coverage
#: (:func:`~scfm_adapt.data.select_gene_sets`).
N_RANKED = 0
#: How the pathway tokens' member weights start ("pca": the set mean and the set's
#: principal axes, :func:`~scfm_adapt.data.set_components`; "random": the mean and random
#: contrasts) and the random training cells the axes are computed on.
MEMBER_INIT = "random"
COMPONENT_CELLS = 2000
#: The same for a :class:`~scfm_adapt.model.PerturbationModel`'s backbone, whose genes are
#: scored by their response to the training perturbations (``response_scores``).
N_RESPONSE_RANKED = 16
#: Default share of member pairs joined by gene-graph edges that links two pathway tokens
#: (:func:`~scfm_adapt.data.set_graph`).
MIN_EDGE_SHARE = 0.1


class TokenizerMixin:
    """Mixed into :class:`~scfm_adapt.model.SCFM`: tokenizer set-up and pathway attributions."""

    # What this mixin needs from the model it is mixed into, beyond BaseModel:
    module: SCFMModule

    def _resolve_tokenizer(
        self,
        adata,
        tokenizer: str,
        gene_sets,
        gene_graph,
        backbone,
        tokenizer_kwargs: dict | None,
    ) -> tuple[dict, dict]:
        """JSON options of the module and the arrays to fill it with, for ``adata``."""
        from ..data import as_gene_graph, go_gene_graph
        from ..module._scfm import TOKENIZERS

        if tokenizer not in TOKENIZERS:
            raise SCFMInputError(f"tokenizer={tokenizer!r}; choose one of {TOKENIZERS}.")
        kw = dict(tokenizer_kwargs or {})
        allowed = set(TOKENIZER_KWARGS[tokenizer]) | set(GRAPH_KWARGS)
        unknown = sorted(set(kw) - allowed)
        if unknown:
            raise SCFMInputError(
                f"tokenizer_kwargs {unknown} do not apply to tokenizer={tokenizer!r}; it takes "
                f"{sorted(allowed)}."
            )
        if gene_sets is not None and tokenizer != "pathway":
            raise SCFMInputError("gene_sets= applies to tokenizer='pathway' only.")
        if backbone is not None and tokenizer not in BACKBONE_TOKENIZERS:
            raise SCFMInputError(
                f"backbone= applies to tokenizer={' or '.join(map(repr, BACKBONE_TOKENIZERS))} "
                "only."
            )
        if gene_graph is not None and tokenizer not in ("pathway", "rank"):
            raise SCFMInputError(
                "gene_graph= restricts attention between gene or pathway tokens: use it with "
                "tokenizer='pathway' or 'rank'."
            )
        genes = list(self.var_names_)
        edges = None
        if gene_graph is not None:
            if isinstance(gene_graph, str) and gene_graph.lower() == "go":
                edges = go_gene_graph(genes, max_term_size=kw.get("go_max_term_size", 50))
            else:
                edges = as_gene_graph(gene_graph, genes)
        options: dict = {}
        data: dict = {}
        if tokenizer == "pathway":
            options, data = self._resolve_pathway(adata, gene_sets, edges, kw)
        elif tokenizer == "rank":
            options = {"top_k": int(kw.get("top_k", 64)), "n_edges": 0}
            data = {"medians": gene_medians(self._counts_matrix(adata))}
            if edges is not None:
                options["n_edges"] = int(2 * len(edges))
                data["edges"] = edges
        elif tokenizer == "geneformer":
            options, data = self._resolve_geneformer(adata, backbone, kw)
        elif tokenizer == "scgpt":
            options, data = self._resolve_scgpt(adata, backbone, kw)
        return options, data

    def _resolve_pathway(self, adata, gene_sets, edges, kw: dict) -> tuple[dict, dict]:
        """Gene sets fitted to the data, catch-all programmes, coverage, member weights and
        the pathway graph (``edges``: a gene graph, or ``None``)."""
        from ..data import (
            graph_density,
            memberships,
            residual_programmes,
            resolve_gene_sets,
            set_components,
            set_coverage,
            set_graph,
            uncovered_genes,
        )

        genes = list(self.var_names_)
        select = {k: kw[k] for k in ("min_size", "max_size", "max_sets", "max_overlap") if k in kw}
        x = lognorm_sample(self._counts_matrix(adata))
        gene_var = log_norm_variance(x)
        scores = _gene_scores(kw.get("gene_scores"), adata, genes, gene_var)
        if "gene_scores" in kw and not kw.get("n_ranked", N_RANKED):
            logger.warning(
                "gene_scores are used only for the first n_ranked sets, and n_ranked is "
                "0: pass tokenizer_kwargs={'n_ranked': k} as well."
            )
        sets = resolve_gene_sets(
            "go" if gene_sets is None else gene_sets,
            genes,
            propagate=bool(kw.get("go_propagate", False)),
            gene_scores=scores,
            n_ranked=int(kw.get("n_ranked", N_RANKED)),
            **select,
        )
        rest = uncovered_genes(sets, len(genes))
        n_residual = int(kw.get("n_residual", N_RESIDUAL))
        residual = None
        if n_residual > 1 and rest.size:
            cells = random_rows(x.shape[0], PROGRAMME_CELLS)
            dense = x[cells][:, rest].toarray()  # cells × uncovered genes
            residual = residual_programmes(dense, rest, genes, n_residual)
        names, set_idx, gene_idx = memberships(sets, len(genes), residual=residual)
        coverage = set_coverage(set_idx, gene_idx, names, gene_var)
        logger.info(
            "%d gene sets hold %d of the %d genes (%.1f%% of the variance); %d genes "
            "(%.1f%%) go to %d catch-all token(s).",
            coverage["n_sets"],
            coverage["genes_in_sets"],
            len(genes),
            100 * coverage["variance_in_sets"],
            coverage["catch_all_genes"],
            100 * coverage["catch_all_variance"],
            coverage["n_catch_all"],
        )
        options = {
            "set_names": names,
            "n_sets": len(names),
            "n_members": int(set_idx.size),
            "n_channels": int(kw.get("n_channels", 4)),
            "n_edges": 0,
            "sparse_threshold": float(kw.get("sparse_threshold", 0.0)),
            "per_set_inputs": True,
            "coverage": coverage,
        }
        data = {"memberships": (set_idx, gene_idx)}
        member_init = str(kw.get("member_init", MEMBER_INIT))
        if member_init not in ("pca", "random"):
            raise SCFMInputError(
                f"member_init={member_init!r}; choose 'pca' (the sets' principal axes "
                "over the training cells) or 'random'."
            )
        options["member_init"] = member_init
        if member_init == "pca":
            cells = random_rows(x.shape[0], COMPONENT_CELLS)
            data["member_weights"] = set_components(
                x[cells].toarray(), set_idx, gene_idx, len(names), options["n_channels"]
            )
        if edges is not None:
            set_edges = set_graph(
                set_idx,
                gene_idx,
                len(names),
                edges,
                float(kw.get("min_jaccard", 0.05)),
                float(kw.get("min_edge_share", MIN_EDGE_SHARE)),
            )
            options["n_edges"] = len(set_edges)
            data["edges"] = set_edges
            coverage["graph_edges"] = len(set_edges)
            coverage["graph_density"] = graph_density(set_edges, len(names))
            logger.info(
                "The pathway graph links %d of the %d token pairs (density %.2f).",
                len(set_edges),
                len(names) * (len(names) - 1) // 2,
                coverage["graph_density"],
            )
        return options, data

    def _align_vocab(self, adata, vocab: dict, kw: dict) -> tuple[np.ndarray, dict]:
        """Token id of each gene in an external backbone's vocabulary, and the report of
        how much of the data the vocabulary covers (logged, and kept in the options)."""
        from ..data import matrix_sums
        from ..data._vocab import map_genes_to_vocab, vocab_report

        key = kw.get("gene_id_key")
        if key is not None:
            if key not in adata.var:
                raise SCFMInputError(
                    f"gene_id_key={key!r} is not a column of adata.var "
                    f"({list(adata.var.columns)[:8]})."
                )
            id_map = dict(zip(map(str, adata.var_names), adata.var[key].astype(str)))
        else:
            id_map = _auto_id_map(self.var_names_, vocab)
        totals = matrix_sums(self._counts_matrix(adata))[1]
        token_ids, fraction = map_genes_to_vocab(
            self.var_names_,
            vocab,
            id_map=id_map,
            min_fraction=kw.get("min_vocab_fraction", 0.5),
            gene_totals=totals,
        )
        report = vocab_report(self.var_names_, token_ids, totals)
        logger.info(
            "%d of the %d genes (%.1f%%, carrying %.1f%% of the counts) are in the backbone's "
            "vocabulary.",
            report["n_in_vocab"],
            report["n_genes"],
            100 * fraction,
            100 * (report["count_share"] or 0.0),
        )
        return token_ids, report

    def _resolve_geneformer(self, adata, backbone, kw: dict) -> tuple[dict, dict]:
        from ..data._geneformer import load_geneformer

        if backbone is None:
            raise SCFMInputError(
                "tokenizer='geneformer' needs backbone='path/to/checkpoint-folder' (a "
                "Geneformer directory: config.json, model.safetensors, token_dictionary.pkl)."
            )
        ckpt = load_geneformer(backbone, kw.get("token_dictionary"), kw.get("gene_medians"))
        token_ids, report = self._align_vocab(adata, ckpt.vocab, kw)
        fraction = report["fraction"]
        if ckpt.medians:
            inv = {v: k for k, v in ckpt.vocab.items()}
            med = np.array(
                [ckpt.medians.get(inv.get(int(t), ""), 1.0) if t >= 0 else 1.0 for t in token_ids]
            )
            med = np.where(np.isfinite(med) & (med > 0), med, 1.0)
        else:
            med = gene_medians(self._counts_matrix(adata))
        special = ckpt.special or {}
        drop = float(kw.get("backbone_dropout", 0.0))  # as for scGPT, see _resolve_scgpt
        bert_config = ckpt.config | {
            "hidden_dropout_prob": drop,
            "attention_probs_dropout_prob": drop,
            "checkpoint_dropout": [
                ckpt.config.get("hidden_dropout_prob"),
                ckpt.config.get("attention_probs_dropout_prob"),
            ],
        }
        options = {
            "bert_config": bert_config,
            "gene_token_ids": [int(t) for t in token_ids],
            "pad_id": special.get("pad", 0),
            "cls_id": special.get("cls"),
            "eos_id": special.get("eos"),
            "max_len": None,
            "source": str(ckpt.source),
            "sha256": ckpt.sha256,
            "vocab_fraction": float(fraction),
            "vocab_report": report,
            "medians_from": "checkpoint" if ckpt.medians else "data",
        }
        return options, {"medians": med, "backbone_state": ckpt.state_dict}

    def _resolve_scgpt(self, adata, backbone, kw: dict) -> tuple[dict, dict]:
        from ..data._scgpt import load_scgpt

        if backbone is None:
            raise SCFMInputError(
                "tokenizer='scgpt' needs backbone='path/to/checkpoint-folder' (an scGPT "
                "directory: args.json, vocab.json, best_model.pt)."
            )
        ckpt = load_scgpt(backbone)
        token_ids, report = self._align_vocab(adata, ckpt.vocab, kw)
        max_len, cls_value = kw.get("max_len"), kw.get("cls_value")
        # A frozen backbone is a fixed feature extractor: its training dropout (0.2 in
        # scGPT's releases) would only add noise to what trains on top of it, and dropout
        # in attention also takes it off the fused kernel (benchmarks/README.md, scGPT rows).
        config = ckpt.config | {
            "dropout": float(kw.get("backbone_dropout", 0.0)),
            "checkpoint_dropout": ckpt.config["dropout"],
        }
        options = {
            "config": config,
            "gene_token_ids": [int(t) for t in token_ids],
            "pad_id": ckpt.special["pad"],
            "cls_id": ckpt.special["cls"],
            # max_len and tie_break are checked by the encoder, built from these options
            "max_len": None if max_len is None else int(max_len),
            "cls_value": None if cls_value is None else float(cls_value),
            "tie_break": str(kw.get("tie_break", "middle")),
            "source": str(ckpt.source),
            "sha256": ckpt.sha256,
            "vocab_fraction": float(report["fraction"]),
            "vocab_report": report,
            "dropped_heads": ckpt.dropped,
        }
        return options, {"backbone_state": ckpt.state_dict}

    @torch.no_grad()
    def _fill_tokenizer(self, data: dict) -> None:
        enc = self.module.encoder
        tokenizer = self.module.tokenizer
        if tokenizer == "pathway":
            weights = data.get("member_weights")
            enc.set_gene_sets(
                *map(torch.as_tensor, data["memberships"]),
                None if weights is None else torch.as_tensor(weights, dtype=torch.float32),
            )
            if "edges" in data:
                enc.set_graph(torch.as_tensor(data["edges"]))
        if "medians" in data:
            enc.set_gene_medians(torch.as_tensor(data["medians"], dtype=torch.float32))
        if tokenizer == "rank" and "edges" in data:
            enc.set_graph(torch.as_tensor(data["edges"]))
        if "backbone_state" in data:
            enc.load_backbone_state(data["backbone_state"])
        # The EMA DiT is unaffected; nothing else holds encoder weights.

    @property
    def backbone_info_(self) -> dict | None:
        """The external backbone (``tokenizer="geneformer"`` or ``"scgpt"``) this model was
        built on: ``tokenizer``, ``source`` (the checkpoint folder), ``sha256`` (of its
        weights file) and the vocabulary report (``n_genes``, ``n_in_vocab``, ``fraction``,
        ``count_share``: the share of the training counts on genes the backbone knows,
        ``missing_examples``: the most expressed genes it does not). ``None`` for the
        built-in tokenizers."""
        if self.module.tokenizer not in BACKBONE_TOKENIZERS:
            return None
        opts = self.module.hparams_["tokenizer_options"]
        report = opts.get("vocab_report") or {"fraction": opts.get("vocab_fraction")}
        return {
            "tokenizer": self.module.tokenizer,
            "source": opts.get("source"),
            "sha256": opts.get("sha256"),
            **report,
        }

    # ------------------------------------------------------------------ attributions
    @property
    def pathway_names_(self) -> list[str]:
        """Names of the pathway tokens (``tokenizer="pathway"``), in token order."""
        self._require_pathways()
        return list(self.module.hparams_["tokenizer_options"]["set_names"])

    @property
    def pathway_coverage_(self) -> dict | None:
        """How much of the training data the named gene sets hold (``tokenizer="pathway"``):
        ``n_sets``, ``n_catch_all``, ``genes_in_sets``, ``variance_in_sets`` (their share of
        the summed variance of log-normalised expression), ``catch_all_genes`` and
        ``catch_all_variance`` (:func:`~scfm_adapt.data.set_coverage`); with a gene graph,
        ``graph_edges`` and ``graph_density`` (the share of token pairs linked,
        :func:`~scfm_adapt.data.graph_density`). ``None`` for models saved before it was
        recorded."""
        self._require_pathways()
        return self.module.hparams_["tokenizer_options"].get("coverage")

    def _require_pathways(self) -> None:
        if self.module.tokenizer != "pathway":
            raise SCFMInputError(
                f"Pathway attributions need a model built with tokenizer='pathway'; this one "
                f"uses tokenizer={self.module.tokenizer!r}."
            )

    def _pathway_attributions(self, adata, indices, target, n_steps=32, batch_size=128):
        self._require_pathways()
        batches = self._batches(adata, indices, batch_size)
        adata_v = self.adata if adata is None else adata
        obs = adata_v.obs_names if indices is None else adata_v.obs_names[np.asarray(indices)]
        return pathway_attributions(self.module, batches, target, self.pathway_names_, obs, n_steps)

    def get_pathway_attributions(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        n_steps: int = 32,
        batch_size: int = 128,
    ) -> pd.DataFrame:
        """Which pathway tokens drive each cell's embedding.

        Integrated gradients, per cell, of the squared distance between its embedding and
        the embedding of the average training cell (the pseudo-bulk of the pretraining
        data, :meth:`~scfm_adapt.module.SCFMModule.reference_input`), with respect to the
        pathway tokens (``tokenizer="pathway"`` models). Annotation and perturbation have their own
        targets: :meth:`CellAnnotator.get_pathway_attributions`,
        :meth:`PerturbationModel.get_pathway_attributions`.

        Returns
        -------
        pandas.DataFrame
            Cells × pathways (:attr:`pathway_names_`); each row sums to the target's change
            from the baseline, up to ``attrs["completeness_gap"]``.
        """
        self._require_pathways()
        enc = self.module.encoder
        was_training = self.module.training
        self.module.eval()
        with torch.no_grad():  # the baseline's embedding: once, not at every step
            z0 = enc(self.module.reference_input())[0]  # (1, T, d) posterior mean
        self.module.train(was_training)

        def target(features, tensors, x_norm):
            z = enc.head(features).chunk(2, -1)[0]  # (B, T, d) posterior mean
            return (z - z0).pow(2).flatten(1).sum(1)

        return self._pathway_attributions(adata, indices, target, n_steps, batch_size)


def _gene_scores(given, adata, genes: list[str], gene_var: np.ndarray) -> np.ndarray:
    """The pathway tokenizer's gene scores: ``given`` (one value per gene, or the name of an
    ``adata.var`` column), or else each gene's log-normalised variance."""
    if given is None:
        return gene_var
    if isinstance(given, str):
        if given not in adata.var:
            raise SCFMInputError(
                f"gene_scores={given!r} is not a column of adata.var; pass a column name or "
                f"one score per gene ({len(genes)})."
            )
        given = adata.var[given].to_numpy()
    try:
        scores = np.asarray(given, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise SCFMInputError(f"gene_scores must be numbers, one per gene: {e}") from e
    if scores.shape != (len(genes),) or not np.isfinite(scores).all():
        raise SCFMInputError(
            f"gene_scores has shape {scores.shape} or non-finite values; expected one finite "
            f"score per gene ({len(genes)},), in adata.var_names' order."
        )
    return scores


def _auto_id_map(var_names: Sequence[str], vocab: dict) -> dict[str, str] | None:
    """Gene names → vocabulary keys through the GO gene-id table, when the names and the
    vocabulary use different ids (symbols against Ensembl ids, either way round); ``None``
    when the names are mostly keys already, or no table is available."""
    names = list(map(str, var_names))
    in_vocab = sum(g in vocab for g in names)
    if in_vocab >= 0.5 * max(len(names), 1):
        return None
    vocab_ensembl = any(str(k).startswith("ENS") for k in list(vocab)[:50])
    head = names[:50]
    names_ensembl = sum(n.startswith("ENS") for n in head) > 0.5 * len(head)
    if vocab_ensembl == names_ensembl:
        return None  # same kind of id: a table cannot help
    try:
        from ..datasets import go_gene_ids

        ids = go_gene_ids()
    except Exception as e:
        logger.info("No symbol ↔ Ensembl table (%s); genes matched by name only.", e)
        return None
    ids = ids.dropna(subset=["ensembl"])
    src, dst = ("symbol", "ensembl") if vocab_ensembl else ("ensembl", "symbol")
    ids = ids[ids[dst].isin(vocab)].drop_duplicates(src)
    return dict(zip(ids[src].astype(str), ids[dst].astype(str)))
