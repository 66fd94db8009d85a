"""sfa.metrics.lognorm: the one log-normalisation of the metrics and baselines."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

import scfm_adapt as sfa


def test_lognorm_by_hand():
    counts = np.array([[1.0, 3.0], [0.0, 2.0], [0.0, 0.0]])
    # rows scaled to 10,000: (2,500, 7,500), (0, 10,000); a cell without counts stays 0
    expected = np.log1p([[2500.0, 7500.0], [0.0, 10000.0], [0.0, 0.0]])
    out = sfa.metrics.lognorm(counts)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, expected, rtol=1e-15)
    np.testing.assert_allclose(sfa.metrics.lognorm(counts, target_sum=4.0)[0], np.log1p([1, 3]))


def test_lognorm_reads_sparse_integer_and_anndata_alike():
    counts = np.array([[1, 3], [0, 2]])
    dense = sfa.metrics.lognorm(counts)
    for x in (
        counts.astype(np.float32),
        sparse.csr_matrix(counts.astype(np.float32)),
        ad.AnnData(counts.astype(np.float32)),
    ):
        out = sfa.metrics.lognorm(x)
        assert out.dtype == np.float64 and not sparse.issparse(out)
        np.testing.assert_array_equal(out, dense)
    with pytest.warns(DeprecationWarning, match="lognorm"):  # the former name
        np.testing.assert_array_equal(sfa.metrics.lognormalize(counts), dense)


@pytest.mark.parametrize(
    "bad",
    [
        np.array([[1.0, -1.0]]),
        np.array([[1.0, np.nan]]),
        np.zeros((0, 3)),
        np.ones(3),
    ],
    ids=["negative", "nan", "no cells", "1-D"],
)
def test_lognorm_rejects_what_is_not_counts(bad):
    with pytest.raises(ValueError):
        sfa.metrics.lognorm(bad)
