"""Exact inner-product k-nearest-neighbour search, chunked over the database and shardable.

Retrieval with ℓ2-normalised global descriptors is an exhaustive inner-product search
``S = Q @ Xᵀ`` followed by sorting (Radenović et al., "Fine-tuning CNN image retrieval with no
human annotation", §3.5; SPEC §1.3); Euclidean ranking of unit vectors is identical.

The database axis is processed in chunks of a static size, so memory stays bounded by
``nq × chunk_size`` scores whatever the database size, and each chunk is folded into a running
top-k. Ties follow SPEC §1.2: equal scores keep the lower database index first. Scores are always
accumulated and returned in float32 (bfloat16/float16 inputs included).

Selection inside a chunk is two-level. The chunk's scores are cut into blocks of ``_BLOCK``
consecutive database items and reduced to the block maxima, and the running state keeps the
``k`` best *blocks* (by maximum, then by position) with their scores. This is exact: a block
holding one of the ``k`` best items can be outranked only by blocks whose maximum outranks that
item, and there are fewer than ``k`` of those. The per-chunk top-k then runs over
``k + chunk_size / _BLOCK`` block maxima instead of ``k + chunk_size`` scores, and the items are
selected once, at the end, from ``k × _BLOCK`` candidates (rows whose result holds a tie are
redone with the candidates in id order). When ``k`` is large relative to the chunk, the running
top-k is merged with the chunk's scores directly.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jret._checks import (
    check_finite,
    check_floating,
    check_ndim,
    check_nonempty,
    check_positive_int,
    check_same_dim,
)

DEFAULT_CHUNK_SIZE = 8192
_BLOCK = 16
_TIED_ROWS = 64


class _Blocks(NamedTuple):
    """Running state of the two-level selection: the ``K`` best blocks seen so far.

    ``maxima (nq, K)`` sorted decreasing (ties by block id), ``ids (nq, K)`` block ids,
    ``scores (nq, K, _BLOCK)`` the scores of each block's items.
    """

    maxima: jax.Array
    ids: jax.Array
    scores: jax.Array


class _Items(NamedTuple):
    """Running state of the direct selection: the ``k`` best items, sorted decreasing."""

    scores: jax.Array
    ids: jax.Array


def _check_static(queries, database, k: int) -> None:
    """Trace-time checks: ranks, dtypes, dimensions and ``1 <= k <= n``."""
    check_ndim(queries, "queries", (2,), "queries (nq, D)")
    check_ndim(database, "database", (2,), "database (n, D)")
    check_floating(queries, "queries")
    check_floating(database, "database")
    check_same_dim(queries, database, "queries", "database")
    check_positive_int(k, "k")
    if k > database.shape[0]:
        raise ValueError(f"k: expected at most n = {database.shape[0]} (database rows), got {k}")


def _scores(queries: jax.Array, database: jax.Array) -> jax.Array:
    """``queries @ databaseᵀ`` ``(nq, c)`` in float32, accumulated in (at least) float32."""
    dtype = jnp.promote_types(queries.dtype, database.dtype)
    scores = lax.dot_general(
        queries.astype(dtype),
        database.astype(dtype),
        (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.promote_types(dtype, jnp.float32),
    )
    return scores.astype(jnp.float32)


def _mask(scores: jax.Array, start, n_valid) -> jax.Array:
    """Set the scores of database items ``start + j >= n_valid`` to ``-inf``."""
    if n_valid is None:
        return scores
    cols = start + jnp.arange(scores.shape[1])
    return jnp.where(cols < n_valid, scores, -jnp.inf)


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k`` kept whole: slicing its outputs later must not turn it into a full sort."""
    return lax.optimization_barrier(lax.top_k(x, k))


