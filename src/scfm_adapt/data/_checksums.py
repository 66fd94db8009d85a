"""Checksums of training data: of a file, and of a count matrix whatever its storage."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from scipy import sparse

from ._backed import row_blocks


def counts_sha256(matrix, block_size: int = 16384) -> str:
    """SHA-256 of a count matrix's values, the same for dense, sparse and backed storage.

    Read a block of rows at a time (:func:`~scfm_adapt.data.row_blocks`): each block as
    CSR with float32 values, int64 column indices and row lengths, so that two copies of
    the same counts give the same digest however they are stored.
    """
    h = hashlib.sha256()
    h.update(np.asarray(matrix.shape, dtype=np.int64).tobytes())
    for _, block in row_blocks(matrix, block_size):
        block = sparse.csr_matrix(block)
        if not block.has_canonical_format or (block.data == 0).any():
            block = block.copy()  # canonical form in place, never on the caller's matrix
            block.sum_duplicates()
            block.eliminate_zeros()
        h.update(np.diff(block.indptr).astype(np.int64).tobytes())
        h.update(block.indices.astype(np.int64).tobytes())
        h.update(block.data.astype(np.float32).tobytes())
    return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
