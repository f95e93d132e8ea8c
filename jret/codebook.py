"""Visual codebooks: flat k-means in JAX and assignment of descriptors to their nearest words.

A codebook is a ``(k, D)`` float32 array of centroids (visual words). Descriptors are quantised to
their nearest centroid in L2 (Sivic & Zisserman; SPEC §6.1, [000] L6827–6850, [003] L42–50); with
multiple assignment (MA) a descriptor is replicated to its ``A`` nearest words, A = 5 on the query
side in the match-kernel papers and HOW, A = 1 on the database side ([000] L7540–7543,
[003] L163).

Nothing scales with ``N × k``: descriptors are processed ``chunk_size`` rows at a time and, for
large codebooks, centroids ``centroid_chunk_size`` at a time with a running top-A, so a
65,536-word codebook over millions of 128-D descriptors holds only one
``chunk_size × centroid_chunk_size`` block of distances. Distances are ``‖c‖² − 2 xᵀc`` (the
per-row ``‖x‖²`` does not change the ranking) computed at full float32 precision; ties go to the
lower centroid index.

k-means defaults follow the reference used by HOW and asmk (faiss ``Clustering``): 10 Lloyd
iterations on a random subset of at most 256 points per centroid, initialised from random
training points; k-means++ (Arthur & Vassilvitskii, 2007) is available for small codebooks.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jret._checks import (
    check_finite,
    check_floating,
    check_ndim,
    check_nonempty,
    check_positive_int,
    check_same_dim,
)

DEFAULT_CHUNK_SIZE = 4096
DEFAULT_CENTROID_CHUNK_SIZE = 16384
MAX_POINTS_PER_CENTROID = 256
INITS = ("random", "kmeans++")


def _dot(x: jax.Array, c: jax.Array) -> jax.Array:
    """``x @ cᵀ`` at full float32 precision (no TF32/bfloat16 passes on accelerators)."""
    return lax.dot_general(
        x,
        c,
        (((1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def _merge(state, dist: jax.Array, start) -> tuple[jax.Array, jax.Array]:
    """Fold a block of distances ``(c, m)`` (centroids ``start…start+m``) into the running top-A."""
    best, ids = state
    a = best.shape[1]
    neg, pos = lax.top_k(-jnp.concatenate([best, dist], axis=1), a)
    old = jnp.take_along_axis(ids, jnp.minimum(pos, a - 1), axis=1)
    return -neg, jnp.where(pos < a, old, start + pos - a).astype(jnp.int32)


def _nearest_block(
    x: jax.Array, centroids: jax.Array, c_sq: jax.Array, a: int, centroid_chunk: int
) -> tuple[jax.Array, jax.Array]:
    """The ``a`` smallest ``‖c‖² − 2xᵀc`` of rows ``x (c, D)`` (increasing) and their centroids."""
    k = centroids.shape[0]
    if k <= centroid_chunk:
        neg, ids = lax.top_k(-(c_sq - 2.0 * _dot(x, centroids)), a)
        return -neg, ids.astype(jnp.int32)
    state = (
        jnp.full((x.shape[0], a), jnp.inf, jnp.float32),
        jnp.full((x.shape[0], a), -1, jnp.int32),
    )
    n_full, rem = divmod(k, centroid_chunk)

    def body(j, state):
        cj = lax.dynamic_slice_in_dim(centroids, j * centroid_chunk, centroid_chunk)
        sj = lax.dynamic_slice_in_dim(c_sq, j * centroid_chunk, centroid_chunk)
        return _merge(state, sj - 2.0 * _dot(x, cj), j * centroid_chunk)

    state = lax.fori_loop(0, n_full, body, state)
    if rem:
        tail = n_full * centroid_chunk
        state = _merge(state, c_sq[tail:] - 2.0 * _dot(x, centroids[tail:]), tail)
    return state


def _fold_rows(X: jax.Array, chunk: int, fn, carry):
    """``carry = fn(carry, rows, start)`` over consecutive row blocks of ``X`` (no padding copy)."""
    n_full, rem = divmod(X.shape[0], chunk)
    if n_full:
        carry = lax.fori_loop(
            0,
            n_full,
            lambda i, c: fn(c, lax.dynamic_slice_in_dim(X, i * chunk, chunk), i * chunk),
            carry,
        )
    if rem:
        carry = fn(carry, X[n_full * chunk :], n_full * chunk)
    return carry


def nearest(
    des: jax.Array,
    centroids: jax.Array,
    k: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    centroid_chunk_size: int = DEFAULT_CENTROID_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Squared L2 distances ``(N, k)`` (increasing) and ids ``(N, k)`` int32 of the nearest words.

    The jit-able core of :func:`quantize`: rows ``des (N, D)`` are processed ``chunk_size`` at a
    time, and codebooks larger than ``centroid_chunk_size`` are scanned in blocks with a running
    top-k, so memory is ``O(chunk_size × min(k_words, centroid_chunk_size))``. Ties keep the lower
    centroid id. Shapes and dtypes are checked at trace time; ``k`` and the chunk sizes are static.
    """
    check_ndim(des, "des", (2,), "descriptors (N, D)")
    check_ndim(centroids, "centroids", (2,), "centroids (k, D)")
    check_floating(des, "des")
    check_floating(centroids, "centroids")
    check_same_dim(des, centroids, "des", "centroids")
    k = check_positive_int(k, "k")
    if k > centroids.shape[0]:
        raise ValueError(f"k: expected at most {centroids.shape[0]} (the codebook size), got {k}")
    chunk = check_positive_int(chunk_size, "chunk_size")
    cchunk = check_positive_int(centroid_chunk_size, "centroid_chunk_size")
    des = jnp.asarray(des, jnp.float32)
    centroids = jnp.asarray(centroids, jnp.float32)
    c_sq = jnp.sum(centroids * centroids, axis=1)
    n = des.shape[0]

    def fn(carry, rows, start):
        dist, ids = carry
        d, i = _nearest_block(rows, centroids, c_sq, k, cchunk)
        d = jnp.maximum(d + jnp.sum(rows * rows, axis=1, keepdims=True), 0.0)
        return (
            lax.dynamic_update_slice_in_dim(dist, d, start, 0),
            lax.dynamic_update_slice_in_dim(ids, i, start, 0),
        )

    init = (jnp.zeros((n, k), jnp.float32), jnp.zeros((n, k), jnp.int32))
    return _fold_rows(des, min(chunk, max(n, 1)), fn, init)