def _take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Per query row ``q``: ``x[q][idx[q]]`` for ``x (nq, m, ...)`` and ``idx (nq, K)``."""
    return jax.vmap(lambda row, i: row[i])(x, idx)


def _blocks_init(nq: int, k: int, dummy_id: int) -> _Blocks:
    return _Blocks(
        maxima=jnp.full((nq, k), -jnp.inf, jnp.float32),
        ids=jnp.full((nq, k), dummy_id, jnp.int32),
        scores=jnp.full((nq, k, _BLOCK), -jnp.inf, jnp.float32),
    )


def _blocks_update(state: _Blocks, scores: jax.Array, first_block) -> _Blocks:
    """Fold a chunk of scores ``(nq, c)``, ``c % _BLOCK == 0``, into the ``K`` best blocks."""
    nq, c = scores.shape
    k = state.ids.shape[1]
    blocks = scores.reshape(nq, c // _BLOCK, _BLOCK)
    maxima, pos = lax.top_k(jnp.concatenate([state.maxima, blocks.max(-1)], axis=1), k)
    old = pos < k
    old_pos = jnp.minimum(pos, k - 1)
    new_pos = jnp.maximum(pos - k, 0)
    kept = jnp.where(old[..., None], _take_rows(state.scores, old_pos), _take_rows(blocks, new_pos))
    ids = jnp.where(old, jnp.take_along_axis(state.ids, old_pos, 1), first_block + new_pos)
    return _Blocks(maxima, ids.astype(jnp.int32), kept)


def _item_ids(block_ids: jax.Array) -> jax.Array:
    """Item ids ``(nq, K × _BLOCK)`` of the blocks ``block_ids (nq, K)``."""
    return (block_ids[..., None] * _BLOCK + jnp.arange(_BLOCK)).reshape(block_ids.shape[0], -1)


def _blocks_finish_by_id(state: _Blocks, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k items with candidates laid out by increasing item id, so ties keep the lower id."""
    nq = state.ids.shape[0]
    order = jnp.argsort(state.ids, axis=1)
    cand = _take_rows(state.scores, order).reshape(nq, -1)
    scores, pos = lax.top_k(cand, k)
    return scores, jnp.take_along_axis(_item_ids(jnp.take_along_axis(state.ids, order, 1)), pos, 1)


def _blocks_finish(state: _Blocks, k: int) -> tuple[jax.Array, jax.Array]:
    """Select the ``k`` best items among the kept blocks, ties by the lower item id.

    The block maxima go first and the other items after them, which keeps the top-k heap
    small; items below the ``k``-th block maximum cannot make the top k (the ``k`` maxima are
    above them) and are set to ``-inf``. That layout breaks ties by block rank, not by id, so
    the rows whose ``k`` best scores hold a tie, or tie with a candidate left out, are redone
    with the candidates laid out by id, ``_TIED_ROWS`` rows at a time.
    """
    nq, n_blocks = state.ids.shape
    arg = jnp.argmax(state.scores, axis=-1)
    drop = (jnp.arange(_BLOCK) == arg[..., None]) | (state.scores < state.maxima[:, -1:, None])
    rest = jnp.where(drop, -jnp.inf, state.scores)
    cand = jnp.concatenate([state.maxima, rest.reshape(nq, -1)], axis=1)
    scores, pos = _top_k(cand, k)
    block = jnp.where(pos < n_blocks, pos, (pos - n_blocks) // _BLOCK)
    within = jnp.where(pos < n_blocks, _take_rows(arg, block), (pos - n_blocks) % _BLOCK)
    ids = _take_rows(state.ids, block) * _BLOCK + within.astype(jnp.int32)
    tied = jnp.any(scores[:, 1:] == scores[:, :-1], axis=1) | (
        jnp.sum(cand == scores[:, -1:], axis=1) > 1
    )

    def redo_tied_rows(carry):
        scores, ids, todo = carry
        flags, rows = lax.top_k(todo.astype(jnp.float32), min(nq, _TIED_ROWS))
        rows = jnp.where(flags > 0, rows, nq)
        sub = jax.tree.map(lambda a: a[jnp.minimum(rows, nq - 1)], state)
        sub_scores, sub_ids = _blocks_finish_by_id(sub, k)
        return (
            scores.at[rows].set(sub_scores, mode="drop"),
            ids.at[rows].set(sub_ids, mode="drop"),
            todo.at[rows].set(False, mode="drop"),
        )

    scores, ids, _ = lax.while_loop(lambda c: jnp.any(c[2]), redo_tied_rows, (scores, ids, tied))
    return scores, ids


def _items_update(state: _Items, scores: jax.Array, start) -> _Items:
    """Merge a chunk of scores ``(nq, c)`` into the running ``k`` best items."""
    nq, c = scores.shape
    k = state.ids.shape[1]
    ids = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (nq, c))
    best, pos = lax.top_k(jnp.concatenate([state.scores, scores], axis=1), k)
    return _Items(best, jnp.take_along_axis(jnp.concatenate([state.ids, ids], 1), pos, 1))


