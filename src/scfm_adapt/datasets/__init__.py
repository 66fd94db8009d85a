"""Real single-cell data sets, small enough for tests and tutorials.

:func:`pbmc68k` is built in (read from the file scanpy ships) and needs nothing else. The
other loaders read one file each from the data folder :func:`data_dir`:
``$SCFM_ADAPT_DATA`` when that environment variable is set, else ``../shared/data`` relative
to the current working directory; then from the download cache ``~/.cache/scfm_adapt``. A file
that is absent raises :class:`FileNotFoundError`, unless the loader is called with
``download=True``, which fetches it from its public source into the cache.

Every loader returns integer counts in ``X`` (CSR float32) and checks that they are integral.
Importing this module imports neither scanpy, anndata nor torch.
"""

from ._cellbench import cellbench
from ._citeseq import citeseq_mudata, citeseq_pbmc
from ._go import go_annotations, go_gene2go, go_gene_features, go_gene_ids, go_terms
from ._kang import kang2018_ctrl, kang2018_ifnb
from ._multiome import multiome
from ._norman import norman2019
from ._paths import ENV_VAR, cache_dir, data_dir
from ._pbmc68k import pbmc68k

__all__ = [
    "ENV_VAR",
    "cache_dir",
    "cellbench",
    "citeseq_mudata",
    "citeseq_pbmc",
    "data_dir",
    "go_annotations",
    "go_gene2go",
    "go_gene_features",
    "go_gene_ids",
    "go_terms",
    "kang2018_ctrl",
    "kang2018_ifnb",
    "multiome",
    "norman2019",
    "pbmc68k",
]
