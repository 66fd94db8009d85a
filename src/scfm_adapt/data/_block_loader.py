"""Minibatches of a backed (on-disk) AnnData read as long contiguous runs of rows.

scvi-tools' loader reads a minibatch of a backed sparse matrix one row at a time: anndata
issues two HDF5 reads per row, and a random permutation scatters the rows over the whole
file. On a file larger than memory each is a read from disk, whose latency (not its size)
sets the pace: on this project's machine a cold read of 1 row and of 512 rows took about
the same time (``benchmarks/throughput.py --sections ooc``).

Here, as in annbatch and scDataset, a shuffled epoch reads *fetches* of ``fetch_size``
rows, each made of blocks of ``block_size`` consecutive rows from random places of the
file (one read per block), shuffles the rows of a fetch in memory and serves its
minibatches from there; a background thread reads the next fetch meanwhile. Every cell is
seen once per epoch; a minibatch mixes the cells of ``fetch_size / block_size`` places.
Unshuffled loaders (validation, inference) read each minibatch as one run.

In memory nothing changes: :class:`BlockAnnDataLoader` is scvi-tools' loader unless the
data are backed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data._anntorchdataset import AnnTorchDataset
from scvi.dataloaders import AnnDataLoader, DataSplitter
from torch.utils.data import DataLoader, Sampler

#: Consecutive rows read at once in a shuffled epoch of backed data.
BLOCK_SIZE = 1024
#: Rows per fetch: its minibatches mix ``FETCH_SIZE / BLOCK_SIZE`` places of the file.
FETCH_SIZE = 32 * 1024
#: Rows between two wanted rows that are read and dropped rather than starting a new run.
MAX_GAP = 32


def row_runs(rows: np.ndarray, max_gap: int = MAX_GAP) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` half-open ranges covering sorted ``rows``, a new range
    wherever two wanted rows are more than ``max_gap`` apart."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) > max_gap + 1) + 1
    starts = rows[np.r_[0, breaks]]
    stops = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
    return list(zip(starts.tolist(), stops.tolist()))


def read_rows(matrix, rows: np.ndarray, max_gap: int = MAX_GAP) -> sparse.csr_matrix:
    """Rows ``rows`` (sorted, unique) of a backed matrix as CSR, one slice per run."""
    runs = row_runs(rows, max_gap)
    parts = [sparse.csr_matrix(matrix[start:stop]) for start, stop in runs]
    block = sparse.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
    starts = np.array([start for start, _ in runs])
    firsts = np.cumsum([0] + [stop - start for start, stop in runs[:-1]])  # in ``block``
    run = np.searchsorted(starts, rows, side="right") - 1
    return block[firsts[run] + rows - starts[run]]


@dataclass(eq=False)
class Minibatch:
    """One minibatch of a shuffled epoch: its positions, those of the fetch it is served
    from and of the next fetch, each fetch with an id unique to its sampler (a worker
    process gets copies, so identity cannot tell fetches apart)."""

    positions: np.ndarray
    fetch: np.ndarray
    fetch_id: int
    next_fetch: np.ndarray | None


class BlockSampler(Sampler):
    """Minibatches of positions ``0..n-1``. Shuffled: fetches of ``fetch_size`` positions
    made of whole blocks of ``block_size`` consecutive positions, blocks and fetches in a
    new random order every epoch, positions shuffled within each fetch (items are
    :class:`Minibatch`). Unshuffled: consecutive positions (items are arrays)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        block_size: int = BLOCK_SIZE,
        fetch_size: int = FETCH_SIZE,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int | None = None,
    ):
        if min(batch_size, block_size, fetch_size) < 1:
            raise ValueError("batch_size, block_size and fetch_size must be positive.")
        self.n, self.batch_size, self.block_size = n, batch_size, block_size
        # Whole blocks per fetch, and whole minibatches (so that only the last one of an
        # epoch can be short).
        blocks = max(1, fetch_size // block_size)
        self.fetch_size = max(batch_size, (blocks * block_size) // batch_size * batch_size)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed = seed
        self.epoch = 0
        self.n_fetches = 0  # fetches drawn so far (their ids)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def _order(self) -> np.ndarray:
        """Every position once: whole blocks in a random order."""
        if self.seed is None:
            # A draw from torch's generator each epoch, like torch's RandomSampler: the
            # seed set by scvi-tools fixes the order, and a run resumed from a checkpoint
            # (which restores that generator) continues it.
            import torch

            rng = np.random.default_rng(int(torch.randint(2**31, ()).item()))
        else:
            rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        # Whole blocks in a random order, a short last block (if any) at the end: every
        # fetch is then made of whole blocks.
        n_full = self.n // self.block_size
        starts = np.r_[rng.permutation(n_full), n_full : math.ceil(self.n / self.block_size)]
        starts = starts * self.block_size
        order = np.concatenate([np.arange(s, min(s + self.block_size, self.n)) for s in starts])
        # Shuffle within each fetch: its minibatches mix all of its blocks.
        for f in range(0, self.n, self.fetch_size):
            rng.shuffle(order[f : f + self.fetch_size])
        return order

    def __iter__(self) -> Iterator[Minibatch | np.ndarray]:
        if not self.shuffle:
            for start in range(0, len(self) * self.batch_size, self.batch_size):
                yield np.arange(start, min(start + self.batch_size, self.n))
            return
        order = self._order()
        step = self.fetch_size
        fetches = [np.sort(order[f : f + step]) for f in range(0, self.n, step)]
        first_id, self.n_fetches = self.n_fetches, self.n_fetches + len(fetches)
        for i, fetch in enumerate(fetches):
            following = fetches[i + 1] if i + 1 < len(fetches) else None
            chunk = order[i * self.fetch_size : (i + 1) * self.fetch_size]
            for start in range(0, len(chunk), self.batch_size):
                batch = chunk[start : start + self.batch_size]
                if self.drop_last and len(batch) < self.batch_size:
                    return
                yield Minibatch(batch, fetch, first_id + i, following)


class BlockDataset(AnnTorchDataset):
    """scvi-tools' dataset over the rows ``indices`` of a backed AnnData whose
    counts are read by :func:`read_rows`: a :class:`Minibatch` from its fetch (read whole,
    the next one read by a background thread meanwhile), an array of positions directly.
    Every other registered field is read as scvi-tools reads it."""

    def __init__(
        self,
        adata_manager: AnnDataManager,
        indices: np.ndarray,
        getitem_tensors=None,
        load_sparse_tensor: bool = False,
        prefetch: bool = True,
    ):
        super().__init__(adata_manager, getitem_tensors, load_sparse_tensor)
        self.rows = np.asarray(indices)  # in the caller's order: position i is row rows[i]
        self.x_key = REGISTRY_KEYS.X_KEY
        keys = dict(self.keys_and_dtypes)
        self.x_dtype = keys.pop(self.x_key, None)
        # Other fields as arrays (reordered below); sparse tensors only for the counts.
        self.rest = AnnTorchDataset(adata_manager, keys) if keys else None
        self.prefetch = prefetch
        self._fetch_rows: np.ndarray | None = None  # sorted rows of the fetch in memory
        self._fetch_id: int | None = None  # the id of the fetch in memory
        self._fetch_x: sparse.csr_matrix | None = None
        self._next: tuple[np.ndarray, Future] | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _read_sorted(self, positions: np.ndarray) -> tuple[np.ndarray, sparse.csr_matrix]:
        """The sorted rows at ``positions`` and their counts."""
        rows = np.sort(self.rows[positions])
        return rows, read_rows(self.data[self.x_key], rows)

    def _counts(self, item: Minibatch, rows: np.ndarray) -> sparse.csr_matrix:
        """Counts of ``rows`` (sorted) of ``item``, from its fetch, which is read first if
        it is not in memory."""
        if item.fetch_id != self._fetch_id:
            if self._next is not None and self._next[0] == item.fetch_id:
                self._fetch_rows, self._fetch_x = self._next[1].result()
            else:
                self._fetch_rows, self._fetch_x = self._read_sorted(item.fetch)
            self._fetch_id, self._next = item.fetch_id, None
            if self.prefetch and item.next_fetch is not None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="scfm-fetch")
                future = self._pool.submit(self._read_sorted, item.next_fetch)
                self._next = (item.fetch_id + 1, future)
        return self._fetch_x[np.searchsorted(self._fetch_rows, rows)]

    def __getitem__(self, item) -> dict:
        """A minibatch: of a shuffled epoch (:class:`Minibatch`), its rows in file order;
        else (an array of positions) in the order asked for."""
        positions = item.positions if isinstance(item, Minibatch) else item
        rows = self.rows[np.atleast_1d(np.asarray(positions))]
        order = np.argsort(rows, kind="stable")
        ranked = rows[order]  # sorted, as HDF5 reads them
        out = dict(self.rest[ranked]) if self.rest is not None else {}
        if self.x_dtype is not None:
            if isinstance(item, Minibatch):
                block = self._counts(item, ranked)
            else:
                block = read_rows(self.data[self.x_key], ranked)
            block = block.astype(self.x_dtype, copy=False)
            out[self.x_key] = block if self.load_sparse_tensor else block.toarray()
        if not isinstance(item, Minibatch):  # back to the order asked for
            back = np.argsort(order)
            out = {k: v[back] for k, v in out.items()}
        if self.x_dtype is not None and self.load_sparse_tensor:
            from scvi.utils._sparse import scipy_to_torch_sparse

            out[self.x_key] = scipy_to_torch_sparse(out[self.x_key])
        return out

    def __getstate__(self) -> dict:  # a worker process gets no thread or cached fetch
        state = dict(self.__dict__)
        state.update(_fetch_rows=None, _fetch_id=None, _fetch_x=None, _next=None, _pool=None)
        return state


def _reads_rows(matrix) -> bool:
    """Whether ``matrix`` is on disk in a layout read by rows: a backed CSR matrix or a
    dense HDF5 dataset (a CSC one or a dask array stays with scvi-tools' reads)."""
    import h5py
    from anndata.abc import CSRDataset

    return isinstance(matrix, CSRDataset | h5py.Dataset)


class BlockAnnDataLoader(AnnDataLoader):
    """:class:`scvi.dataloaders.AnnDataLoader`, which reads a backed AnnData in contiguous
    runs (:class:`BlockDataset`) with block-shuffled minibatches (:class:`BlockSampler`).

    In memory, with a sampler of the caller's or with a distributed sampler, it is
    scvi-tools' loader unchanged (``block_size`` and ``fetch_size`` apply to backed data
    only; pass them through ``datasplitter_kwargs`` of ``train``).
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        indices=None,
        batch_size: int = 128,
        shuffle: bool = False,
        sampler=None,
        drop_last: bool = False,
        drop_dataset_tail: bool = False,
        data_and_attributes=None,
        iter_ndarray: bool = False,
        distributed_sampler: bool = False,
        load_sparse_tensor: bool = False,
        block_size: int = BLOCK_SIZE,
        fetch_size: int = FETCH_SIZE,
        **kwargs,
    ):
        keys = adata_manager.data_registry if adata_manager.adata is not None else {}
        x_key = REGISTRY_KEYS.X_KEY
        backed = x_key in keys and _reads_rows(adata_manager.get_from_registry(x_key))
        if not backed or sampler is not None or distributed_sampler:
            super().__init__(
                adata_manager,
                indices=indices,
                batch_size=batch_size,
                shuffle=shuffle,
                sampler=sampler,
                drop_last=drop_last,
                drop_dataset_tail=drop_dataset_tail,
                data_and_attributes=data_and_attributes,
                iter_ndarray=iter_ndarray,
                distributed_sampler=distributed_sampler,
                load_sparse_tensor=load_sparse_tensor,
                **kwargs,
            )
            return
        if indices is None:
            indices = np.arange(adata_manager.adata.shape[0])
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        if shuffle:  # blocks of consecutive positions must be blocks of the file
            indices = np.sort(indices)
        self.indices = indices
        self.dataset = BlockDataset(
            adata_manager, self.indices, data_and_attributes, load_sparse_tensor
        )
        kwargs.setdefault("num_workers", 0)
        sampler = BlockSampler(
            len(self.indices),
            batch_size,
            block_size=block_size,
            fetch_size=fetch_size,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        self.kwargs = {**kwargs, "sampler": sampler, "batch_size": None, "shuffle": False}
        if iter_ndarray:
            self.kwargs["collate_fn"] = lambda x: x
        DataLoader.__init__(self, self.dataset, **self.kwargs)


class BlockDataSplitter(DataSplitter):
    """scvi-tools' data splitter whose loaders are :class:`BlockAnnDataLoader`."""

    data_loader_cls = BlockAnnDataLoader