def _knn_local(
    queries: jax.Array,
    database: jax.Array,
    k: int,
    chunk_size: int,
    n_valid=None,
    id_offset=0,
    axis_name: str | None = None,
    score_fn: Callable[[jax.Array, jax.Array], jax.Array] = _scores,
) -> tuple[jax.Array, jax.Array]:
    """Top-k of ``queries (nq, D)`` against ``database (n, D)``, chunked over the database.

    ``score_fn(queries, rows) -> (nq, c)`` float32 gives the similarities (default the inner
    product; :mod:`jret.hashing` passes ``−Hamming``). Items ``j >= n_valid`` (``n_valid`` may
    be traced) score ``-inf``; the returned ids are ``id_offset + j``. Requires ``k <= n``.
    Full chunks are sliced out of ``database`` in place; the last ``n mod chunk`` rows form one
    smaller chunk. The two-level block selection is used when ``k`` is small next to the
    chunk, except inside ``shard_map`` over ``axis_name``, where XLA rejects its optimisation
    barrier: there the running top-k is merged directly and marked as varying along the axis.
    """
    nq, n = queries.shape[0], database.shape[0]
    chunk = min(chunk_size, n)
    use_blocks = axis_name is None and 2 * k * _BLOCK <= chunk
    if use_blocks:
        chunk = chunk // _BLOCK * _BLOCK
        state = _blocks_init(nq, k, -(-n // _BLOCK))
    else:
        state = _Items(jnp.full((nq, k), -jnp.inf, jnp.float32), jnp.full((nq, k), n, jnp.int32))
    if axis_name is not None:
        state = lax.pcast(state, (axis_name,), to="varying")
    n_full, rem = divmod(n, chunk)

    def update(state, rows: jax.Array, start, limit):
        scores = _mask(score_fn(queries, rows), start, limit)
        if use_blocks:
            return _blocks_update(state, scores, start // _BLOCK)
        return _items_update(state, scores, start)

    def body(i, state):
        rows = lax.dynamic_slice_in_dim(database, i * chunk, chunk)
        return update(state, rows, i * chunk, n_valid)

    state = lax.fori_loop(0, n_full, body, state)
    if rem:
        width = -(-rem // _BLOCK) * _BLOCK if use_blocks else rem
        rows = jnp.pad(database[n_full * chunk :], ((0, width - rem), (0, 0)))
        limit = n if n_valid is None else jnp.minimum(n_valid, n)
        state = update(state, rows, n_full * chunk, limit)
    scores, ids = _blocks_finish(state, k) if use_blocks else state
    return scores, ids + id_offset


def _query_blocks(fn, queries: jax.Array, block_size: int | None):
    """Apply ``fn`` to ``queries (nq, D)`` in blocks of ``block_size`` rows (``lax.map``)."""
    nq, dim = queries.shape
    if block_size is None or block_size >= nq:
        return fn(queries)
    n_blocks = -(-nq // block_size)
    padded = jnp.pad(queries, ((0, n_blocks * block_size - nq), (0, 0)))
    out = lax.map(fn, padded.reshape(n_blocks, block_size, dim))
    return jax.tree.map(lambda a: a.reshape(n_blocks * block_size, *a.shape[2:])[:nq], out)


def knn_chunked(
    queries: jax.Array,
    database: jax.Array,
    k: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Exact inner-product top-k; the jit-able core of :func:`knn`, without value checks.

    Similarity is ``S = Q @ Xᵀ`` (SPEC §1.3). The database is scanned in chunks of
    ``chunk_size`` rows with a running top-k, so memory is ``O(nq × chunk_size)``; ranks,
    dtypes, the dimensions and ``k <= n`` are checked at trace time.

    Args:
      queries: ``(nq, D)`` floating (float32, bfloat16 or float16; scores accumulate in float32).
      database: ``(n, D)`` floating.
      k: number of neighbours, ``1 <= k <= n`` (static).
      chunk_size: database rows per chunk (static, default 8192); ``n`` need not be a multiple.
      query_chunk_size: if set, the queries are processed in blocks of this many rows (static).

    Returns:
      ``scores (nq, k)`` float32 decreasing and ``ids (nq, k)`` int32 database indices; equal
      scores keep the lower index first (SPEC §1.2).
    """
    _check_static(queries, database, k)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    if query_chunk_size is not None:
        check_positive_int(query_chunk_size, "query_chunk_size")
    return _query_blocks(
        lambda q: _knn_local(q, database, k, chunk_size), queries, query_chunk_size
    )


def _check_inputs(queries, database, k: int, validate: bool) -> None:
    """Shape checks always; emptiness before ``k <= n``, and NaN/inf, when ``validate``."""
    check_ndim(queries, "queries", (2,), "queries (nq, D)")
    check_ndim(database, "database", (2,), "database (n, D)")
    if validate:
        check_nonempty(queries, "queries")
        check_nonempty(database, "database")
    _check_static(queries, database, k)
    if validate:
        check_finite(queries, "queries")
        check_finite(database, "database")


@partial(jax.jit, static_argnames=("k", "chunk_size", "query_chunk_size"))
def _knn_jit(queries, database, k, chunk_size, query_chunk_size):
    return knn_chunked(queries, database, k, chunk_size, query_chunk_size)


def knn(
    queries: jax.Array,
    database: jax.Array,
    k: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_chunk_size: int | None = None,
    validate: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Exact inner-product k-nearest neighbours of ``queries (nq, D)`` in ``database (n, D)``.

    Exhaustive search ``S = Q @ Xᵀ`` followed by sorting (SPEC §1.3), chunked over the
    database; :func:`knn_chunked` is the jit-able core. With ``validate`` (default) the inputs
    are first checked for emptiness and NaN/inf.

    Args:
      queries: ``(nq, D)`` floating (float32, bfloat16 or float16).
      database: ``(n, D)`` floating.
      k: number of neighbours, ``1 <= k <= n``.
      chunk_size: database rows per chunk (default 8192): memory is ``O(nq × chunk_size)``.
      query_chunk_size: optional number of query rows processed at a time.
      validate: check values before searching (default True).

    Returns:
      ``scores (nq, k)`` float32 sorted decreasing and ``ids (nq, k)`` int32; equal scores keep
      the lower database index first (SPEC §1.2).
    """
    _check_inputs(queries, database, k, validate)
    return _knn_jit(queries, database, k, chunk_size, query_chunk_size)


@partial(jax.jit, static_argnames=("k", "mesh", "axis_name", "chunk_size", "score_fn"))
def _knn_sharded_jit(queries, database, k, mesh, axis_name, chunk_size, score_fn=_scores):
    n = database.shape[0]
    n_shards = mesh.shape[axis_name]
    n_local = -(-n // n_shards)
    database = jnp.pad(database, ((0, n_local * n_shards - n), (0, 0)))
    k_local = min(k, n_local)

    def local(q: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
        offset = lax.axis_index(axis_name) * n_local
        scores, ids = _knn_local(
            q, rows, k_local, chunk_size, n - offset, offset, axis_name, score_fn
        )
        scores = lax.all_gather(scores, axis_name, axis=1, tiled=True, to="invarying")
        ids = lax.all_gather(ids, axis_name, axis=1, tiled=True, to="invarying")
        best, pos = lax.top_k(scores, k)
        return best, jnp.take_along_axis(ids, pos, 1)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis_name)), out_specs=(P(), P()))(
        queries, database
    )


def knn_sharded(
    queries: jax.Array,
    database: jax.Array,
    k: int,
    mesh: Mesh,
    axis_name: str = "db",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    validate: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """:func:`knn` with the database rows sharded over the mesh axis ``axis_name``.

    Each shard runs the chunked search on its rows (the database is zero-padded to a multiple
    of the shard count; padded rows never appear in the result), the ``(nq, k)`` candidates of
    all shards are all-gathered in shard order and merged with a stable top-k, so the result,
    ties included, equals :func:`knn`'s. Queries are replicated.

    Args:
      queries: ``(nq, D)`` floating.
      database: ``(n, D)`` floating; may already be sharded as ``P(axis_name)``.
      k: number of neighbours, ``1 <= k <= n``.
      mesh: a ``jax.sharding.Mesh`` with an axis named ``axis_name``.
      axis_name: the mesh axis the database rows are split over (default ``"db"``).
      chunk_size: database rows per chunk within a shard (default 8192).
      validate: check values before searching (default True).

    Returns:
      ``scores (nq, k)`` float32 decreasing and ``ids (nq, k)`` int32 global database indices.
    """
    _check_inputs(queries, database, k, validate)
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name: {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    return _knn_sharded_jit(queries, database, k, mesh, axis_name, chunk_size)


@partial(jax.jit, static_argnames=("chunk_size",))
def _ranks_jit(queries, database, chunk_size):
    def rank(q: jax.Array) -> jax.Array:
        scores = _scores(q, database)
        return jnp.argsort(-scores, axis=1, stable=True).astype(jnp.int32)

    return _query_blocks(rank, queries, chunk_size)


def ranks_all(
    queries: jax.Array,
    database: jax.Array,
    chunk_size: int = 128,
    validate: bool = True,
) -> jax.Array:
    """Full ranking ``(nq, n)`` int32: row ``q`` lists all database indices by decreasing score.

    The ranking the revisited Oxford/Paris evaluation needs (SPEC §1.3, §1.4): a stable sort
    of ``-(Q @ Xᵀ)``, so equal scores keep the lower index first. Queries are processed
    ``chunk_size`` rows at a time (default 128), so memory is ``O(chunk_size × n)``.
    """
    _check_inputs(queries, database, 1, validate)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    return _ranks_jit(queries, database, chunk_size)
