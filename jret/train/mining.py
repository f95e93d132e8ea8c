"""Hard-negative mining for tuple training (SPEC §4.4; [000] L3108–3147, [003] L159).

For each query, the pool is walked by decreasing similarity under the current network and an
image is taken as a negative when its cluster (3D model / landmark) is neither the query's nor
one already taken (the N2 strategy, at most one image per cluster), until ``num_negatives``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jret._checks import (
    check_finite,
    check_floating,
    check_integer,
    check_ndim,
    check_nonempty,
    check_positive_int,
    check_same_dim,
)
from jret.search import DEFAULT_CHUNK_SIZE, knn, knn_sharded


@partial(jax.jit, static_argnames=("num_negatives",))
def select_negatives(
    candidate_ids: jax.Array,
    candidate_clusters: jax.Array,
    query_clusters: jax.Array,
    num_negatives: int,
) -> tuple[jax.Array, jax.Array]:
    """The first ``num_negatives`` candidates of distinct clusters other than the query's.

    Args:
      candidate_ids: ``(nq, K)`` pool indices sorted by decreasing similarity.
      candidate_clusters: ``(nq, K)`` their cluster ids.
      query_clusters: ``(nq,)``.
      num_negatives: negatives per query (static).

    Returns:
      ``ids (nq, num_negatives)`` (entries past ``count`` are meaningless) and
      ``count (nq,)``, the number of eligible candidates found.
    """
    k = candidate_clusters.shape[1]
    same = candidate_clusters[:, :, None] == candidate_clusters[:, None, :]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)
    first = ~jnp.any(same & earlier, axis=2)
    valid = first & (candidate_clusters != query_clusters[:, None])
    order = jnp.argsort(~valid, axis=1, stable=True)[:, :num_negatives]
    return jnp.take_along_axis(candidate_ids, order, 1), jnp.sum(valid, axis=1)


def mine_hard_negatives(
    query_desc: jax.Array,
    pool_desc: jax.Array,
    query_clusters: jax.Array,
    pool_clusters: jax.Array,
    num_negatives: int = 5,
    candidates: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mesh: Mesh | None = None,
    axis_name: str = "data",
    validate: bool = True,
) -> tuple[np.ndarray, float]:
    """Hard negatives of each query among a pool (N2 mining of Radenović et al.).

    The top ``candidates`` pool images of every query come from the exact chunked search
    (:func:`jret.search.knn`, or :func:`jret.search.knn_sharded` with the pool sharded over
    ``mesh``); the per-cluster filter runs on device. When some query has fewer than
    ``num_negatives`` eligible candidates the shortlist is doubled, up to the whole pool.

    Args:
      query_desc: ``(nq, D)`` ℓ2-normalised query descriptors.
      pool_desc: ``(n, D)`` pool descriptors.
      query_clusters: ``(nq,)`` integer cluster id of each query.
      pool_clusters: ``(n,)`` integer cluster id of each pool image.
      num_negatives: negatives per query (default 5).
      candidates: initial shortlist length (default ``4 × num_negatives + 16``).
      chunk_size: database rows per chunk of the search.
      mesh: optional mesh to shard the pool over ``axis_name``.
      validate: check for empty inputs, NaN/inf and too few clusters (default True).

    Returns:
      ``negatives (nq, num_negatives)`` int pool indices (most similar first) and the average
      distance ``‖q − n + 1e-6‖`` over the selected negatives (the reference's training monitor).
    """
    num_negatives = check_positive_int(num_negatives, "num_negatives")
    check_ndim(query_desc, "query_desc", (2,), "query_desc (nq, D)")
    check_ndim(pool_desc, "pool_desc", (2,), "pool_desc (n, D)")
    check_floating(query_desc, "query_desc")
    check_floating(pool_desc, "pool_desc")
    check_same_dim(query_desc, pool_desc, "query_desc", "pool_desc")
    check_ndim(query_clusters, "query_clusters", (1,), "query_clusters (nq,)")
    check_ndim(pool_clusters, "pool_clusters", (1,), "pool_clusters (n,)")
    check_integer(query_clusters, "query_clusters")
    check_integer(pool_clusters, "pool_clusters")
    check_same_dim(query_desc, query_clusters, "query_desc", "query_clusters", axis=0)
    check_same_dim(pool_desc, pool_clusters, "pool_desc", "pool_clusters", axis=0)
    if validate:
        check_nonempty(query_desc, "query_desc")
        check_nonempty(pool_desc, "pool_desc")
        check_finite(query_desc, "query_desc")
        check_finite(pool_desc, "pool_desc")
    n = pool_desc.shape[0]
    k = min(n, check_positive_int(candidates or 4 * num_negatives + 16, "candidates"))
    qc = jnp.asarray(query_clusters)
    pc = jnp.asarray(pool_clusters)
    while True:
        if mesh is None:
            _, ids = knn(query_desc, pool_desc, k, chunk_size=chunk_size, validate=False)
        else:
            _, ids = knn_sharded(
                query_desc, pool_desc, k, mesh, axis_name, chunk_size=chunk_size, validate=False
            )
        negatives, count = select_negatives(ids, pc[ids], qc, num_negatives)
        if int(jnp.min(count)) >= num_negatives or k == n:
            break
        k = min(n, 2 * k)
    if int(jnp.min(count)) < num_negatives:
        worst = int(jnp.argmin(count))
        raise ValueError(
            f"pool_clusters: query {worst} has only {int(count[worst])} pool clusters other than "
            f"its own; {num_negatives} negatives need at least that many distinct clusters"
        )
    diff = jnp.asarray(query_desc)[:, None, :] - jnp.asarray(pool_desc)[negatives] + 1e-6
    avg = float(jnp.mean(jnp.linalg.norm(diff, axis=-1)))
    return np.asarray(negatives), avg