_nearest_jit = jax.jit(nearest, static_argnames=("k", "chunk_size", "centroid_chunk_size"))


def quantize(
    des: jax.Array,
    centroids: jax.Array,
    multiple_assignment: int = 1,
    mask: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    centroid_chunk_size: int = DEFAULT_CENTROID_CHUNK_SIZE,
    validate: bool = True,
) -> jax.Array:
    """Visual-word ids of descriptors: the ``multiple_assignment`` nearest centroids, nearest first.

    SPEC §6.1: hard assignment (A = 1, database side) or multiple assignment (A = 5 for HOW /
    ASMK queries, [000] L7540–7543, [003] L163).

    Args:
      des: descriptors ``(..., D)``: flat ``(N, D)`` or a padded set ``(N, M, D)``.
      centroids: the codebook ``(k, D)``.
      multiple_assignment: A, the number of words per descriptor (default 1), ``A <= k``.
      mask: optional ``(...)`` bool validity of the descriptors (padded sets); invalid rows get −1.
      chunk_size, centroid_chunk_size: rows / centroids per block (see :func:`nearest`).
      validate: check for empty inputs and NaN/inf first (default True).

    Returns int32 word ids ``(..., A)``.
    """
    check_ndim(centroids, "centroids", (2,), "centroids (k, D)")
    if np.ndim(des) < 1 or np.shape(des)[-1] != np.shape(centroids)[1]:
        raise ValueError(
            f"des: expected descriptors (..., {np.shape(centroids)[1]}), got shape {np.shape(des)}"
        )
    check_floating(des, "des")
    lead = np.shape(des)[:-1]
    if mask is not None and tuple(np.shape(mask)) != tuple(lead):
        raise ValueError(
            f"mask: expected shape {tuple(lead)} (one flag per descriptor), got {np.shape(mask)}"
        )
    a = check_positive_int(multiple_assignment, "multiple_assignment")
    if validate:
        check_nonempty(centroids, "centroids")
        check_finite(des, "des")
        check_finite(centroids, "centroids")
    flat = jnp.reshape(jnp.asarray(des, jnp.float32), (-1, np.shape(des)[-1]))
    if flat.shape[0] == 0:
        return jnp.zeros((*lead, a), jnp.int32)
    _, ids = _nearest_jit(
        flat, jnp.asarray(centroids, jnp.float32), a, chunk_size, centroid_chunk_size
    )
    ids = ids.reshape(*lead, a)
    if mask is not None:
        ids = jnp.where(jnp.asarray(mask, bool)[..., None], ids, -1)
    return ids


def _lloyd_step(key, X, centroids, chunk: int, centroid_chunk: int) -> jax.Array:
    """One Lloyd iteration: assign (chunked), average, re-seed empty clusters at random points."""
    k, dim = centroids.shape
    c_sq = jnp.sum(centroids * centroids, axis=1)

    def fn(carry, rows, start):
        sums, counts = carry
        _, ids = _nearest_block(rows, centroids, c_sq, 1, centroid_chunk)
        ids = ids[:, 0]
        return (
            sums + jax.ops.segment_sum(rows, ids, num_segments=k),
            counts + jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=k),
        )

    sums, counts = _fold_rows(
        X, chunk, fn, (jnp.zeros((k, dim), jnp.float32), jnp.zeros((k,), jnp.int32))
    )
    reseed = X[jax.random.randint(key, (k,), 0, X.shape[0])]
    means = sums / jnp.maximum(counts, 1)[:, None].astype(jnp.float32)
    return jnp.where((counts > 0)[:, None], means, reseed)


