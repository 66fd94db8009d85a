"""Backed minibatches read as contiguous runs: the rows read, the runs, the sampler."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

from scfm_adapt.data._block_loader import BlockSampler, Minibatch, read_rows, row_runs


@pytest.fixture
def backed_x(tmp_path):
    x = sparse.random(500, 40, density=0.3, format="csr", random_state=0, dtype=np.float32)
    x.data = np.ceil(x.data * 10)
    ad.AnnData(x).write_h5ad(tmp_path / "x.h5ad")
    b = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    yield x, b.X
    b.file.close()


@pytest.mark.parametrize("max_gap", [0, 3, 50, 1000])
def test_read_rows_equals_the_in_memory_rows(backed_x, max_gap):
    x, disk = backed_x
    rng = np.random.default_rng(max_gap)
    for n in (1, 7, 120):
        rows = np.sort(rng.choice(500, n, replace=False))
        got = read_rows(disk, rows, max_gap)
        assert got.shape == (n, 40)
        np.testing.assert_array_equal(got.toarray(), x[rows].toarray())


def test_row_runs_join_rows_within_the_gap():
    rows = np.array([1, 2, 3, 10, 50, 51])
    assert row_runs(rows, max_gap=0) == [(1, 4), (10, 11), (50, 52)]
    assert row_runs(rows, max_gap=6) == [(1, 11), (50, 52)]
    assert row_runs(rows, max_gap=100) == [(1, 52)]
    assert row_runs(np.array([], dtype=int)) == []


def test_block_sampler_draws_every_position_once_in_whole_blocks_per_fetch():
    sampler = BlockSampler(103, batch_size=8, block_size=4, fetch_size=16, shuffle=True, seed=0)
    first = list(sampler)
    assert len(first) == len(sampler) == 13
    assert all(isinstance(b, Minibatch) for b in first)
    order = np.concatenate([b.positions for b in first])
    np.testing.assert_array_equal(np.sort(order), np.arange(103))
    fetches = list({id(b.fetch): b.fetch for b in first}.values())
    assert len(fetches) == 7  # ceil(103 / 16)
    for b in first:  # a minibatch is served from its fetch, which announces the next one
        assert np.isin(b.positions, b.fetch).all()
    assert first[0].next_fetch is fetches[1] and first[-1].next_fetch is None
    for fetch in fetches:  # made of whole blocks of 4 consecutive positions
        blocks = np.unique(fetch // 4)
        expected = np.concatenate([np.arange(4 * k, min(4 * k + 4, 103)) for k in blocks])
        np.testing.assert_array_equal(fetch, expected)
    assert not np.array_equal(order, np.arange(103))  # shuffled ...
    again = np.concatenate([b.positions for b in sampler])
    assert not np.array_equal(again, order)  # ... anew each epoch
    plain = list(BlockSampler(103, 8, 4, 16, shuffle=False))
    np.testing.assert_array_equal(np.concatenate(plain), np.arange(103))
    dropped = list(BlockSampler(103, 8, 4, 16, shuffle=True, drop_last=True, seed=0))
    assert len(dropped) == 12 and all(len(b.positions) == 8 for b in dropped)
    plain_dropped = list(BlockSampler(103, 8, 4, 16, shuffle=False, drop_last=True))
    assert len(plain_dropped) == 12 and all(len(b) == 8 for b in plain_dropped)
    ids = [b.fetch_id for b in first]
    assert ids == sorted(ids) and len(set(ids)) == 7
    assert {b.fetch_id for b in sampler}.isdisjoint(ids)  # new ids next epoch
    with pytest.raises(ValueError, match="positive"):
        BlockSampler(10, 0)