@partial(jax.jit, static_argnames=("iters", "chunk", "centroid_chunk"))
def _lloyd(key, X, centroids, iters: int, chunk: int, centroid_chunk: int) -> jax.Array:
    keys = jax.random.split(key, max(iters, 1))
    return lax.fori_loop(
        0, iters, lambda i, c: _lloyd_step(keys[i], X, c, chunk, centroid_chunk), centroids
    )


@partial(jax.jit, static_argnames=("k",))
def _kmeans_pp(key, X, k: int) -> jax.Array:
    """k-means++ seeding: each next centroid drawn with probability ∝ D(x)² (O(k·N·D))."""
    n = X.shape[0]
    x_sq = jnp.sum(X * X, axis=1)
    key, first = jax.random.split(key)
    c0 = X[jax.random.randint(first, (), 0, n)]

    def d2_to(c):
        return jnp.maximum(x_sq - 2.0 * _dot(X, c[None])[:, 0] + jnp.sum(c * c), 0.0)

    def body(i, state):
        centroids, d2, key = state
        key, sub, fallback = jax.random.split(key, 3)
        total = jnp.sum(d2)
        drawn = jax.random.categorical(
            sub, jnp.log(jnp.where(d2 > 0, d2, 1.0)) + jnp.where(d2 > 0, 0.0, -jnp.inf)
        )
        idx = jnp.where(total > 0, drawn, jax.random.randint(fallback, (), 0, n))
        c = X[idx]
        return centroids.at[i].set(c), jnp.minimum(d2, d2_to(c)), key

    init = (jnp.zeros((k, X.shape[1]), jnp.float32).at[0].set(c0), d2_to(c0), key)
    return lax.fori_loop(1, k, body, init)[0]


def kmeans(
    key: jax.Array,
    X: jax.Array,
    k: int,
    iters: int = 10,
    init: str = "random",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    centroid_chunk_size: int = DEFAULT_CENTROID_CHUNK_SIZE,
    max_points_per_centroid: int | None = MAX_POINTS_PER_CENTROID,
    validate: bool = True,
) -> jax.Array:
    """Flat k-means (Lloyd) codebook ``(k, D)`` float32, deterministic from ``key`` (SPEC §6.1).

    Defaults follow the reference behind HOW / asmk (faiss ``Clustering``): ``iters = 10``, a
    random subset of at most ``max_points_per_centroid = 256`` points per centroid, random
    training points as initial centroids. Each iteration assigns points to their nearest centroid
    in chunks (see :func:`nearest`) while accumulating per-cluster sums with ``segment_sum``;
    a cluster left empty is re-seeded at a random training point.

    Args:
      key: a ``jax.random`` key (subset, initialisation and re-seeding).
      X: training descriptors ``(N, D)``, ``N >= k`` (numpy or jax; subsampled on the host when
        numpy, so only the subset is moved to the device).
      k: number of visual words.
      iters: Lloyd iterations (default 10).
      init: ``'random'`` (k distinct training points, default) or ``'kmeans++'`` (D² sampling;
        sequential, O(k·N·D): meant for small codebooks).
      chunk_size, centroid_chunk_size: block sizes of the assignment (memory
        ``O(chunk_size × min(k, centroid_chunk_size))``).
      max_points_per_centroid: subsample to at most this many points per centroid (None: all).
      validate: check for NaN/inf first (default True).
    """
    check_ndim(X, "X", (2,), "training descriptors (N, D)")
    check_floating(X, "X")
    k = check_positive_int(k, "k")
    if isinstance(iters, bool) or not isinstance(iters, int | np.integer) or iters < 0:
        raise ValueError(f"iters: expected a non-negative integer, got {iters!r}")
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    if np.shape(X)[0] < k:
        raise ValueError(f"X: expected at least k = {k} points, got {np.shape(X)[0]}")
    chunk = check_positive_int(chunk_size, "chunk_size")
    cchunk = check_positive_int(centroid_chunk_size, "centroid_chunk_size")
    if max_points_per_centroid is not None:
        check_positive_int(max_points_per_centroid, "max_points_per_centroid")
    if validate:
        check_finite(X, "X")
    key_sub, key_init, key_iter = jax.random.split(key, 3)
    n = np.shape(X)[0]
    if max_points_per_centroid is not None and n > max_points_per_centroid * k:
        subset = jax.random.permutation(key_sub, n)[: max_points_per_centroid * k]
        X = X[np.sort(np.asarray(subset))] if isinstance(X, np.ndarray) else X[jnp.sort(subset)]
    X = jnp.asarray(X, jnp.float32)
    if init == "random":
        centroids = X[jax.random.permutation(key_init, X.shape[0])[:k]]
    else:
        centroids = _kmeans_pp(key_init, X, k)
    return _lloyd(key_iter, X, centroids, iters, min(chunk, X.shape[0]), cchunk)
